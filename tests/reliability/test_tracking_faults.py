"""Tracking-store and storage trouble: refused up front when unreachable or unwritable; an
outage mid-study loses no result; credentials in the tracking URI are never logged."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.tracking import OUTCOME_TAG
from tests.services import (
    MlflowServer,
    free_port,
    stop_process_group,
    study_env,
    tiny_study_command,
)

EPOCHS = 2
TRIALS = 2


def _refused(command: list[str]) -> tuple[str, float]:
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, timeout=60,
                             env=study_env())
    assert process.returncode == 2, process.stderr[-2000:]
    return process.stderr.strip(), time.perf_counter() - started


def test_unreachable_tracking_server_is_refused_before_ray_starts(tmp_path: Path) -> None:
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    stderr, seconds = _refused(tiny_study_command("nowhere", tmp_path, "--tracking-uri", uri))
    assert stderr == (f"error: --tracking-uri = '{uri.replace('hunter2', '***')}' is "
                      "unreachable (Connection refused); start the MLflow server or fix the URI")
    assert seconds < 10 and not (tmp_path / "studies" / "nowhere").exists()


@pytest.mark.parametrize("storage", ["file", "proc"])
def test_unwritable_storage_is_refused_up_front(tmp_path: Path, storage: str) -> None:
    # tests run as root, which may write anywhere chmod forbids: use places nobody can write
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = {"file": blocker / "studies", "proc": Path("/proc/marginlab-studies")}[storage]
    stderr, seconds = _refused(tiny_study_command("blocked", tmp_path, "--storage", str(path)))
    assert stderr.startswith(f"error: --storage: {path} is not writable (")
    assert len(stderr.splitlines()) == 1 and seconds < 10


@pytest.mark.slow
def test_tracking_outage_mid_study_loses_no_result_and_logs_no_secret(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "server")
    uri = f"http://alice:hunter2@127.0.0.1:{server.port}"  # the server ignores credentials
    command = tiny_study_command("outage", tmp_path, "--space", "cosface", "--trials",
                                 str(TRIALS), "--concurrent", "1", "--epochs", str(EPOCHS),
                                 "--scheduler", "none", "--tracking-uri", uri,
                                 "--set", "data.samples_per_identity=24")
    log_path = tmp_path / "driver.log"
    try:
        server.start()
        client = MlflowClient(server.url)
        with log_path.open("w") as log:
            driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                      env=study_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not _first_metric_logged(client):
                assert driver.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no result reached MLflow in time"
                time.sleep(0.5)
            server.stop()  # the store goes away while trials keep reporting
            time.sleep(15)
            server.start()
            assert driver.wait(timeout=900) == 0, log_path.read_text()[-3000:]
        finally:
            if driver.poll() is None:
                stop_process_group(driver)

        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
        assert len(children) == TRIALS
        for child in children:
            assert child.data.tags[OUTCOME_TAG] == "complete"
            for metric in ("epoch", "verification_accuracy", "loss"):
                history = client.get_metric_history(child.info.run_id, metric)
                assert sorted(m.step for m in history) == list(range(EPOCHS)), metric
        for run in runs:
            logged = {**run.data.params, **run.data.tags}
            assert not any("hunter2" in f"{k}{v}" for k, v in logged.items())
        assert "hunter2" not in log_path.read_text()
    finally:
        server.stop()


def _first_metric_logged(client: MlflowClient) -> bool:
    experiment = client.get_experiment_by_name("outage")
    if experiment is None:
        return False
    return any("epoch" in run.data.metrics for run in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` != ''"))
