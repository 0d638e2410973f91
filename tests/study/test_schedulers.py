"""Early stopping: multi-objective ASHA against Ray's ASHA on the same results, its ranking
and crowding, pickling mid-study, the ``--scheduler`` mapping, and one real mo-asha study."""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from study.pareto import Point, non_dominated
from study.run import build_parser, options_from_args
from study.schedulers import (
    MultiObjectiveASHA,
    Objectives,
    build_scheduler,
    crowding_distances,
    nondominated_ranks,
    survivors,
)
from study.searcher import ACCURACY, COMPUTE, GRID_PARAM, TUNE_TRIAL_ATTR
from study.tracking import OUTCOME_TAG, TRIAL_ID_TAG
from tests.services import study_env, tiny_study_command

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
#: a rung of six trials: two fronts of (accuracy, head FLOPs) and one dominated point
RUNG: dict[str, Objectives] = {
    "accurate": (0.90, 10.0), "cheap": (0.80, 1.0),  # front 0
    "dear": (0.85, 12.0), "cheaper_miss": (0.75, 2.0), "middle": (0.80, 6.0),  # front 1
    "worst": (0.50, 20.0),  # front 2
}


def _decide(scheduler: TrialScheduler, results: list[tuple[str, int, float, float]]
            ) -> list[str]:
    """Feed ``(trial id, epoch count, accuracy, FLOPs)`` results through Tune's scheduler calls
    (a trial is added at its first result); the decisions, in order."""
    trials: dict[str, Trial] = {}
    decisions = []
    for trial_id, iteration, accuracy, flops in results:
        if trial_id not in trials:
            trials[trial_id] = Trial("__fake", stub=True, trial_id=trial_id)
            scheduler.on_trial_add(None, trials[trial_id])
        decisions.append(scheduler.on_trial_result(
            None, trials[trial_id],
            {"training_iteration": iteration, ACCURACY: accuracy, COMPUTE: flops}))
    return decisions


def test_mo_asha_keeps_the_cheap_front_point_that_asha_stops() -> None:
    # first rung (1 epoch of 4): an accurate, costly trial; a cheap one 0.1 less accurate that
    # nothing beats on both; a third that the cheap one beats on both
    first_rung = [("accurate", 1, 0.90, 4e6), ("cheap", 1, 0.80, 1e6),
                  ("dominated", 1, 0.70, 2e6)]
    asha = ASHAScheduler(metric=ACCURACY, mode="max", max_t=4, grace_period=1,
                         reduction_factor=2)
    assert _decide(asha, first_rung) == [CONTINUE, STOP, STOP]
    assert _decide(MultiObjectiveASHA(max_t=4), first_rung) == [CONTINUE, CONTINUE, STOP]


def test_mo_asha_judges_each_trial_once_per_rung_and_skips_results_without_objectives() -> None:
    scheduler = MultiObjectiveASHA(max_t=8)
    assert list(scheduler.rungs) == [1, 2, 4]
    assert _decide(scheduler, [("a", 1, 0.9, 1.0), ("b", 1, 0.5, 2.0),
                               ("b", 1, 0.99, 0.5)]) == [CONTINUE, STOP, CONTINUE]
    assert scheduler.rungs[1] == {"a": (0.9, 1.0), "b": (0.5, 2.0)}
    # a diverged result (no finite accuracy) is neither recorded nor stopped
    assert _decide(scheduler, [("c", 1, math.nan, 1.0)]) == [CONTINUE]
    assert "c" not in scheduler.rungs[1]
    # past a rung: judged at the latest rung reached, against that rung's trials only
    assert _decide(scheduler, [("a", 3, 0.9, 1.0), ("d", 2, 0.1, 9.0)]) == [CONTINUE, STOP]
    assert scheduler.rungs[2] == {"a": (0.9, 1.0), "d": (0.1, 9.0)} and not scheduler.rungs[4]
    assert scheduler.num_stopped == 2


def test_ranks_equal_peeling_the_pareto_fronts() -> None:
    assert nondominated_ranks(list(RUNG.values())) == [0, 0, 1, 1, 1, 2]
    # duplicates share a front; a tie in one objective is decided by the other
    assert nondominated_ranks([(0.8, 1.0), (0.8, 1.0), (0.8, 2.0), (0.7, 1.0)]) == [0, 0, 1, 1]
    generator = random.Random(0)  # coarse values: many ties and duplicates
    points = [(generator.randint(0, 12) / 12, float(generator.randint(1, 12)))
              for _ in range(300)]
    remaining = [Point(str(i), str(i), "", a, c, {}, {}) for i, (a, c) in enumerate(points)]
    expected, front_index = [0] * len(points), 0
    while remaining:  # study.pareto's O(n²) front, peeled one front at a time
        front = {p.run_id for p in non_dominated(remaining)}
        for point in remaining:
            if point.run_id in front:
                expected[int(point.run_id)] = front_index
        remaining = [p for p in remaining if p.run_id not in front]
        front_index += 1
    assert nondominated_ranks(points) == expected
    assert front_index > 5


def test_crowding_distance_is_the_normalised_neighbour_gap_with_infinite_extremes() -> None:
    front = [RUNG["dear"], RUNG["middle"], RUNG["cheaper_miss"]]
    # middle: accuracy gap 0.85 − 0.75 over range 0.1, FLOPs gap 12 − 2 over range 10
    assert crowding_distances(front) == pytest.approx([math.inf, 2.0, math.inf])
    # an objective without range adds nothing (and marks no extreme)
    assert crowding_distances([(0.8, 1.0), (0.8, 7.0), (0.8, 3.0), (0.8, 5.0)]) \
        == pytest.approx([math.inf, math.inf, 2 / 3, 2 / 3])
    assert crowding_distances([(0.8, 1.0)]) == [0.0]


def test_survivors_fill_the_last_front_by_crowding_and_always_keep_the_first() -> None:
    # six trials, keep 3: front 0 (2), then front 1's two extremes tie at ∞ for third place
    assert survivors(RUNG, reduction_factor=2) == {"accurate", "cheap", "dear", "cheaper_miss"}
    assert survivors(RUNG, reduction_factor=3) == {"accurate", "cheap"}
    # quota 1 of 4, but all four are on the first front
    front = {str(i): (0.5 + i / 10, 1.0 + i) for i in range(4)}
    assert survivors(front, reduction_factor=4) == set(front)


def test_mo_asha_pickled_mid_study_keeps_its_rungs_and_decides_the_same() -> None:
    scheduler = MultiObjectiveASHA(max_t=4)
    assert _decide(scheduler, [("accurate", 1, 0.90, 4e6), ("cheap", 1, 0.80, 1e6)]) \
        == [CONTINUE, CONTINUE]
    restored = pickle.loads(pickle.dumps(scheduler))
    assert restored.rungs == scheduler.rungs and len(restored.rungs[1]) == 2
    later = [("dominated", 1, 0.70, 2e6), ("accurate", 2, 0.95, 4e6), ("cheap", 2, 0.85, 1e6)]
    # judged against the restored rung: a fresh scheduler would keep "dominated" (first there)
    assert _decide(restored, later) == _decide(scheduler, later) == [STOP, CONTINUE, CONTINUE]
    assert restored.num_stopped == 1


def test_build_scheduler_maps_the_flag_and_refuses_metric_from_tune(tmp_path: Path) -> None:
    common = ["--storage", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    options = options_from_args(build_parser().parse_args(["--epochs", "4", *common]))
    asha = build_scheduler(dataclasses.replace(options, scheduler="asha"))
    assert isinstance(asha, ASHAScheduler) and asha.metric == ACCURACY
    mo_asha = build_scheduler(dataclasses.replace(options, scheduler="mo-asha"))
    assert isinstance(mo_asha, MultiObjectiveASHA) and list(mo_asha.rungs) == [1, 2]
    assert not mo_asha.set_search_properties(ACCURACY, "max")
    assert mo_asha.set_search_properties(None, None)
    assert type(build_scheduler(dataclasses.replace(options, scheduler="none"))) \
        is FIFOScheduler
    one_epoch = dataclasses.replace(options, scheduler="mo-asha", base={**options.base,
                                                                        "epochs": 1})
    assert type(build_scheduler(one_epoch)) is FIFOScheduler
    with pytest.raises(ValueError, match=r"--scheduler = 'hyperband' is not one of "
                                         r"\['asha', 'mo-asha', 'none'\]"):
        build_scheduler(dataclasses.replace(options, scheduler="hyperband"))


@pytest.mark.slow
def test_mo_asha_study_prunes_a_dominated_trial_in_optuna_and_mlflow(tmp_path: Path) -> None:
    """Two grid points run one after the other (``--seed 1`` hands out point 0 first): lean
    (a quarter of the classes sampled, 1 epoch) reaches the first rung, then heavy (every class,
    lr 1e-4: more FLOPs and, barely trained, less accurate), which lean dominates there."""
    spaces = []
    for name, fixed in (("lean", {"epochs": 1, "head": {"sample_ratio": 0.25}}),
                        ("heavy", {"head": {"sample_ratio": 1.0}, "optim": {"lr": 1e-4}})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "version": 1, "name": name, "loss": "normface", "fixed": fixed,
            "params": {"head.sampling": {"distribution": "categorical", "choices": ["uniform"]}}}))
        spaces.append(str(path))
    process = subprocess.run(
        tiny_study_command("moasha", tmp_path, "--space", *spaces, "--sampler", "grid",
                           "--trials", "2", "--concurrent", "1", "--epochs", "2", "--seed", "1",
                           "--scheduler", "mo-asha"),
        capture_output=True, text=True, timeout=600, env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]

    study = optuna.load_study(
        study_name="moasha", storage=f"sqlite:///{tmp_path / 'studies' / 'moasha' / 'optuna.db'}")
    assert [t.params[GRID_PARAM] for t in study.trials] == [0, 1], "lean no longer runs first"
    lean, heavy = study.trials
    assert (lean.state, heavy.state) == (optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.PRUNED)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("moasha")
    children = {run.data.tags[TRIAL_ID_TAG]: run
                for run in client.search_runs([experiment.experiment_id])
                if MLFLOW_PARENT_RUN_ID in run.data.tags}
    lean_run, heavy_run = (children[t.user_attrs[TUNE_TRIAL_ATTR]] for t in (lean, heavy))
    assert (lean_run.info.status, lean_run.data.tags[OUTCOME_TAG]) == ("FINISHED", "complete")
    assert (heavy_run.info.status, heavy_run.data.tags[OUTCOME_TAG]) == ("KILLED", "pruned")
    first_rung = {}
    for name, run in (("lean", lean_run), ("heavy", heavy_run)):
        history = client.get_metric_history(run.info.run_id, ACCURACY)
        assert [m.step for m in history] == [0], name  # stopped at the first rung
        first_rung[name] = (history[0].value, run.data.metrics[COMPUTE])
    # why heavy was stopped: lean dominates it there (mo-asha keeps any undominated trial)
    assert first_rung["lean"][0] >= first_rung["heavy"][0], first_rung
    assert first_rung["lean"][1] < first_rung["heavy"][1], first_rung
