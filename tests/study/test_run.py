"""The study end to end: real local Ray, a real MLflow sqlite store, real Optuna storage."""

from __future__ import annotations

import base64
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import optuna
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.pareto import completed_points, non_dominated, run_trial_config
from study.run import UsageError, build_parser, options_from_args, resume_command
from study.tracking import OUTCOME_TAG, TRIAL_ID_TAG
from tests.baselines import assert_learned, assert_loss_falls, logged_epoch_losses
from workers.config import parse_trial_config

ROOT = Path(__file__).resolve().parents[2]
#: every study test trains the same small problem: 2 workers, 96 identities, width-16 CNN
SMALL = ["--set", "data.num_identities=96", "--set", "data.samples_per_identity=12",
         "--set", "data.heldout_identities=48", "--set", "model.width=16",
         "--set", "model.embedding_dim=64", "--set", "evaluation.num_pairs=600",
         "--batch-size", "32"]


def _study_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "study" / "run.py"), *args]


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(_study_command(*args), capture_output=True, text=True,
                          timeout=timeout, env=env)


#: this machine's CPUs, the local cluster a study without --ray-address checks against
CPUS = os.cpu_count() or 1
#: Train workers of 0.45 CPUs that do not fit on this machine
TOO_MANY_WORKERS = 4 * CPUS


@pytest.mark.parametrize(("args", "expected"), [
    (["--trials", "0"], "error: --trials = 0 must be an integer ≥ 1"),
    (["--workers", str(TOO_MANY_WORKERS)],
     f"error: --workers = {TOO_MANY_WORKERS} × --cpus-per-worker = 0.45 + 0.1 per trial needs "
     f"{TOO_MANY_WORKERS * 0.45 + 0.1:g} CPUs; the cluster has {CPUS}\n"),
    (["--sampler", "cmaes"], "error: --sampler = 'cmaes' must be one of ['tpe', 'nsga2', "
                             "'random', 'grid']"),
    (["--tracking-uri", "./mlruns"], "error: --tracking-uri = './mlruns' must be "
                                     "sqlite:///ABSOLUTE/PATH.db or http(s)://HOST:PORT"),
    (["--storage", "relative/dir"], "error: --storage = 'relative/dir' must be an absolute path"),
    (["--set", "head.sample_ratio=0"], "error: --set head.sample_ratio = 0 must be a number "
                                       "in (0.0, 1.0]"),
    (["--epochs", "200000"], "error: --epochs = 200000 must be an integer in [1, 100000]"),
    (["--set", "epochs=5"], "error: --set 'epochs=5': epochs is set by --epochs; use that flag"),
    (["--data", "image_folder", "--data-path", "/nonexistent"],
     "error: /nonexistent: not found (data.source = 'image_folder')"),
    (["--resume"], "error: --resume needs --name"),
])
def test_bad_flag_fails_before_ray(args: list[str], expected: str, tmp_path: Path) -> None:
    process = _run([*args, "--storage", str(tmp_path)] if "--storage" not in args else args)
    assert process.returncode == 2, process.stderr[-2000:]
    assert expected in process.stderr, process.stderr
    assert "Started a local Ray instance" not in process.stderr


def test_bad_space_file_lists_every_error(tmp_path: Path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(yaml.safe_dump({
        "version": 1, "name": "bad", "loss": "arcface",
        "params": {"loss.margin": {"distribution": "uniform", "low": 0.2, "high": 1.7},
                   "head.sample_ratio": {"distribution": "uniform", "low": 0.0, "high": 1.0}}},
        sort_keys=False))
    process = _run(["--space", str(space), "--storage", str(tmp_path)])
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert lines == [
        f"error: {space}: params.loss.margin: 1.7 rad is outside arcface.margin's allowed "
        "range [0, 1.2]",
        f"error: {space}: params.head.sample_ratio: head.sample_ratio = 0.0 must be a number "
        "in (0.0, 1.0]",
    ]


def test_grid_sampler_validates_trials_and_params_before_ray(tmp_path: Path) -> None:
    space = tmp_path / "seeds.yaml"
    space.write_text(yaml.safe_dump({
        "version": 1, "name": "seeds", "loss": "normface",
        "params": {"seed": {"distribution": "categorical", "choices": [0, 1, 2]}}}))
    common = ["--sampler", "grid", "--storage", str(tmp_path),
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    args = build_parser().parse_args(["--space", str(space), "--trials", "3", *common])
    assert options_from_args(args).sampler == "grid"
    args = build_parser().parse_args(["--space", str(space), "arcface", "--trials", "4",
                                      *common])
    with pytest.raises(UsageError) as error:
        options_from_args(args)
    lines = str(error.value).splitlines()
    assert lines[0].endswith("arcface.yaml: params.loss.margin: distribution uniform; "
                             "--sampler grid needs categorical params")
    args = build_parser().parse_args(["--space", str(space), "--trials", "4", *common])
    with pytest.raises(UsageError, match=r"^--trials = 4 must be ≤ 3, the number of grid points "
                                         r"of --sampler grid over seeds \(--trials 3 runs "
                                         r"every point once\)$"):
        options_from_args(args)


#: the learning rates of the ASHA study's spaces: one learns, the other leaves the network as
#: it was initialised (at the first rung: verification accuracy ≈ 0.68 against ≈ 0.57)
LEARNS, STALLS = 0.1, 1e-4


def _spaces_with_a_stalling_lr(folder: Path) -> list[str]:
    """The shipped normface and arcface spaces, with ``optim.lr`` a choice of ``LEARNS`` or
    ``STALLS``."""
    paths = []
    for name in ("normface", "arcface"):
        space = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
        space["params"]["optim.lr"] = {"distribution": "categorical", "choices": [LEARNS, STALLS]}
        paths.append(folder / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(space, sort_keys=False))
    return [str(path) for path in paths]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-trial, 2-space study with ASHA, one trial at a time, run in this process.

    TPE's seed 3 asks arcface at ``LEARNS``, then ``STALLS`` twice, then normface at ``LEARNS``.
    ASHA's first rung (epoch 1 of 2) stops a trial below the median of the trials recorded
    there before it: the two stalled trials trail it (the learnt one; the learnt and the first
    stalled one) and are pruned for certain; the last trial is above it and completes.
    """
    import ray

    from study.driver import run_study

    home = tmp_path_factory.mktemp("study")
    args = build_parser().parse_args([
        "--space", *_spaces_with_a_stalling_lr(home), "--trials", "4", "--epochs", "2",
        "--seed", "3", "--concurrent", "1", "--name", "four",
        "--storage", str(home / "studies"),
        "--tracking-uri", f"sqlite:///{home / 'mlflow.db'}", *SMALL])
    options = options_from_args(args)
    try:
        result = run_study(options)
    finally:
        ray.shutdown()
    return {"options": options, "result": result, "client": MlflowClient(options.tracking_uri)}


@pytest.mark.slow
def test_mlflow_holds_one_parent_and_one_child_per_trial(finished_study: dict) -> None:
    client, result = finished_study["client"], finished_study["result"]
    runs = client.search_runs([result.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == result.parent_run_id]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.params["spaces"] == "normface,arcface"
    assert parents[0].data.params["version.ray"].startswith("2.60")
    assert len(children) == 4
    assert len({r.data.tags[TRIAL_ID_TAG] for r in children}) == 4
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        assert params["head.loss"] in ("normface", "arcface")
        assert {"inter.sample_ratio", "inter.sampling", "optim.lr", "head.scale"} <= set(params)
        if params["head.loss"] == "arcface":
            assert {"intra.margin", "intra.margin_grad"} <= set(params)
        assert {"verification_accuracy", "head_flops_per_sample", "loss",
                "intra_positive_logit", "inter_negative_lse"} <= set(metrics)
        outcome = child.data.tags[OUTCOME_TAG]
        expected_status = {"complete": "FINISHED", "pruned": "KILLED"}[outcome]
        assert child.info.status == expected_status
        history = client.get_metric_history(child.info.run_id, "verification_accuracy")
        assert [m.step for m in history] == list(range(2 if outcome == "complete" else 1))


@pytest.mark.slow
def test_pruned_trials_stay_off_the_front_and_out_of_optuna_completes(
        finished_study: dict) -> None:
    options, result, client = (finished_study[k] for k in ("options", "result", "client"))
    study = optuna.load_study(study_name=options.name, storage=options.optuna_url)
    states = [t.state for t in study.trials]
    children = client.search_runs([result.experiment_id],
                                  filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = "
                                                f"'{result.parent_run_id}'")
    outcomes = [c.data.tags[OUTCOME_TAG] for c in children]
    assert len(study.trials) == 4
    assert states.count(optuna.trial.TrialState.COMPLETE) == outcomes.count("complete") == 2
    assert states.count(optuna.trial.TrialState.PRUNED) == outcomes.count("pruned") == 2
    pruned = [c for c in children if c.data.tags[OUTCOME_TAG] == "pruned"]
    assert all(c.info.status == "KILLED" and c.data.params["optim.lr"] == str(STALLS)
               for c in pruned)
    complete_ids = {c.info.run_id for c in children
                    if c.data.tags[OUTCOME_TAG] == "complete"}
    assert {p["run_id"] for p in result.front} <= complete_ids


@pytest.mark.slow
def test_best_trial_beats_its_untrained_network(finished_study: dict) -> None:
    """The best completed trial's loss fell epoch by epoch, and it beats the untrained network
    of its own config (its ``trial.yaml``) and seed (measured: loss 15.6 → 7.4, verification
    0.56 → 0.79)."""
    result, client = finished_study["result"], finished_study["client"]
    completed = client.search_runs(
        [result.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{result.parent_run_id}' "
                      f"AND tags.`{OUTCOME_TAG}` = 'complete'")
    best = max(completed, key=lambda run: run.data.metrics["verification_accuracy"])
    assert_loss_falls(logged_epoch_losses(client, best.info.run_id), 0.7)
    assert_learned(run_trial_config(client, best.info.run_id), best.data.metrics, 0.1)


@pytest.mark.slow
def test_pareto_artifacts_equal_a_recomputation_from_mlflow(finished_study: dict) -> None:
    options, result, client = (finished_study[k] for k in ("options", "result", "client"))
    recomputed = non_dominated(completed_points(client, result.experiment_id,
                                                result.parent_run_id))
    table = pq.read_table(options.output / "pareto.parquet").to_pydict()
    assert table["run_id"] == [p.run_id for p in recomputed]
    assert table["verification_accuracy"] == [p.accuracy for p in recomputed]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "pareto")}
    assert artifacts == {"pareto/pareto.csv", "pareto/pareto.parquet", "pareto/pareto.png"}
    configs = client.list_artifacts(result.parent_run_id, "configs")
    assert len(configs) == len(result.exported) >= 1


@pytest.mark.slow
def test_exported_config_runs_through_workers_train(finished_study: dict,
                                                   tmp_path: Path) -> None:
    exported = Path(finished_study["result"].exported[0])
    config = parse_trial_config(yaml.safe_load(exported.read_text()), str(exported))
    assert config.loss.name in ("normface", "arcface")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.run(
        [sys.executable, "-m", "workers.train", "--config", str(exported),
         "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
        env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    assert (tmp_path / "out" / "class_centres" / "manifest.json").is_file()
    # the config's epochs, each kept in a checkpoint beside its metrics (measured as in the
    # study: loss 15.6 → 7.4, verification 0.56 → 0.79)
    storage = tmp_path / "out" / "ray_storage" / "train"
    epochs = sorted((json.loads(path.read_text())
                     for path in storage.glob("checkpoint_*/metrics.json")),
                    key=lambda metrics: metrics["epoch"])
    assert [metrics["epoch"] for metrics in epochs] == list(range(config.epochs))
    assert_loss_falls([metrics["loss"] for metrics in epochs], 0.7)
    assert_learned(config, epochs[-1], 0.1)


def test_resume_command_repeats_the_flags_with_resume_and_name() -> None:
    argv = ["--space", "arcface", "cosface", "--name", "old", "--tracking-uri",
            "http://bob:s3cret@h:5000", "--resume", "--set", "optim.lr=1e-3", "--name=x"]
    assert resume_command(argv, "margins") == (
        "python study/run.py --space arcface cosface --tracking-uri 'http://bob:***@h:5000' "
        "--set optim.lr=1e-3 --resume --name margins")


class _FakeMlflow(http.server.BaseHTTPRequestHandler):
    """Answers like an MLflow server with basic auth for user ``u``, password ``p``."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(b"u:p").decode()
        authorised = self.headers.get("Authorization") == expected
        status, body = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}) if authorised else (
            401, {"error_code": "UNAUTHENTICATED"})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def test_tracking_server_must_answer_mlflow_api_with_the_credentials(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        def options(uri: str) -> Any:
            return options_from_args(build_parser().parse_args(
                ["--storage", str(tmp_path), "--tracking-uri", uri]))

        assert options(f"http://u:p@127.0.0.1:{port}").tracking_credentials == {
            "MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "p"}
        with pytest.raises(UsageError, match=r"^--tracking-uri = 'http://u:\*\*\*@127.0.0.1:"
                                             rf"{port}': the MLflow server refused access "
                                             r"\(HTTP 401\)"):
            options(f"http://u:wrong@127.0.0.1:{port}")
    finally:
        server.shutdown()


def test_set_values_are_read_as_config_files_are(tmp_path: Path) -> None:
    options = options_from_args(build_parser().parse_args(
        ["--storage", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
         "--set", "optim.lr=1e-3", "--set", "optim.weight_decay=5E-5"]))
    assert options.base["optim"] == {"lr": 1e-3, "weight_decay": 5e-5}


@pytest.mark.slow
def test_the_data_is_loaded_once_per_study_and_every_trial_shares_it(
        finished_study: dict) -> None:
    """One data section, loaded once by the driver: the parent counts one shared split and
    every trial's workers report that they used it instead of loading their own."""
    client, result = finished_study["client"], finished_study["result"]
    assert client.get_run(result.parent_run_id).data.metrics["datasets_shared"] == 1
    children = client.search_runs(
        [result.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{result.parent_run_id}'")
    assert [child.data.metrics["dataset_shared"] for child in children] == [1.0] * 4


@pytest.mark.slow
def test_the_time_breakdown_accounts_for_every_trials_wall_time(finished_study: dict) -> None:
    """Each phase is measured on its own (the workers' timings, MLflow's arrival times); their
    sum is each trial's wall time within 5 %."""
    from study.analysis import PHASES, load_study, time_breakdown

    options = finished_study["options"]
    table = time_breakdown(load_study(options.tracking_uri, options.name))
    assert len(table) == 4 and (table[list(PHASES[:-1])] >= 0).all().all()
    assert ((table["other"].abs() / table["wall"]) <= 0.05).all(), table.to_string()
    assert (table["train"] > 0).all() and (table["startup"] > 0).all()
