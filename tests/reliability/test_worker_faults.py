"""A Train worker SIGKILLed mid-trial: Train restarts the run from its last checkpoint, the trial
finishes, and MLflow holds one child run with every epoch exactly once."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.tracking import OUTCOME_TAG
from tests.services import stop_process_group, study_env, tiny_study_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
EPOCHS = 4


def _train_workers(driver: psutil.Process) -> list[psutil.Process]:
    """The driver's Ray Train worker actors (their process title names the actor class)."""
    workers = []
    for process in driver.children(recursive=True):
        try:
            if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return workers


def _logged_epochs(client: MlflowClient, experiment_name: str) -> list[int]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    children = [r for r in client.search_runs([experiment.experiment_id])
                if MLFLOW_PARENT_RUN_ID in r.data.tags]
    if not children:
        return []
    return [int(m.value) for m in client.get_metric_history(children[0].info.run_id, "epoch")]


def test_killed_worker_resumes_from_checkpoint_into_the_same_child_run(tmp_path: Path) -> None:
    command = tiny_study_command(
        "worker_killed", tmp_path, "--space", "arcface", "--trials", "1", "--workers", "2",
        "--epochs", str(EPOCHS), "--scheduler", "none",
        "--set", "data.samples_per_identity=32")  # ~2k samples: an epoch lasts a few seconds
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=study_env(),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _logged_epochs(client, "worker_killed"):  # epoch 0 is checkpointed
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch was reported in time"
            time.sleep(0.5)
        workers = _train_workers(psutil.Process(driver.pid))
        assert len(workers) == 2, [w.cmdline() for w in workers]
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert driver.wait(timeout=500) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        stop_process_group(driver)  # the driver, or what it left in its process group
        log.close()

    experiment = client.get_experiment_by_name("worker_killed")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if MLFLOW_PARENT_RUN_ID in r.data.tags]
    assert len(children) == 1, "the restarted trial got a second child run"
    (child,) = children
    assert child.info.status == "FINISHED" and child.data.tags[OUTCOME_TAG] == "complete"
    history = client.get_metric_history(child.info.run_id, "epoch")
    assert sorted(int(m.value) for m in history) == list(range(EPOCHS))  # each epoch once
    assert [m.step for m in history] == sorted(m.step for m in history)
    restarts = client.get_metric_history(child.info.run_id, "restarts")
    assert restarts[-1].value == 1, "Train did not restart the run from a checkpoint"
    assert len(client.get_metric_history(child.info.run_id, "verification_accuracy")) == EPOCHS
