"""One study end to end: MLflow parent run, Tuner + OptunaSearch + ASHA, Pareto front, export.

``run_study(options)`` expects validated options (``study.run`` validates everything before
Ray starts). Resources: each trial takes ``TRIAL_CPUS`` for its driver function and its Train
workers ``cpus_per_worker`` each, in their own placement group; concurrency is capped so that
every admitted trial's workers fit at once (a Train run waits for all its workers), with room
left for each trial's Ray Data ingest (source shards). Epochs and resources are the trial
configs' (``StudyOptions.largest_trials``), never a copy of the flags.

Ctrl-C (SIGINT) during ``Tuner.fit()``: Tune stops the trials and saves its state; the study
is left as ``--resume`` will find it — the parent run KILLED, open child runs KILLED without
an outcome, Optuna's running trials still RUNNING — and ``StudyInterrupted`` is raised.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune

from study.bridge import run_trial
from study.options import TRIAL_CPUS, StudyOptions
from study.pareto import (
    best_at_budget,
    completed_points,
    export_configs,
    non_dominated,
    write_front,
)
from study.progress import ProgressView
from study.recommend import export_recommendation
from study.schedulers import build_scheduler
from study.searcher import (
    ACCURACY,
    TUNE_TRIAL_ATTR,
    SpaceSampler,
    StudySearch,
    build_sampler,
)
from study.tracking import (
    OUTCOME_TAG,
    STUDY_TAG,
    TRIAL_ID_TAG,
    ChildRunCallback,
    RetryingClient,
)
from workers.config import ConfigError
from workers.train import TRAIN_ENV, alive_nodes

logger = logging.getLogger(__name__)

#: the driver process: no MLflow download progress bars; let a diverged trial's last result
#: lack the objectives (StudySearch records it as FAIL instead of Tune aborting the study);
#: Tune's legacy reporter, silent at ``verbose=0`` (the new one prints its banner whatever
#: the verbosity): ``ProgressView`` is the study's one progress display
DRIVER_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
              "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "RAY_AIR_NEW_OUTPUT": "0"}


@dataclass
class StudyResult:
    """What the study produced."""

    parent_run_id: str
    experiment_id: str
    trials: int
    front: list[dict[str, Any]]
    best_at_budget: dict[str, Any] | None
    exported: list[str]
    artifacts: list[str]
    wall_seconds: float
    #: ``Recommendation.facts()`` and the files (``recommended.yaml``, ``.md``), or None
    recommendation: dict[str, Any] | None = None
    #: why there is no recommendation (``NoRecommendation``'s line), else ""
    no_recommendation: str = ""


class StudyInterrupted(Exception):
    """The study was interrupted (SIGINT) and left resumable."""


class InterruptWatch(tune.Callback):
    """Notes a SIGINT during ``Tuner.fit()`` (``received``), then hands it to the handler
    that was in place — Tune's, which stops the trials, saves the experiment state and
    returns from ``fit``. ``setup`` runs inside ``fit``, after Tune installed its handler.
    ``received`` is shared by every copy (a restored Tuner unpickles its own)."""

    received = threading.Event()

    def setup(self, **info: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            InterruptWatch.received.set()
            if not callable(handler):
                raise KeyboardInterrupt
            handler(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)


def _without_tune_resume_advice(record: logging.LogRecord) -> bool:
    """A log filter dropping Tune's "Resume experiment with: Tuner.restore(...)" after an
    interruption: a study resumes with ``--resume``, the command ``study/run.py`` prints."""
    return "Tuner.restore(" not in record.getMessage()


def concurrency_limit(options: StudyOptions, cluster: Mapping[str, float]) -> int:
    """Trials that fit at once on ``cluster`` (Ray's ``CPU``/``GPU`` totals): each needs up to
    ``options.trial_cpus`` (its function, its workers and the CPUs its Ray Data ingest may use;
    the last are not reserved by anyone, only left free: Ray Data's tasks run outside the
    placement groups) and ``options.trial_gpus``; at least one, at most ``--concurrent``."""
    fits = math.floor(cluster.get("CPU", 0.0) / options.trial_cpus + 1e-9)
    if options.trial_gpus > 0:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / options.trial_gpus + 1e-9))
    return max(1, min(options.max_concurrent, fits))


def _versions() -> dict[str, str]:
    names = ("marginlab", "ray", "torch", "optuna", "mlflow", "pyarrow")
    out = {}
    for name in names:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def artifact_location(options: StudyOptions) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store
    (``<store>-artifacts/<name>``), never MLflow's default ``./mlruns`` of the working
    directory; None for a server (its own artifact handling)."""
    if not options.tracking_uri.startswith("sqlite:///"):
        return None
    store = Path(options.tracking_uri.removeprefix("sqlite:///").partition("?")[0])
    return (store.with_name(f"{store.stem}-artifacts") / options.name).as_uri()


def _parent(client: RetryingClient, name: str) -> tuple[Any, str | None]:
    """The experiment named ``name`` (or None) and the study's parent run id in it (or None)."""
    experiment = client.call("get_experiment_by_name", name)
    runs = [] if experiment is None else client.call(
        "search_runs", [experiment.experiment_id],
        filter_string=f"tags.`{STUDY_TAG}` = '{name}' and tags.`marginlab.role` = 'parent'")
    return experiment, runs[0].info.run_id if runs else None


def check_new_study(options: StudyOptions) -> None:
    """A study that is not ``--resume`` has a name MLflow does not hold yet (else a
    ``ConfigError``: its runs would join the other study's experiment)."""
    if options.resume:
        return
    _, run_id = _parent(RetryingClient(options.tracking_uri), options.name)
    if run_id is not None:
        raise ConfigError([f"--name {options.name}: MLflow ({options.tracking_uri}) already "
                           f"holds a study of that name (parent run {run_id}); pick another "
                           "--name"])


def open_parent_run(options: StudyOptions) -> tuple[str, str]:
    """The study's parent run: found again on ``--resume``, else created with its params.
    Creates the study folder first, the mark ``--resume`` looks for."""
    client = RetryingClient(options.tracking_uri)
    experiment, run_id = _parent(client, options.name)
    options.study_dir.mkdir(parents=True, exist_ok=True)
    experiment_id = (experiment.experiment_id if experiment is not None else client.call(
        "create_experiment", options.name, artifact_location=artifact_location(options)))
    if run_id is not None:
        client.call("update_run", run_id, status="RUNNING")
        return experiment_id, run_id
    run = client.call("create_run", experiment_id, run_name=f"study-{options.name}",
                      tags={STUDY_TAG: options.name, "marginlab.role": "parent",
                            "marginlab.git_revision": _git_revision()})
    run_id = run.info.run_id
    params = {**{f"cli.{k}": str(v) for k, v in options.cli_args.items()}, **_versions(),
              "spaces": ",".join(space.name for space in options.spaces),
              "optuna.storage": options.optuna_url}
    for key, value in params.items():
        client.call("log_param", run_id, key, value[:6000])
    for space in options.spaces:
        client.call("log_artifact", run_id, space.path, "spaces")
    return experiment_id, run_id


def share_datasets(options: StudyOptions) -> dict[str, Any]:
    """Load each distinct data section of the study's trials once, into Ray's object store:
    ``dataset_key`` → object ref, handed to every trial's workers (``run_trial``), so no
    trial and no worker loads, indexes or splits the data again."""
    import ray

    from workers.data import dataset_key, load_dataset, parse_data_config

    shared: dict[str, Any] = {}
    for trial in options.largest_trials:
        config = parse_data_config(trial.data)
        if (key := dataset_key(config)) is not None and key not in shared:
            shared[key] = ray.put(load_dataset(config))
    return shared


def build_tuner(options: StudyOptions, experiment_id: str, parent_run_id: str,
                cluster: Mapping[str, float], datasets: Mapping[str, Any] | None = None
                ) -> tune.Tuner:
    """The Tuner (or the restored one on ``--resume`` when Tune's state exists); its trials
    get ``datasets`` (``share_datasets``)."""
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, storage_path=str(options.storage_path),
                             study_name=options.name, datasets=dict(datasets or {})),
        {"cpu": TRIAL_CPUS})
    if options.resume and tune.Tuner.can_restore(str(options.study_dir / "tune")):
        return tune.Tuner.restore(str(options.study_dir / "tune"), trainable,
                                  resume_unfinished=True, resume_errored=True)
    searcher = StudySearch(
        space=SpaceSampler(options.spaces, options.base, grid=options.sampler == "grid"),
        sampler=build_sampler(options.sampler, options.seed, options.spaces),
        study_name=options.name, storage=options.optuna_url)
    enqueue_warm_start(options)
    callbacks = [ChildRunCallback(options.tracking_uri, experiment_id, parent_run_id,
                                  options.name),
                 ProgressView(options.name, options.num_trials), InterruptWatch()]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=build_scheduler(options),
                                    num_samples=options.num_trials,
                                    max_concurrent_trials=concurrency_limit(options, cluster)),
        run_config=tune.RunConfig(name="tune", storage_path=str(options.study_dir),
                                  callbacks=callbacks, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def enqueue_warm_start(options: StudyOptions) -> int:
    """With ``--warm-start``, enqueue each space's published setting
    (``SpaceSampler.warm_start_points``) in the study's Optuna storage: Optuna hands them out
    first, as trials 0, 1, …. Only into a study without trials (a resumed one enqueued them
    when it began). Returns how many were enqueued."""
    import optuna

    if not options.warm_start:
        return 0
    study = optuna.load_study(study_name=options.name, storage=options.optuna_url)
    if study.get_trials(deepcopy=False):
        return 0
    points = SpaceSampler(options.spaces, options.base).warm_start_points()
    for point in points:
        study.enqueue_trial(point)
    return len(points)


def close_interrupted(options: StudyOptions, experiment_id: str, parent_run_id: str) -> int:
    """Record trials a killed driver left open, once the (resumed) study has finished.

    A trial the driver had started but Tune had not yet saved in its experiment state is not
    restored by ``--resume``: its MLflow child stays open (no outcome tag) and its Optuna
    trial RUNNING. They become KILLED (tag ``marginlab.outcome = interrupted``) and FAIL, so
    each started trial appears exactly once, with what happened to it. An Optuna trial asked
    for just before the kill, whose Tune trial never started (no child run), becomes FAIL with
    the user attribute ``marginlab.outcome = never_started``. Returns how many child runs were
    closed.
    """
    import optuna

    client = RetryingClient(options.tracking_uri)
    children = client.call("search_runs", [experiment_id],
                           filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
    open_runs = [run for run in children if OUTCOME_TAG not in run.data.tags]
    for run in open_runs:
        client.call("set_tag", run.info.run_id, OUTCOME_TAG, "interrupted")
        client.call("set_terminated", run.info.run_id, "KILLED")
    started = {run.data.tags.get(TRIAL_ID_TAG) for run in children}
    storage = optuna.storages.RDBStorage(options.optuna_url)
    study = optuna.load_study(study_name=options.name, storage=storage)
    study_id = storage.get_study_id_from_name(options.name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(TUNE_TRIAL_ATTR) not in started:
            storage.set_trial_user_attr(
                storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                OUTCOME_TAG, "never_started")
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(open_runs)


def leave_resumable(options: StudyOptions, experiment_id: str, parent_run_id: str) -> None:
    """After an interrupted ``fit``: the parent and its open child runs (no outcome yet)
    KILLED, which ``--resume`` reopens; Optuna is left as it is (its RUNNING trials resume).
    Best effort: with the tracking store down they stay RUNNING, which ``--resume`` handles."""
    client = RetryingClient(options.tracking_uri)
    try:
        for run in client.call(
                "search_runs", [experiment_id],
                filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"):
            if OUTCOME_TAG not in run.data.tags and run.info.status == "RUNNING":
                client.call("set_terminated", run.info.run_id, "KILLED")
        client.call("set_terminated", parent_run_id, "KILLED")
    except Exception as error:  # the study stays resumable either way
        logger.warning("could not mark the interrupted runs KILLED in MLflow: %s", error)


def quiet_libraries() -> None:
    """Keep the libraries' routine INFO lines (MLflow creating its tables, Optuna creating or
    loading its study) out of the study's output; warnings still show."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_study(options: StudyOptions) -> StudyResult:
    """Run the study; returns the front and where everything was written. Raises
    ``ConfigError`` when the cluster cannot run a trial or a new study's name is taken, and
    ``StudyInterrupted`` (study left resumable) after a SIGINT."""
    import ray

    started = time.perf_counter()
    quiet_libraries()
    os.environ.update(TRAIN_ENV)
    os.environ.update(DRIVER_ENV)
    os.environ.update(options.tracking_credentials)
    mlflow.set_tracking_uri(options.tracking_uri)
    check_new_study(options)
    if not ray.is_initialized():
        ray.init(address=options.ray_address, log_to_driver=False,
                 runtime_env={"env_vars": TRAIN_ENV})
    cluster = ray.cluster_resources()
    if problems := options.resource_problems(cluster, nodes=alive_nodes()):
        raise ConfigError(problems)
    experiment_id, parent_run_id = open_parent_run(options)
    datasets = share_datasets(options)
    RetryingClient(options.tracking_uri).call("log_metric", parent_run_id, "datasets_shared",
                                              len(datasets))
    tuner = build_tuner(options, experiment_id, parent_run_id, cluster, datasets)
    InterruptWatch.received.clear()
    logging.getLogger("ray.tune.tune").addFilter(_without_tune_resume_advice)
    handler = signal.getsignal(signal.SIGINT)
    try:
        grid = tuner.fit()
    finally:  # Tune (and InterruptWatch) leave theirs installed: a later Ctrl-C would vanish
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    if InterruptWatch.received.is_set():
        leave_resumable(options, experiment_id, parent_run_id)
        raise StudyInterrupted(options.name)
    interrupted = close_interrupted(options, experiment_id, parent_run_id)
    client = MlflowClient(options.tracking_uri)
    points = completed_points(client, experiment_id, parent_run_id)
    front = non_dominated(points)
    best = best_at_budget(points, options.budget_fraction)
    artifact_dir = options.output
    artifacts = write_front(front, points, artifact_dir)
    exported = export_configs(client, front, best, artifact_dir / "configs")
    retrying = RetryingClient(options.tracking_uri)
    for path in artifacts:
        retrying.call("log_artifact", parent_run_id, str(path), "pareto")
    for path in exported:
        retrying.call("log_artifact", parent_run_id, str(path), "configs")
    recommendation, no_recommendation = export_recommendation(
        client, points, options.target_far, options.epsilon, artifact_dir)
    for path in (recommendation or {}).get("files", []):
        retrying.call("log_artifact", parent_run_id, path)
    wall = time.perf_counter() - started
    retrying.call("log_metric", parent_run_id, "study_wall_seconds", wall)
    retrying.call("log_metric", parent_run_id, "trials", len(grid))
    retrying.call("log_metric", parent_run_id, "interrupted_trials", interrupted)
    retrying.call("set_terminated", parent_run_id, "FINISHED")
    summary = StudyResult(
        parent_run_id, experiment_id, len(grid),
        [{"run_id": p.run_id, "space": p.space, ACCURACY: p.accuracy, "flops": p.flops}
         for p in front],
        None if best is None else {"run_id": best.run_id, "space": best.space,
                                   ACCURACY: best.accuracy, "flops": best.flops},
        [str(p) for p in exported], [str(p) for p in artifacts], wall, recommendation,
        no_recommendation)
    (artifact_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
