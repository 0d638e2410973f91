"""Tracking-store and storage trouble: refused up front when unreachable or unwritable; during
an outage mid-study the driver queues its writes and loses none; credentials in the tracking
URI are never logged."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.tracking import OUTCOME_TAG
from tests.services import (
    MlflowServer,
    TcpRelay,
    free_port,
    stop_process_group,
    study_env,
    tiny_study_command,
)

#: two trials one after the other, three epochs each: the store is cut off after the first
#: trial's first epoch is logged, and restored once the second trial has started without it
EPOCHS = 3
#: what the driver logs when a write failed its retries and waits in the queue
DEFERRED = "MLflow write log_batch deferred"


def _refused(command: list[str]) -> str:
    """The stderr of ``command``, which must exit with 2 (bad input)."""
    process = subprocess.run(command, capture_output=True, text=True, timeout=60,
                             env=study_env())
    assert process.returncode == 2, process.stderr[-2000:]
    return process.stderr.strip()


def test_unreachable_tracking_server_is_refused_before_ray_starts(tmp_path: Path) -> None:
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    stderr = _refused(tiny_study_command("nowhere", tmp_path, "--tracking-uri", uri))
    assert stderr == (f"error: --tracking-uri = '{uri.replace('hunter2', '***')}' is "
                      "unreachable (Connection refused); start the MLflow server or fix the URI")
    assert not (tmp_path / "studies" / "nowhere").exists()  # refused before the study began


@pytest.mark.parametrize("storage", ["file", "proc"])
def test_unwritable_storage_is_refused_up_front(tmp_path: Path, storage: str) -> None:
    # tests run as root, which may write anywhere chmod forbids: use places nobody can write
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = {"file": blocker / "studies", "proc": Path("/proc/marginlab-studies")}[storage]
    stderr = _refused(tiny_study_command("blocked", tmp_path, "--storage", str(path)))
    assert stderr.startswith(f"error: --storage: {path} is not writable (")
    assert len(stderr.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tracking_outage_mid_study_queues_writes_loses_none_and_logs_no_secret(
        tmp_path: Path) -> None:
    """The store is cut off (connections refused) from the first logged epoch until the driver
    has deferred a write and a trial has started (its run cannot be opened), then restored:
    both trials have one run each and every epoch reaches MLflow exactly once."""
    server = MlflowServer(tmp_path / "server")
    relay = TcpRelay(server.port)
    uri = f"http://alice:hunter2@127.0.0.1:{relay.port}"  # the server ignores credentials
    command = tiny_study_command("outage", tmp_path, "--space", "cosface", "--trials", "2",
                                 "--concurrent", "1", "--epochs", str(EPOCHS),
                                 "--scheduler", "none",
                                 "--tracking-uri", uri,
                                 "--set", "data.samples_per_identity=24")  # epochs of seconds
    # MLflow's own HTTP retries would hold a write for minutes instead of letting it queue
    env = {**study_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    log_path = tmp_path / "driver.log"
    try:
        server.start()
        relay.start()
        client = MlflowClient(server.url)
        with log_path.open("w") as log:
            driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        try:
            _wait_until(lambda: _first_metric_logged(client), driver, log_path,
                        "no result reached MLflow", timeout=300)
            relay.cut()  # the trial still has EPOCHS - 1 epochs to report
            _wait_until(lambda: DEFERRED in log_path.read_text(), driver, log_path,
                        "no write was deferred while the store was unreachable", timeout=120)
            # the second trial's Train run directory: the trial has started, so opening its
            # MLflow run is queued behind the deferred writes
            _wait_until(lambda: len(list(tmp_path.glob("studies/**/train/outage/*"))) == 2,
                        driver, log_path,
                        "the second trial did not start while the store was unreachable",
                        timeout=300)
            assert DEFERRED in log_path.read_text()
            relay.start()
            assert driver.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            stop_process_group(driver)

        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
        assert len(children) == 2
        for child in children:
            assert child.data.tags[OUTCOME_TAG] == "complete"
            assert child.info.status == "FINISHED" and child.data.params["head.loss"] == "cosface"
            for metric in ("epoch", "verification_accuracy", "loss"):
                history = client.get_metric_history(child.info.run_id, metric)
                assert sorted(m.step for m in history) == list(range(EPOCHS)), metric
        for run in runs:
            logged = {**run.data.params, **run.data.tags}
            assert not any("hunter2" in f"{k}{v}" for k, v in logged.items())
        assert "hunter2" not in log_path.read_text()
    finally:
        relay.cut()
        server.stop()


def _wait_until(condition: Callable[[], bool], driver: subprocess.Popen[bytes], log: Path,
                failure: str, timeout: float) -> None:
    """Poll ``condition`` while the driver runs; fail with ``failure`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)


def _first_metric_logged(client: MlflowClient) -> bool:
    experiment = client.get_experiment_by_name("outage")
    if experiment is None:
        return False
    return any("epoch" in run.data.metrics for run in client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` != ''"))
