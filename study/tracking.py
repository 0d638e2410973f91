"""MLflow, written by the driver only: one parent run per study, one child run per trial.

Child runs carry the tag ``mlflow.parentRunId`` (the UI nests them), the trial id
(``marginlab.trial_id``: a resumed study finds its runs again instead of duplicating them), the
trial config as ``trial.yaml`` and params named by side — ``intra.*`` (what shapes the positive
logit), ``inter.*`` (what shapes the negatives), ``head.*``, ``optim.*``, then ``model.*``,
``data.*``, ``trial.*``. Metrics are logged with one ``log_batch`` per result, at step = epoch.

Tracking-store trouble: every write is retried with exponential back-off; a write that still
fails is kept in an in-memory queue, in order, and flushed before the next write and at the end
of the study — so a Tune result is never dropped while the store is briefly unreachable. A
trial that starts during an outage gets a ``RunHandle``: opening its run waits in the same
queue, ahead of every write that names the handle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray import tune

from study.searcher import trial_outcome

logger = logging.getLogger(__name__)

TRIAL_ID_TAG = "marginlab.trial_id"
STUDY_TAG = "marginlab.study"
OUTCOME_TAG = "marginlab.outcome"
SPACE_TAG = "marginlab.space"

#: loss hyperparameters that shape the positive (intra-class) logit or term
INTRA = {"margin", "m1", "m2", "m3", "d", "w_intra", "lambda_p", "lambda_base", "lambda_min",
         "lambda_gamma", "lambda_power", "margin_grad"}
#: loss hyperparameters that shape the negatives (inter-class) term
INTER = {"w_inter", "lambda_n", "goal_n", "normalized"}
#: head fields that decide which negatives exist
INTER_HEAD = {"sample_ratio", "sampling"}
#: metrics that are not numbers, or that Tune adds and a study does not need
_SKIPPED_METRICS = {"checkpoint_path", "space_name", "trial_id", "date", "hostname", "node_ip",
                    "pid", "experiment_tag", "done", "config"}


def side_params(trial: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a trial config into MLflow params named by side (values as strings)."""
    params: dict[str, Any] = {"head.loss": trial["loss"]["name"]}
    for key, value in trial["loss"]["hyperparameters"].items():
        side = "intra" if key in INTRA else "inter" if key in INTER else "head"
        params[f"{side}.{key}"] = value
    for key, value in trial["head"].items():
        params[f"{'inter' if key in INTER_HEAD else 'head'}.{key}"] = value
    for section in ("optim", "model", "resources", "evaluation", "data"):
        for key, value in _flatten(trial.get(section, {})).items():
            params[f"{section}.{key}"] = value
    for key in ("epochs", "batch_size", "seed", "version"):
        params[f"trial.{key}"] = trial[key]
    return {key: str(value)[:6000] for key, value in params.items()}


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def numeric_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The result's finite-or-not numeric entries (booleans excluded), by name."""
    return {key: float(value) for key, value in result.items()
            if key not in _SKIPPED_METRICS and isinstance(value, int | float)
            and not isinstance(value, bool)}


class RunHandle:
    """A run whose MLflow id is known once the queued operation that opens it has reached the
    store; a write may name the handle in place of the id."""

    __slots__ = ("run_id",)

    def __init__(self) -> None:
        self.run_id: str | None = None


def _resolved(value: Any) -> Any:
    return value.run_id if isinstance(value, RunHandle) else value


class RetryingClient:
    """``MlflowClient`` calls with back-off, and an ordered queue for writes that still fail."""

    def __init__(self, tracking_uri: str, attempts: int = 4, first_delay: float = 0.5) -> None:
        self.client = MlflowClient(tracking_uri)
        self.attempts, self.first_delay = attempts, first_delay
        #: (name, one attempt at the operation), oldest first
        self.pending: list[tuple[str, Callable[[], Any]]] = []

    def _send(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One attempt at ``client.method(*args, **kwargs)``, run handles replaced by ids."""
        return getattr(self.client, method)(*map(_resolved, args),
                                            **{k: _resolved(v) for k, v in kwargs.items()})

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``client.method(*args)`` now, retrying; raises after the last attempt."""
        return _retry(lambda: self._send(method, args, kwargs), self.attempts, self.first_delay)

    def write(self, method: str, *args: Any, **kwargs: Any) -> None:
        """A write that must not be lost: flush the queue, then write (queueing on failure)."""
        self.enqueue(method, lambda: self._send(method, args, kwargs))

    def enqueue(self, name: str, operation: Callable[[], Any]) -> None:
        """Like ``write``, for any operation on the store (one attempt per call of
        ``operation``; retried like a write)."""
        self.pending.append((name, operation))
        self.flush(raise_errors=False)

    def flush(self, raise_errors: bool = True) -> None:
        """Send queued writes in order; stop at the first that still fails."""
        while self.pending:
            name, operation = self.pending[0]
            try:
                _retry(operation, self.attempts, self.first_delay)
            except Exception as error:
                logger.warning("MLflow write %s deferred (%d queued): %s", name,
                               len(self.pending), error)
                if raise_errors:
                    raise
                return
            self.pending.pop(0)


def _retry(operation: Callable[[], Any], attempts: int, first_delay: float) -> Any:
    """``operation()``, retried ``attempts − 1`` times after 1, 2, 4, … × ``first_delay`` s."""
    for attempt in range(attempts - 1):
        try:
            return operation()
        except Exception as error:
            logger.info("MLflow call failed (attempt %d): %s", attempt + 1, error)
            time.sleep(first_delay * 2**attempt)
    return operation()


class ChildRunCallback(tune.Callback):
    """Tune callback (driver process): one MLflow child run per trial, never two."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 study_name: str) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.study_name = parent_run_id, study_name
        self._client: RetryingClient | None = None
        self.runs: dict[str, RunHandle] = {}
        #: the last epoch logged per trial: a restarted trial's repeated results are skipped
        self.logged_epoch: dict[str, int] = {}

    @property
    def client(self) -> RetryingClient:
        if self._client is None:
            self._client = RetryingClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment
        # a run whose opening is still queued is opened again by the restored callback
        runs = {trial_id: run for trial_id, run in self.runs.items() if run.run_id}
        return {**self.__dict__, "_client": None, "runs": runs}

    def _run(self, trial: Any) -> RunHandle:
        """The trial's run; the first call queues opening it, then its params and config
        (idempotent when a resumed study finds the run again)."""
        run = self.runs.get(trial.trial_id)
        if run is None:
            run = self.runs[trial.trial_id] = RunHandle()
            self.client.enqueue("open_run", lambda: self._open(trial, run))
            config = trial.config
            params = [Param(k, v) for k, v in side_params(config["trial"]).items()]
            for start in range(0, len(params), 100):
                self.client.write("log_batch", run, params=params[start:start + 100])
            self.client.write("log_text", run,
                              yaml.safe_dump(config["trial"], sort_keys=False), "trial.yaml")
        return run

    def _open(self, trial: Any, run: RunHandle) -> None:
        """One attempt to find the trial's child run (a resumed study) or create it."""
        client, trial_id = self.client.client, trial.trial_id
        existing = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and "
                          f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'")
        if existing:
            run_id = existing[0].info.run_id
            history = client.get_metric_history(run_id, "epoch")
            self.logged_epoch[trial_id] = max(
                [int(m.value) for m in history] + [self.logged_epoch.get(trial_id, -1)])
            client.update_run(run_id, status="RUNNING")
            run.run_id = run_id
            return
        space = trial.config.get("space_name", "")
        tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, TRIAL_ID_TAG: trial_id,
                STUDY_TAG: self.study_name, SPACE_TAG: space,
                MLFLOW_RUN_NAME: f"{space or 'trial'}-{trial_id}"}
        run.run_id = client.create_run(self.experiment_id, tags=tags,
                                       run_name=tags[MLFLOW_RUN_NAME]).info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        run = self._run(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self.logged_epoch.get(trial.trial_id, -1):
            return  # a resumed trial repeating an epoch MLflow already holds
        self.logged_epoch[trial.trial_id] = step
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, v, timestamp, step) for k, v in numeric_metrics(result).items()]
        self.client.write("log_batch", run, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trial_outcome(trial.last_result, False,
                                          trial.config["trial"]["epochs"]))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "failed")

    def _finish(self, trial: Any, outcome: str) -> None:
        run = self._run(trial)
        tags = [RunTag(OUTCOME_TAG, outcome)]
        if outcome == "diverged":
            step = (trial.last_result or {}).get("diverged_step", "")
            tags += [RunTag("diverged", "true"), RunTag("diverged_step", str(step))]
        self.client.write("log_batch", run, tags=tags)
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(outcome, "FAILED")
        self.client.write("set_terminated", run, status=status)

    def on_experiment_end(self, trials: Iterable[Any], **info: Any) -> None:
        self.client.flush()
