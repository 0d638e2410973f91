"""The accuracy-vs-compute Pareto front, computed from what MLflow holds, and its exports.

A point is a completed child run (outcome ``complete``): its final verification accuracy
(higher is better) and head FLOPs per sample (lower is better). A run is on the front when no
other run is at least as good in both and strictly better in one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.searcher import ACCURACY, COMPUTE
from study.tracking import OUTCOME_TAG, SPACE_TAG, TRIAL_ID_TAG
from workers.config import TrialConfig, parse_trial_config, read_yaml

#: extra columns of the front table, when the runs have them
TABLE_METRICS = ("verification_accuracy_std", "roc_auc", "heldout_intra_compactness",
                 "heldout_inter_separation_mean", "samples_per_second", "epoch_train_seconds")


@dataclass(frozen=True)
class Point:
    """One completed trial as the front sees it."""

    run_id: str
    trial_id: str
    space: str
    accuracy: float
    flops: float
    metrics: dict[str, float]
    params: dict[str, str]


def non_dominated(points: Sequence[Point]) -> list[Point]:
    """Points no other point dominates (accuracy ↑, flops ↓), sorted by flops."""
    front = [
        p for p in points
        if not any(q.accuracy >= p.accuracy and q.flops <= p.flops
                   and (q.accuracy > p.accuracy or q.flops < p.flops) for q in points)
    ]
    return sorted(front, key=lambda p: (p.flops, -p.accuracy))


def completed_points(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Point]:
    """Every completed child run of the parent, read back from MLflow."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and "
                                       f"tags.`{OUTCOME_TAG}` = 'complete'",
        max_results=50_000)
    return [
        Point(run.info.run_id, run.data.tags.get(TRIAL_ID_TAG, ""),
              run.data.tags.get(SPACE_TAG, ""), run.data.metrics[ACCURACY],
              run.data.metrics[COMPUTE], dict(run.data.metrics), dict(run.data.params))
        for run in runs if ACCURACY in run.data.metrics and COMPUTE in run.data.metrics
    ]


def best_at_budget(points: Sequence[Point], budget_fraction: float) -> Point | None:
    """The most accurate point whose FLOPs are ≤ ``budget_fraction`` × the largest FLOPs."""
    if not points:
        return None
    budget = budget_fraction * max(p.flops for p in points)
    affordable = [p for p in points if p.flops <= budget]
    return max(affordable, key=lambda p: (p.accuracy, -p.flops)) if affordable else None


def front_table(front: Sequence[Point]) -> pa.Table:
    """The front as a table: ids, space, both objectives, the side params and key metrics."""
    param_keys = sorted({k for p in front for k in p.params
                         if k.split(".")[0] in ("intra", "inter", "head", "optim")})
    columns: dict[str, list[Any]] = {
        "run_id": [p.run_id for p in front], "trial_id": [p.trial_id for p in front],
        "space": [p.space for p in front], ACCURACY: [p.accuracy for p in front],
        COMPUTE: [p.flops for p in front],
    }
    for metric in TABLE_METRICS:
        columns[metric] = [p.metrics.get(metric) for p in front]
    for key in param_keys:
        columns[key] = [p.params.get(key) for p in front]
    return pa.table(columns)


def write_front(front: Sequence[Point], points: Sequence[Point], directory: Path) -> list[Path]:
    """``pareto.csv``, ``pareto.parquet`` and ``pareto.png`` in ``directory``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    table = front_table(front)
    pyarrow.csv.write_csv(table, directory / "pareto.csv")
    pq.write_table(table, directory / "pareto.parquet")
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for space in sorted({p.space for p in points}):
        chosen = [p for p in points if p.space == space]
        axes.scatter([p.flops for p in chosen], [p.accuracy for p in chosen], label=space,
                     alpha=0.7)
    axes.plot([p.flops for p in front], [p.accuracy for p in front], "k--", lw=1,
              label="Pareto front")
    axes.set_xscale("log")
    axes.set_xlabel("head FLOPs per sample (log)")
    axes.set_ylabel("verification accuracy")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(directory / "pareto.png")
    plt.close(figure)
    return [directory / "pareto.csv", directory / "pareto.parquet", directory / "pareto.png"]


def export_configs(client: MlflowClient, front: Sequence[Point], best: Point | None,
                   directory: Path) -> list[Path]:
    """The front's trial configs (and the best-at-budget one) as versioned YAML files.

    Each is the child run's own ``trial.yaml`` artifact, exactly what
    ``python -m workers.train --config`` accepts.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    chosen = [(f"front_{i:02d}_{p.space}_{p.trial_id}.yaml", p) for i, p in enumerate(front)]
    if best is not None:
        chosen.append(("best_at_budget.yaml", best))
    for name, point in chosen:
        (directory / name).write_text(run_trial_config(client, point.run_id).to_yaml())
        written.append(directory / name)
    return written


def run_trial_config(client: MlflowClient, run_id: str) -> TrialConfig:
    """The trial config of child run ``run_id``: its own ``trial.yaml`` artifact, validated."""
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(client.download_artifacts(run_id, "trial.yaml", scratch))
        return parse_trial_config(read_yaml(local, "trial config"), f"run {run_id}")
