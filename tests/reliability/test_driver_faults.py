"""Driver faults: the driver killed mid-study then resumed, and a trial that diverges."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune import ExperimentAnalysis

from study.searcher import TUNE_TRIAL_ATTR
from study.tracking import OUTCOME_TAG, TRIAL_ID_TAG
from tests.services import (
    child_trial_ids,
    count_child_runs,
    stop_process_group,
    study_env,
    tiny_study_command,
)

pytestmark = pytest.mark.slow


#: trials the killed study is asked for
TRIALS = 3


@pytest.mark.timeout(900)
def test_killed_driver_resumes_without_losing_or_duplicating_trials(tmp_path: Path) -> None:
    """SIGKILL while the second trial runs: Tune's saved state (written once, as the first
    trial was queued) holds neither that trial nor the first one's end, so the resume reruns
    the first into its own child run and closes the second as interrupted."""
    database, tune_dir = tmp_path / "mlflow.db", tmp_path / "studies" / "killed" / "tune"
    command = tiny_study_command("killed", tmp_path, "--space", "cosface", "--trials",
                                 str(TRIALS), "--concurrent", "1", "--scheduler", "none")
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env={**study_env(), "TUNE_GLOBAL_CHECKPOINT_S": "3600"},
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (count_child_runs(database, "FINISHED")
                   and count_child_runs(database, "RUNNING")):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no second trial started in time"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        stop_process_group(driver)
    killed = set(child_trial_ids(database, "RUNNING"))  # left open by the dead driver
    assert len(killed) == 1 and count_child_runs(database, "FINISHED") == 1
    saved = {trial.trial_id for trial in ExperimentAnalysis(str(tune_dir)).trials}
    assert not killed & saved, "Tune saved the running trial: a resume would finish it"

    with log.open("a") as out:
        resumed = subprocess.Popen([*command, "--resume"], stdout=out, stderr=subprocess.STDOUT,
                                   env=study_env(), start_new_session=True)
    try:
        assert resumed.wait(timeout=500) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(resumed)

    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("killed")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_ids = [c.data.tags[TRIAL_ID_TAG] for c in children]
    assert len(trial_ids) == len(set(trial_ids)), "a trial has two child runs"
    assert all(c.info.status != "RUNNING" for c in children)
    outcomes = {c.data.tags[TRIAL_ID_TAG]: c.data.tags[OUTCOME_TAG] for c in children}
    # the killed trial, which the resumed Tune does not know, is closed as interrupted
    assert {i for i, outcome in outcomes.items() if outcome == "interrupted"} == killed
    assert list(outcomes.values()).count("complete") == TRIALS
    assert all(c.info.status == "KILLED" for c in children if c.data.tags[TRIAL_ID_TAG] in killed)
    assert parents[0].data.metrics["interrupted_trials"] == len(killed)
    for child in children:
        history = client.get_metric_history(child.info.run_id, "verification_accuracy")
        assert len(history) == (1 if child.data.tags[OUTCOME_TAG] == "complete" else 0)

    study = optuna.load_study(study_name="killed",
                              storage=f"sqlite:///{tmp_path / 'studies' / 'killed' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    # every started trial once, tied to its child run; one asked for just before the kill
    # whose Tune trial never started has no child run and is FAIL, marked never_started
    started = [t for t in study.trials if t.user_attrs.get(OUTCOME_TAG) != "never_started"]
    assert sorted(t.user_attrs[TUNE_TRIAL_ATTR] for t in started) == sorted(trial_ids)
    assert [t.state for t in started].count(optuna.trial.TrialState.COMPLETE) == TRIALS
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials
               if t not in started or t.user_attrs[TUNE_TRIAL_ATTR] in killed)


def test_diverging_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    space = tmp_path / "unstable.yaml"
    space.write_text(
        "version: 1\nname: unstable\nloss: softmax\n"
        "fixed:\n  optim: {grad_clip_norm: null, momentum: 0.9}\n"
        "params:\n  optim.lr: {distribution: categorical, choices: [0.05, 10.0]}\n"
        "  head.sample_ratio: {distribution: uniform, low: 0.5, high: 1.0}\n")
    database = tmp_path / "mlflow.db"
    # RandomSampler(seed=5) asks lr = 10, 0.05, 0.05: softmax at lr 10 without clipping diverges
    command = tiny_study_command("unstable", tmp_path, "--space", str(space), "--trials", "3",
                                 "--concurrent", "1", "--scheduler", "none", "--sampler", "random",
                                 "--seed", "5")
    process = subprocess.run(command, capture_output=True, text=True, timeout=500,
                             env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("unstable")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if MLFLOW_PARENT_RUN_ID in r.data.tags]
    by_outcome = {c.data.tags[OUTCOME_TAG]: c for c in children}
    assert sorted(c.data.tags[OUTCOME_TAG] for c in children) == ["complete", "complete",
                                                                   "diverged"]
    diverged = by_outcome["diverged"]
    assert diverged.info.status == "FAILED" and diverged.data.tags["diverged"] == "true"
    assert diverged.data.params["optim.lr"] == "10.0"
    assert "verification_accuracy" not in diverged.data.metrics
    study = optuna.load_study(study_name="unstable",
                              storage=f"sqlite:///{tmp_path / 'studies/unstable/optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
