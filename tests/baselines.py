"""What a training test must beat: the trial's own network before its first optimizer step.

``untrained_metrics(trial)`` builds the trial's runtime in this process at world size 1 with
``workers.train_loop.build_runtime`` — the same seed, so the same initial backbone (every rank
of a run builds it from that seed, and DDP broadcasts rank 0's), the same data split, held-out
subset and pair files — and evaluates it with the loop's own ``evaluate``. Its verification
metrics are therefore exactly what the run would report at "epoch −1" (the ranks of a run only
split the embedding work). Cached per config: a test module pays for each config once.

``assert_learned`` then asks the trained metrics to beat that baseline by a margin, and
``assert_loss_falls`` the training loss (the epoch mean the loop reports as ``loss``) to fall
from the first epoch given to the last (``kept_epoch_losses`` reads them from a Ray Train
result, ``logged_epoch_losses`` from a study's MLflow run).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import yaml

from workers.config import TrialConfig, parse_trial_config
from workers.train_loop import build_runtime, evaluate

if TYPE_CHECKING:
    import ray.train
    from mlflow.tracking import MlflowClient

OBJECTIVE = "verification_accuracy"


def untrained_metrics(trial: TrialConfig) -> dict[str, float]:
    """``evaluate`` of ``trial``'s runtime before any step (world size 1, CPU)."""
    return dict(_untrained(trial.to_yaml()))


@functools.cache
def _untrained(config: str) -> tuple[tuple[str, float], ...]:
    trial = parse_trial_config(yaml.safe_load(config))
    runtime = build_runtime(trial, 0, 1, torch.device("cpu"), None)
    return tuple(evaluate(runtime).items())


def assert_learned(trial: TrialConfig, trained: Mapping[str, float], margin: float,
                   metric: str = OBJECTIVE) -> None:
    """``trained[metric]`` beats the untrained network of ``trial`` by more than ``margin``."""
    untrained = untrained_metrics(trial)[metric]
    assert trained[metric] > untrained + margin, (
        f"{metric}: trained {trained[metric]:.4f} is not above the untrained network's "
        f"{untrained:.4f} + {margin}")


def kept_epoch_losses(result: ray.train.Result) -> list[float]:
    """The training loss of each epoch whose checkpoint a Ray Train run kept, in order
    (``ray.train.Result.metrics_dataframe``: ``checkpoint.keep`` ≥ epochs keeps them all)."""
    return [float(loss) for loss in result.metrics_dataframe["loss"]]


def logged_epoch_losses(client: MlflowClient, run_id: str) -> list[float]:
    """The training loss a study logged for trial run ``run_id``, in epoch order (MLflow
    step = epoch)."""
    history = client.get_metric_history(run_id, "loss")
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


def assert_loss_falls(losses: Sequence[float], factor: float) -> None:
    """The last epoch's mean training loss is below ``factor`` × the first epoch's."""
    assert len(losses) >= 2, f"one epoch's loss cannot fall: {list(losses)}"
    assert losses[-1] < factor * losses[0], (
        f"training loss {list(losses)}: the last is not below {factor} × the first")
