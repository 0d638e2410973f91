"""A finished study read back from MLflow: its runs as a table, the front, and plots.

``notebooks/analysis.ipynb`` is a thin view over these functions. Only completed children
(tag ``marginlab.outcome = complete``) count for the front and for the best config per loss,
as in ``study.pareto``; the plots show completed children too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.options import redact_uri
from study.pareto import Point, completed_points, front_table, non_dominated
from study.searcher import ACCURACY, COMPUTE
from study.tracking import OUTCOME_TAG, SPACE_TAG, STUDY_TAG, TRIAL_ID_TAG

#: the param naming a child's loss family
LOSS = "head.loss"
#: the fraction of the classes whose centres each step's softmax sees
SAMPLE_RATIO = "inter.sample_ratio"
#: mean cos(x, its class mean) on held-out identities (higher: tighter classes)
COMPACTNESS = "heldout_intra_compactness"
#: mean cos between held-out class means (lower: classes further apart)
SEPARATION = "heldout_inter_separation_mean"
#: param prefixes that make up a trial's config in the tables
CONFIG_SIDES = ("intra", "inter", "head", "optim")
#: columns every runs table has (NaN where no run logged them), first and in this order
COLUMNS = ("run_id", "trial_id", "space", "outcome", "status", LOSS, SAMPLE_RATIO, ACCURACY,
           COMPUTE, COMPACTNESS, SEPARATION)
_PARENT_FILTER = "tags.`marginlab.role` = 'parent'"


@dataclass(frozen=True)
class StudyRuns:
    """One study as MLflow holds it: the parent run and one row per child run."""

    tracking_uri: str
    name: str
    experiment_id: str
    parent: Run
    #: ``COLUMNS``, then the other config params (``intra.*``, ``inter.*``, ``head.*``,
    #: ``optim.*``; numbers where every value is one) and each metric's last value
    runs: pd.DataFrame


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The children that ran every epoch without diverging (outcome ``complete``)."""
    return runs[runs["outcome"] == "complete"]


def _client(tracking_uri: str) -> MlflowClient:
    """A client for an existing store (a missing sqlite file is an error, not a new store)."""
    path = tracking_uri.removeprefix("sqlite:///")
    if path != tracking_uri and not Path(path).is_file():
        raise ValueError(f"no MLflow store at {redact_uri(tracking_uri)}")
    return MlflowClient(tracking_uri)


def latest_study(tracking_uri: str) -> str:
    """The name of the study whose parent run started last in the store."""
    client = _client(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=_PARENT_FILTER,
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError(f"no study in MLflow at {redact_uri(tracking_uri)}")
    return parents[0].data.tags[STUDY_TAG]


def load_study(tracking_uri: str, study_name: str) -> StudyRuns:
    """The study's parent run (the latest, if the name was reused) and its child runs."""
    client = _client(tracking_uri)
    where = f"study {study_name!r} in MLflow at {redact_uri(tracking_uri)}"
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        raise ValueError(f"no {where}")
    parents = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"{_PARENT_FILTER} and tags.`{STUDY_TAG}` = '{study_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise ValueError(f"no parent run (tag marginlab.role = parent) for {where}")
    parent = parents[0]
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"], max_results=50_000)
    return StudyRuns(tracking_uri, study_name, experiment.experiment_id, parent,
                     _runs_frame(children))


def _runs_frame(children: Sequence[Run]) -> pd.DataFrame:
    """One row per child run; see ``StudyRuns.runs``."""
    rows = [{"run_id": run.info.run_id, "trial_id": run.data.tags.get(TRIAL_ID_TAG, ""),
             "space": run.data.tags.get(SPACE_TAG, ""),
             "outcome": run.data.tags.get(OUTCOME_TAG, ""), "status": run.info.status,
             **{k: v for k, v in run.data.params.items() if k.split(".")[0] in CONFIG_SIDES},
             **run.data.metrics}
            for run in children]
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=[*COLUMNS, *(c for c in frame.columns if c not in COLUMNS)])
    for column in frame.columns:
        if column.split(".")[0] in CONFIG_SIDES:
            frame[column] = _numeric_where_possible(frame[column])
    return frame


def _numeric_where_possible(column: pd.Series) -> pd.Series:
    """The column as numbers if every value present is one, else unchanged."""
    numbers = pd.to_numeric(column, errors="coerce")
    return numbers if numbers.notna().sum() == column.notna().sum() else column


def pareto_front(study: StudyRuns) -> list[Point]:
    """The accuracy-vs-FLOPs front of the completed children (``study.pareto``'s own)."""
    client = _client(study.tracking_uri)
    return non_dominated(completed_points(client, study.experiment_id, study.parent.info.run_id))


def front_frame(front: Sequence[Point]) -> pd.DataFrame:
    """The front as ``study.pareto`` exports it (``pareto.csv``), as a DataFrame."""
    return front_table(front).to_pandas()


def front_of(runs: pd.DataFrame) -> list[Point]:
    """The accuracy-vs-FLOPs front of the completed rows of ``runs`` (any mix of studies)."""
    scored = completed(runs).dropna(subset=[ACCURACY, COMPUTE])
    return non_dominated([Point(row.run_id, row.trial_id, row.space, getattr(row, ACCURACY),
                                getattr(row, COMPUTE), {}, {})
                          for row in scored.itertuples(index=False)])


def seed_summary(runs: pd.DataFrame, by: str, metrics: Sequence[str]) -> pd.DataFrame:
    """Per value of ``by``: ``n`` completed runs and ``<metric>_mean`` / ``<metric>_std``
    (sample std over the runs, i.e. the seeds; 0 for a single run) of each metric present."""
    done = completed(runs)
    present = [m for m in metrics if m in done.columns]
    grouped = done.groupby(by, sort=False)[present]
    summary = grouped.mean().add_suffix("_mean").join(
        grouped.std(ddof=1).fillna(0.0).add_suffix("_std"))
    summary.insert(0, "n", grouped.size())
    return summary


def plot_accuracy_vs_flops_by_point(summary: pd.DataFrame) -> Figure:
    """Mean accuracy against mean head FLOPs per sample of each ``seed_summary`` row, with the
    seeds' std as error bars."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for label, row in summary.iterrows():
        axes.errorbar(row[f"{COMPUTE}_mean"], row[f"{ACCURACY}_mean"],
                      yerr=row[f"{ACCURACY}_std"], fmt="o", capsize=3, label=str(label))
    _legend(axes)
    axes.set_xscale("log")
    axes.set_xlabel("head FLOPs per sample (log)")
    axes.set_ylabel(f"{ACCURACY} (mean ± std over seeds)")
    axes.set_title("accuracy vs compute")
    return figure


def best_per_loss(runs: pd.DataFrame) -> pd.DataFrame:
    """The most accurate completed child per loss (fewer FLOPs breaks ties), with its config.

    Indexed by loss, most accurate first; config columns none of the chosen runs has are
    left out.
    """
    scored = completed(runs).dropna(subset=[ACCURACY, COMPUTE])
    best = (scored.sort_values([ACCURACY, COMPUTE], ascending=[False, True])
            .drop_duplicates(LOSS).set_index(LOSS))
    config = sorted(c for c in best.columns
                    if c.split(".")[0] in CONFIG_SIDES and best[c].notna().any())
    return best[["run_id", "space", ACCURACY, COMPUTE, *config]]


def _scatter_by_loss(runs: pd.DataFrame, x: str, y: str, by: str = LOSS
                     ) -> tuple[Figure, Axes]:
    """A figure of the completed children's ``y`` against ``x``, one colour per value of
    ``by`` (the loss)."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for loss, group in completed(runs).groupby(by, sort=True):
        axes.scatter(group[x], group[y], label=str(loss), alpha=0.75)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    return figure, axes


def _legend(axes: Axes) -> None:
    """A legend, when anything is labelled."""
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def plot_front(runs: pd.DataFrame, front: Sequence[Point], by: str = LOSS) -> Figure:
    """Accuracy against head FLOPs per sample of the completed children (one colour per value
    of ``by``), front highlighted."""
    figure, axes = _scatter_by_loss(runs, COMPUTE, ACCURACY, by)
    axes.plot([p.flops for p in front], [p.accuracy for p in front], "k--o", lw=1,
              mfc="none", ms=10, label="Pareto front")
    _legend(axes)
    axes.set_xscale("log")
    axes.set_xlabel("head FLOPs per sample (log)")
    axes.set_title("accuracy vs compute")
    return figure


def plot_accuracy_vs_sample_ratio(runs: pd.DataFrame) -> Figure:
    """Accuracy against the sampled fraction of class centres, completed children by loss."""
    figure, axes = _scatter_by_loss(runs, SAMPLE_RATIO, ACCURACY)
    _legend(axes)
    axes.set_xlabel(f"{SAMPLE_RATIO} (fraction of class centres per step)")
    axes.set_title("accuracy vs sample_ratio")
    return figure


def plot_compactness_vs_separation(runs: pd.DataFrame) -> Figure:
    """Held-out intra-class compactness against inter-class separation, completed by loss."""
    figure, axes = _scatter_by_loss(runs, SEPARATION, COMPACTNESS)
    _legend(axes)
    axes.set_xlabel(f"{SEPARATION} (mean cos between class means; lower: more separated)")
    axes.set_ylabel(f"{COMPACTNESS} (higher: tighter)")
    axes.set_title("intra-class compactness vs inter-class separation")
    return figure


#: where a trial's wall time went, in the order a trial spends it (``time_breakdown``)
PHASES = ("startup", "setup", "train", "eval", "checkpoint", "report", "teardown", "other")


def time_breakdown(study: StudyRuns) -> pd.DataFrame:
    """Per child run, its wall time (MLflow start to end) and where it went, in seconds:

    - ``startup``: run start → the first worker's loop began (``worker_started_at``): the trial
      actor, the Train controller, the worker group and its process group;
    - ``setup``: ``setup_seconds`` (data, model, optimizer, a restored checkpoint);
    - ``train``, ``eval``, ``checkpoint``: Σ ``epoch_train_seconds``, ``eval_seconds``,
      ``checkpoint_seconds`` over the epochs;
    - ``report``: Σ over epochs of (the result's arrival in MLflow − ``reported_at``);
    - ``teardown``: the last result's arrival → run end;
    - ``other``: wall − the rest (gaps between the measured phases: reductions, loaders,
      clock skew). Each phase is measured on its own, so ``other`` small is a check.

    Runs that never reported (failed before their first epoch) are left out.
    """
    client = _client(study.tracking_uri)
    rows = []
    for run_id in study.runs["run_id"]:
        run = client.get_run(run_id)
        if run.info.end_time is None or "worker_started_at" not in run.data.metrics:
            continue
        history = {name: client.get_metric_history(run_id, name) for name in (
            "reported_at", "epoch_train_seconds", "eval_seconds", "checkpoint_seconds")}
        arrivals = {m.step: m.timestamp / 1000 for m in history["reported_at"]}
        start, end = run.info.start_time / 1000, run.info.end_time / 1000
        row = {"run_id": run_id, "trial_id": run.data.tags.get(TRIAL_ID_TAG, ""),
               "outcome": run.data.tags.get(OUTCOME_TAG, ""),
               "epochs": len(history["epoch_train_seconds"]), "wall": end - start,
               "startup": run.data.metrics["worker_started_at"] - start,
               "setup": run.data.metrics["setup_seconds"],
               "train": sum(m.value for m in history["epoch_train_seconds"]),
               "eval": sum(m.value for m in history["eval_seconds"]),
               "checkpoint": sum(m.value for m in history["checkpoint_seconds"]),
               "report": sum(arrivals[m.step] - m.value for m in history["reported_at"]),
               "teardown": end - max(arrivals.values())}
        row["other"] = row["wall"] - sum(row[phase] for phase in PHASES[:-1])
        rows.append(row)
    return pd.DataFrame(rows, columns=["run_id", "trial_id", "outcome", "epochs", "wall",
                                       *PHASES])
