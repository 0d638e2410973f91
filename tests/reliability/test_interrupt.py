"""Ctrl-C (SIGINT) mid-study: the study stays resumable and unfinalised, the driver exits
non-zero with the command that resumes it, and that command ends with MLflow and Optuna
agreeing trial by trial."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.searcher import TUNE_TRIAL_ATTR
from study.tracking import OUTCOME_TAG, TRIAL_ID_TAG
from tests.services import ROOT, count_child_runs, stop_process_group, study_env, tiny_study_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

NAME = "ctrl_c"
#: an MLflow child outcome and the Optuna state it must have
STATES = {"complete": optuna.trial.TrialState.COMPLETE,
          "pruned": optuna.trial.TrialState.PRUNED,
          "diverged": optuna.trial.TrialState.FAIL, "failed": optuna.trial.TrialState.FAIL}


def _run(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group; stdout and stderr go to ``log.out|err``."""
    with log.with_suffix(".out").open("wb") as out, log.with_suffix(".err").open("wb") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=study_env(), cwd=ROOT,
                                start_new_session=True)


def test_sigint_leaves_the_study_resumable_and_resume_agrees_trial_by_trial(
        tmp_path: Path) -> None:
    database = tmp_path / "mlflow.db"
    command = tiny_study_command(NAME, tmp_path, "--space", "cosface", "--trials", "2",
                                 "--concurrent", "1", "--scheduler", "none")
    driver = _run(command, tmp_path / "first")
    try:
        deadline = time.monotonic() + 300
        while count_child_runs(database, "RUNNING") < 1:
            assert driver.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial started in time"
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGINT)
        driver.wait(timeout=300)
    finally:
        stop_process_group(driver)
    out, err = (tmp_path / "first.out").read_text(), (tmp_path / "first.err").read_text()
    assert driver.returncode == 130, err[-3000:]
    hints = [line for line in err.splitlines() if "resume" in line.lower()]
    assert len(hints) == 1 and hints[0] == err.rstrip().splitlines()[-1], err[-3000:]
    assert hints[0].startswith(f"error: study {NAME} interrupted; resume it with: python "
                               "study/run.py ")
    assert hints[0].endswith(f" --resume --name {NAME}")
    assert "finished" not in out and "Pareto front" not in out

    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.get_experiment_by_name(NAME)
    parents = [run for run in client.search_runs([experiment.experiment_id])
               if MLFLOW_PARENT_RUN_ID not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status != "FINISHED"
    storage = f"sqlite:///{tmp_path / 'studies' / NAME / 'optuna.db'}"
    asked = optuna.load_study(study_name=NAME, storage=storage).trials
    assert asked and all(t.state in (optuna.trial.TrialState.RUNNING,
                                     optuna.trial.TrialState.COMPLETE) for t in asked)

    # the printed command, as a user would paste it (python = this interpreter)
    resume = shlex.split(hints[0].partition("resume it with: ")[2])
    assert resume[:2] == ["python", "study/run.py"]
    resumed = _run([sys.executable, *resume[1:]], tmp_path / "second")
    try:
        resumed.wait(timeout=500)
    finally:
        stop_process_group(resumed)
    assert resumed.returncode == 0, (tmp_path / "second.err").read_text()[-3000:]

    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if MLFLOW_PARENT_RUN_ID not in run.data.tags]
    children = {run.data.tags[TRIAL_ID_TAG]: run for run in runs
                if MLFLOW_PARENT_RUN_ID in run.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = optuna.load_study(study_name=NAME, storage=storage).trials
    assert sorted(t.user_attrs[TUNE_TRIAL_ATTR] for t in trials) == sorted(children)
    assert len(trials) == 2
    for trial in trials:
        child = children[trial.user_attrs[TUNE_TRIAL_ATTR]]
        outcome = child.data.tags[OUTCOME_TAG]
        assert trial.state == STATES[outcome], (trial.number, outcome, trial.state)
        if outcome == "complete":
            assert child.info.status == "FINISHED"
            assert trial.values == [child.data.metrics["verification_accuracy"],
                                    child.data.metrics["head_flops_per_sample"]]
