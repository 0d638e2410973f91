"""MLflow params by side, metric filtering, and the retrying client against a real store."""

from __future__ import annotations

from pathlib import Path

import pytest

from study.tracking import RetryingClient, numeric_metrics, side_params
from workers.config import parse_trial_config


def test_params_are_named_by_side() -> None:
    trial = parse_trial_config({
        "loss": {"name": "dsoftmax", "hyperparameters": {"d": 0.8, "w_inter": 2.0}},
        "head": {"sample_ratio": 0.1, "sampling": "uniform"}}).model_dump(mode="json")
    params = side_params(trial)
    assert params["head.loss"] == "dsoftmax"
    assert params["intra.d"] == "0.8"
    assert params["inter.w_inter"] == "2.0"
    assert params["inter.sample_ratio"] == "0.1"
    assert params["inter.sampling"] == "uniform"
    assert params["head.chunk_size"] == "None"  # auto
    assert params["optim.lr"] == "0.1"
    assert params["trial.epochs"] == "2"
    assert all(isinstance(v, str) for v in params.values())


def test_numeric_metrics_drop_strings_and_booleans() -> None:
    result = {"loss": 1.5, "epoch": 2, "done": False, "space_name": "x", "flag": True,
              "checkpoint_path": "/x", "verification_accuracy": 0.7}
    assert numeric_metrics(result) == {"loss": 1.5, "epoch": 2.0, "verification_accuracy": 0.7}


def test_writes_queue_while_the_store_is_unreachable_and_flush_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries: minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    client = RetryingClient(f"sqlite:///{tmp_path / 'mlflow.db'}", attempts=2, first_delay=0.01)
    experiment = client.call("create_experiment", "e")
    run_id = client.call("create_run", experiment).info.run_id
    real = client.client
    client.client = RetryingClient("http://127.0.0.1:9", attempts=1).client  # nothing listens
    client.write("log_metric", run_id, "m", 1.0, step=0)
    client.write("log_metric", run_id, "m", 2.0, step=1)
    assert len(client.pending) == 2
    with pytest.raises(Exception):  # noqa: B017 - any transport error
        client.flush()
    client.client = real
    client.write("log_metric", run_id, "m", 3.0, step=2)
    assert client.pending == []
    history = real.get_metric_history(run_id, "m")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0), (2, 3.0)]
