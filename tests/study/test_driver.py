"""The driver without Ray: the Tuner it builds, where MLflow puts artifacts, a name MLflow
already holds, and how a SIGINT is noticed."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import ASHAScheduler

from study.driver import InterruptWatch, build_tuner, check_new_study, open_parent_run
from study.options import StudyOptions
from study.progress import ProgressView
from study.run import build_parser, options_from_args
from study.searcher import ACCURACY, COMPUTE
from workers.config import ConfigError


def _options(tmp_path: Path, *flags: str, name: str = "s") -> StudyOptions:
    return options_from_args(build_parser().parse_args([
        "--name", name, "--storage", str(tmp_path / "studies"),
        "--tracking-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", *flags]))


def _long_space(tmp_path: Path) -> Path:
    """A space whose trials run 3 epochs on 2 workers, whatever the flags say."""
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "name": "long", "loss": "cosface",
        "fixed": {"epochs": 3, "resources": {"num_workers": 2}},
        "params": {"loss.margin": {"distribution": "uniform", "low": 0.2, "high": 0.4}}}))
    return path


def test_epochs_and_resources_come_from_the_trial_configs(tmp_path: Path) -> None:
    options = _options(tmp_path, "--space", str(_long_space(tmp_path)), "--epochs", "1",
                       "--workers", "1", "--concurrent", "4")
    options.study_dir.mkdir(parents=True)
    tuner = build_tuner(options, "0", "parent", {"CPU": 2.0})
    config = tuner._local_tuner._tune_config  # the Tuner has no public accessor
    # ASHA over the trials' 3 epochs, not the flag's 1 (with 1 there would be no ASHA at all)
    assert isinstance(config.scheduler, ASHAScheduler) and config.scheduler._max_t == 3
    # 0.1 + 2 workers × 0.45 = 1 CPU per trial: 2 fit on 2 CPUs (1 worker would let 3 in)
    assert config.max_concurrent_trials == 2
    # a result at the second of 3 epochs is an early stop, at the third a completed trial
    searcher = config.search_alg
    for trial_id, epoch in (("early", 1), ("full", 2)):
        assert searcher.suggest(trial_id)["trial"]["epochs"] == 3
        searcher.on_trial_complete(trial_id, {"epoch": epoch, ACCURACY: 0.5, COMPUTE: 1e6})
    states = {t.user_attrs["tune_trial_id"]: t.state for t in searcher.study.trials}
    assert states == {"early": optuna.trial.TrialState.PRUNED,
                      "full": optuna.trial.TrialState.COMPLETE}
    progress = next(c for c in tuner._local_tuner.get_run_config().callbacks
                    if isinstance(c, ProgressView))
    lines: list[str] = []
    progress.stream = SimpleNamespace(write=lines.append, flush=lambda: None,
                                      isatty=lambda: False)
    trial = SimpleNamespace(trial_id="early", config={"trial": {"epochs": 3}},
                            last_result={"epoch": 1, ACCURACY: 0.5, COMPUTE: 1e6})
    progress.on_trial_complete(0, [], trial)
    assert " · pruned 1 · " in lines[-1] and " · complete 0 · " in lines[-1]


def test_mlflow_artifacts_go_beside_the_store_not_into_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    options = _options(tmp_path, "--space", "cosface")
    experiment_id, run_id = open_parent_run(options)
    client = MlflowClient(options.tracking_uri)
    location = tmp_path / "store" / "mlflow-artifacts" / "s"
    assert client.get_experiment(experiment_id).artifact_location == location.as_uri()
    assert client.get_run(run_id).info.artifact_uri.startswith(location.as_uri())
    assert (location / run_id / "artifacts" / "spaces" / "cosface.yaml").is_file()
    assert not list(elsewhere.iterdir())  # no ./mlruns, nothing else
    assert options.study_dir.is_dir()  # the mark --resume looks for


def test_a_new_study_may_not_reuse_a_name_mlflow_holds(tmp_path: Path) -> None:
    open_parent_run(_options(tmp_path, "--space", "cosface"))
    # the same MLflow store, another --storage: the runs would join the first study
    options = options_from_args(build_parser().parse_args([
        "--name", "s", "--storage", str(tmp_path / "other"), "--space", "cosface",
        "--tracking-uri", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"]))
    with pytest.raises(ConfigError) as error:
        check_new_study(options)
    assert len(error.value.lines) == 1
    assert error.value.lines[0].startswith("--name s: MLflow (sqlite:///")
    assert error.value.lines[0].endswith("pick another --name")


def test_interrupt_watch_notes_sigint_and_hands_it_to_the_handler_in_place() -> None:
    received: list[int] = []

    def tune_handler(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGINT, tune_handler)
    try:
        InterruptWatch.received.clear()
        InterruptWatch().setup()
        assert not InterruptWatch.received.is_set()
        signal.raise_signal(signal.SIGINT)
        assert InterruptWatch.received.is_set() and received == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
        InterruptWatch.received.clear()
