"""MLflow params by side, metric filtering, and the retrying client against a real store."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.tracking import (
    OUTCOME_TAG,
    TRIAL_ID_TAG,
    ChildRunCallback,
    RetryingClient,
    numeric_metrics,
    side_params,
)
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


def _unreachable(monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A client of a store that refuses connections (and MLflow's own retries off)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    return MlflowClient("http://127.0.0.1:9")  # nothing listens


def test_a_trial_that_starts_during_an_outage_gets_its_run_when_the_store_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening the run, its params, config and every result wait in the queue, in order; once
    the store answers, the trial has exactly one run holding all of them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowClient(uri)
    experiment = store.create_experiment("study")
    parent = store.create_run(experiment).info.run_id
    callback = ChildRunCallback(uri, experiment, parent, "study")
    callback.client.attempts, callback.client.first_delay = 1, 0.0
    real = callback.client.client
    callback.client.client = _unreachable(monkeypatch)
    trial_config = parse_trial_config({"loss": {"name": "cosface"}, "epochs": 3})
    trial = SimpleNamespace(trial_id="t1", config={"space_name": "cosface",
                                                   "trial": trial_config.model_dump(mode="json")},
                            last_result=None)
    callback.on_trial_start(0, [], trial)
    for epoch in range(2):
        callback.on_trial_result(0, [], trial, {"epoch": epoch, "loss": 3.0 - epoch})
    assert callback.runs["t1"].run_id is None and len(callback.client.pending) > 3
    restored = pickle.loads(pickle.dumps(callback))  # Tune's checkpoint of the callback
    assert restored.runs == {}  # a run not yet opened is opened again after a restore
    callback.client.client = real
    trial.last_result = {"epoch": 2, "loss": 1.0}
    callback.on_trial_result(0, [], trial, trial.last_result)
    callback.on_trial_complete(0, [], trial)
    assert callback.client.pending == []
    (child,) = store.search_runs([experiment],
                                 filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")
    assert child.info.run_id == callback.runs["t1"].run_id
    assert child.data.tags[TRIAL_ID_TAG] == "t1" and child.data.tags[OUTCOME_TAG] == "complete"
    assert child.info.status == "FINISHED" and child.data.params["head.loss"] == "cosface"
    history = store.get_metric_history(child.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert [a.path for a in store.list_artifacts(child.info.run_id)] == ["trial.yaml"]
    # a resumed study finds the run again (no second one) and skips the epochs it holds
    resumed = ChildRunCallback(uri, experiment, parent, "study")
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_result(0, [], trial, {"epoch": 2, "loss": 9.0})
    assert resumed.runs["t1"].run_id == child.info.run_id
    assert len(store.get_metric_history(child.info.run_id, "loss")) == 3
