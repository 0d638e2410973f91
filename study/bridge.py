"""Tune ↔ Train: a Tune function trainable per trial that runs one ``TorchTrainer``.

Ray's ``TuneReportCallback`` can deadlock when the driver consumes results slowly (two
producers into a size-1 queue). Here a Train callback running in the Train controller puts
rank 0's metrics into a Ray queue, and the trial's main thread is the only caller of
``tune.report`` while ``trainer.fit()`` runs in a helper thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.train
from ray import tune
from ray.util.queue import Empty, Queue

from workers.config import parse_trial_config
from workers.data import dataset_key, parse_data_config
from workers.train import build_trainer

#: how long the trial thread waits on the queue before checking whether training ended
POLL_SECONDS = 0.5


class ForwardReports(ray.train.UserCallback):
    """In the Train controller: forward rank 0's metrics (+ checkpoint path) to the trial."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        extra = {"checkpoint_path": checkpoint.path} if checkpoint is not None else {}
        self.queue.put({**metrics[0], **extra})


def run_trial(config: dict[str, Any], storage_path: str, study_name: str,
              max_failures: int = 1, datasets: Mapping[str, Any] | None = None) -> None:
    """The function trainable: ``config = {"space_name": ..., "trial": <trial config>}``.

    Train runs under ``<storage_path>/train/<study_name>/<trial id>``; a worker that dies is
    restarted from the last checkpoint up to ``max_failures`` times. ``datasets`` maps
    ``dataset_key`` to an object ref of the split the study loaded once; a trial whose data
    section is not among them (a searched data field) loads its own.
    """
    trial = parse_trial_config(config["trial"], "sampled trial config")
    queue: Queue = Queue(actor_options={"num_cpus": 0})
    key = dataset_key(parse_data_config(trial.data))
    trainer = build_trainer(trial, Path(storage_path) / "train" / study_name,
                            name=tune.get_context().get_trial_id(),
                            callbacks=[ForwardReports(queue)], max_failures=max_failures,
                            dataset=(datasets or {}).get(key or ""))
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised in the trial thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics = queue.get(timeout=POLL_SECONDS)
        except Empty:
            continue
        tune.report({**metrics, "space_name": config["space_name"]})
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
