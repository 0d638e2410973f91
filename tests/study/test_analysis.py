"""study.analysis against a real sqlite MLflow store filled the way a study fills it."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study import analysis
from study.pareto import completed_points, non_dominated
from study.searcher import ACCURACY, COMPUTE
from study.tracking import OUTCOME_TAG, SPACE_TAG, STUDY_TAG, TRIAL_ID_TAG

STUDY = "unit"
T0 = 1_700_000_000_000  # ms


@dataclass(frozen=True)
class Store:
    """The filled store: its URI, client, experiment and the run ids by name."""

    uri: str
    client: MlflowClient
    experiment_id: str
    parent: str
    runs: dict[str, str]


def _parent(client: MlflowClient, experiment_id: str, study: str, start: int) -> str:
    return client.create_run(experiment_id, start_time=start, run_name=f"study-{study}",
                             tags={STUDY_TAG: study, "marginlab.role": "parent"}).info.run_id


def _child(client: MlflowClient, experiment_id: str, parent: str, trial: str, start: int, *,
           loss: str, outcome: str, params: dict[str, str],
           metrics: dict[str, list[float]]) -> str:
    tags = {MLFLOW_PARENT_RUN_ID: parent, TRIAL_ID_TAG: trial, STUDY_TAG: STUDY,
            SPACE_TAG: loss}
    run_id = client.create_run(experiment_id, start_time=start, tags=tags).info.run_id
    client.log_batch(
        run_id, params=[Param(k, v) for k, v in {"head.loss": loss, "model.width": "16",
                                                  **params}.items()],
        metrics=[Metric(name, value, start, step) for name, values in metrics.items()
                 for step, value in enumerate(values)])
    client.set_tag(run_id, OUTCOME_TAG, outcome)
    status = {"complete": "FINISHED", "pruned": "KILLED"}.get(outcome, "FAILED")
    client.set_terminated(run_id, status)
    return run_id


def _metrics(accuracy: float, flops: float, compactness: float,
             separation: float) -> dict[str, list[float]]:
    """Two epochs; the last one holds the given values."""
    return {ACCURACY: [accuracy / 2, accuracy], COMPUTE: [flops, flops],
            analysis.COMPACTNESS: [0.0, compactness], analysis.SEPARATION: [1.0, separation],
            "loss": [3.0, 2.0]}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    uri = f"sqlite:///{tmp_path_factory.mktemp('analysis') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(STUDY)
    # an earlier study of the same name: load_study must read the latest parent only
    old = _parent(client, experiment_id, STUDY, T0)
    _child(client, experiment_id, old, "old", T0 + 1, loss="arcface", outcome="complete",
           params={"inter.sample_ratio": "1.0"}, metrics=_metrics(0.99, 1.0, 0.9, 0.1))
    parent = _parent(client, experiment_id, STUDY, T0 + 10)
    specs = {
        "a1": ("arcface", "complete", "0.1", "None", (0.80, 100.0, 0.70, 0.40)),
        "a2": ("arcface", "complete", "0.2", "0.01", (0.85, 200.0, 0.75, 0.30)),
        "c1": ("cosface", "complete", "0.05", "None", (0.70, 50.0, 0.60, 0.50)),
        "c2": ("cosface", "complete", "0.3", "None", (0.65, 150.0, 0.65, 0.45)),
        # would dominate every complete run: must count for neither the front nor the best
        "pruned": ("arcface", "pruned", "0.01", "None", (0.99, 10.0, 0.9, 0.1)),
    }
    runs = {}
    for offset, (trial, (loss, outcome, ratio, head_lr, values)) in enumerate(specs.items()):
        runs[trial] = _child(client, experiment_id, parent, trial, T0 + 11 + offset, loss=loss,
                             outcome=outcome,
                             params={"inter.sample_ratio": ratio, "inter.sampling": "uniform",
                                     "intra.margin": "0.5", "optim.head_lr": head_lr},
                             metrics=_metrics(*values))
    runs["diverged"] = _child(client, experiment_id, parent, "diverged", T0 + 20, loss="cosface",
                              outcome="diverged", params={"inter.sample_ratio": "0.2"},
                              metrics={"diverged": [1.0], "loss": [7.0]})
    return Store(uri, client, experiment_id, parent, runs)


def test_runs_table_holds_the_latest_parents_children(store: Store) -> None:
    study = analysis.load_study(store.uri, STUDY)
    assert study.parent.info.run_id == store.parent
    assert study.experiment_id == store.experiment_id
    runs = study.runs
    assert list(runs["run_id"]) == list(store.runs.values())  # in start order, no "old" child
    assert tuple(runs.columns[:len(analysis.COLUMNS)]) == analysis.COLUMNS
    by_trial = runs.set_index("trial_id")
    assert by_trial.loc["pruned", "outcome"] == "pruned"
    assert by_trial.loc["pruned", "status"] == "KILLED"
    assert by_trial.loc["diverged", "status"] == "FAILED"
    assert math.isnan(by_trial.loc["diverged", ACCURACY])
    assert by_trial.loc["diverged", "diverged"] == 1.0
    assert by_trial.loc["a2", ACCURACY] == 0.85  # the last epoch's value
    assert by_trial.loc["a2", "loss"] == 2.0
    assert runs[analysis.SAMPLE_RATIO].dtype == np.float64
    assert by_trial.loc["c1", analysis.SAMPLE_RATIO] == 0.05
    assert by_trial.loc["a2", "optim.head_lr"] == "0.01"  # "None" elsewhere: kept as text
    assert "model.width" not in runs.columns  # config tables keep intra/inter/head/optim only
    assert list(analysis.completed(runs)["trial_id"]) == ["a1", "a2", "c1", "c2"]


def test_best_per_loss_is_the_most_accurate_completed_run(store: Store) -> None:
    best = analysis.best_per_loss(analysis.load_study(store.uri, STUDY).runs)
    assert list(best.index) == ["arcface", "cosface"]
    assert list(best["run_id"]) == [store.runs["a2"], store.runs["c1"]]
    assert list(best[ACCURACY]) == [0.85, 0.70]
    assert best.loc["arcface", analysis.SAMPLE_RATIO] == 0.2
    assert best.loc["cosface", "intra.margin"] == 0.5
    assert list(best.columns[:4]) == ["run_id", "space", ACCURACY, COMPUTE]


def test_front_is_study_pareto_front(store: Store) -> None:
    study = analysis.load_study(store.uri, STUDY)
    front = analysis.pareto_front(study)
    expected = non_dominated(completed_points(store.client, store.experiment_id, store.parent))
    assert front == expected
    assert [p.run_id for p in front] == [store.runs[t] for t in ("c1", "a1", "a2")]
    table = analysis.front_frame(front)
    assert list(table["run_id"]) == [p.run_id for p in front]
    assert list(table[COMPUTE]) == [50.0, 100.0, 200.0]


def test_front_of_a_runs_table_matches_the_study_front(store: Store) -> None:
    study = analysis.load_study(store.uri, STUDY)
    front = analysis.front_of(study.runs)
    assert [p.run_id for p in front] == [p.run_id for p in analysis.pareto_front(study)]


def test_seed_summary_is_mean_and_std_of_completed_runs(store: Store) -> None:
    runs = analysis.load_study(store.uri, STUDY).runs
    summary = analysis.seed_summary(runs, analysis.LOSS, [ACCURACY, COMPUTE, "absent"])
    assert list(summary["n"]) == [2, 2]
    arcface = summary.loc["arcface"]
    assert arcface[f"{ACCURACY}_mean"] == pytest.approx(0.825)
    assert arcface[f"{ACCURACY}_std"] == pytest.approx(np.std([0.80, 0.85], ddof=1))
    assert "absent_mean" not in summary
    figure = analysis.plot_accuracy_vs_flops_by_point(summary)
    assert len(figure.axes[0].containers) == 2  # one error bar per row


def test_plots_show_the_completed_runs_and_the_front(store: Store) -> None:
    study = analysis.load_study(store.uri, STUDY)
    front = analysis.pareto_front(study)
    figure = analysis.plot_front(study.runs, front)
    axes = figure.axes[0]
    points = np.concatenate([c.get_offsets() for c in axes.collections])
    assert sorted(map(tuple, points.tolist())) == [(50.0, 0.7), (100.0, 0.8), (150.0, 0.65),
                                                   (200.0, 0.85)]
    line = axes.get_lines()[0]
    assert list(line.get_xdata()) == [50.0, 100.0, 200.0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["arcface", "cosface",
                                                                     "Pareto front"]
    ratio = analysis.plot_accuracy_vs_sample_ratio(study.runs).axes[0]
    assert sorted(np.concatenate([c.get_offsets() for c in ratio.collections])[:, 0]) == [
        0.05, 0.1, 0.2, 0.3]
    classes = analysis.plot_compactness_vs_separation(study.runs).axes[0]
    arcface = classes.collections[0].get_offsets().tolist()
    assert arcface == [[0.40, 0.70], [0.30, 0.75]]  # (separation, compactness)
    for fig in (figure, ratio.figure, classes.figure):
        fig.savefig(io.BytesIO(), format="png")  # renders without a display


def test_study_without_children(store: Store) -> None:
    _parent(store.client, store.client.create_experiment("empty"), "empty", T0)
    study = analysis.load_study(store.uri, "empty")
    assert study.runs.empty
    assert tuple(study.runs.columns) == analysis.COLUMNS
    assert analysis.best_per_loss(study.runs).empty
    assert analysis.pareto_front(study) == []
    analysis.plot_front(study.runs, []).savefig(io.BytesIO(), format="png")


def test_latest_study_is_the_last_parent_started(store: Store) -> None:
    experiment_id = store.client.create_experiment("later")
    _parent(store.client, experiment_id, "later", T0 + 1_000)
    assert analysis.latest_study(store.uri) == "later"


def test_missing_study_is_one_clear_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"^no study 'nope' in MLflow at {re.escape(store.uri)}$"):
        analysis.load_study(store.uri, "nope")
    store.client.create_experiment("parentless")
    with pytest.raises(ValueError, match=r"^no parent run .* for study 'parentless' in MLflow"):
        analysis.load_study(store.uri, "parentless")
    missing = tmp_path / "none.db"
    no_store = f"^no MLflow store at {re.escape(f'sqlite:///{missing}')}$"
    with pytest.raises(ValueError, match=no_store):
        analysis.load_study(f"sqlite:///{missing}", STUDY)
    with pytest.raises(ValueError, match=no_store):
        analysis.latest_study(f"sqlite:///{missing}")
    assert not missing.exists()
