"""Trial outcomes and the define-by-run sampler over one or several spaces."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest
import yaml

from search_spaces import SpaceError, load_spaces, shipped_space_files
from study.searcher import (
    ACCURACY,
    COMPUTE,
    GRID_PARAM,
    TUNE_TRIAL_ATTR,
    SpaceSampler,
    StudySearch,
    build_sampler,
    trial_outcome,
)
from workers.config import parse_trial_config


@pytest.mark.parametrize(("result", "error", "expected"), [
    ({"epoch": 2, "verification_accuracy": 0.8}, False, "complete"),
    ({"epoch": 0, "verification_accuracy": 0.6}, False, "pruned"),
    ({"epoch": 1, "diverged": 1.0}, False, "diverged"),
    ({"epoch": 2}, True, "failed"),
    (None, False, "failed"),
])
def test_trial_outcome(result: dict | None, error: bool, expected: str) -> None:
    assert trial_outcome(result, error, epochs=3) == expected


def _shipped(*names: str) -> list:
    return [s for s in load_spaces(shipped_space_files()) if s.name in names]


def test_single_space_names_parameters_by_key() -> None:
    sampler = SpaceSampler(_shipped("arcface"), {"epochs": 3})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    out = sampler(trial)
    assert out["space_name"] == "arcface"
    assert set(trial.params) == {"loss.margin", "loss.scale", "loss.margin_grad",
                                 "head.sample_ratio", "head.sampling", "optim.lr"}
    config = parse_trial_config(out["trial"])
    assert config.epochs == 3 and config.loss.name == "arcface"
    assert config.loss.hyperparameters["margin"] == trial.params["loss.margin"]
    assert config.head.sample_ratio == trial.params["head.sample_ratio"]


def test_multi_space_study_picks_a_space_then_its_prefixed_parameters() -> None:
    sampler = SpaceSampler(_shipped("arcface", "cosface"), {})
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=build_sampler("random", 1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        out = sampler(trial)
        name = trial.params["space"]
        seen.add(name)
        assert out["space_name"] == name
        assert all(k == "space" or k.startswith(f"{name}.") for k in trial.params)
        assert parse_trial_config(out["trial"]).loss.name == name
        study.tell(trial, [0.5, 1.0])
    assert seen == {"arcface", "cosface"}


def test_unknown_sampler() -> None:
    with pytest.raises(ValueError, match="--sampler = 'cmaes' is not one of"):
        build_sampler("cmaes", 0)


def _grid_spaces(tmp_path: Path) -> list:
    """arcface: 2 margins × 2 seeds; cosface: 3 seeds — a grid of 7 points."""
    files = []
    for name, params in (
            ("arcface", {"loss.margin": [0.3, 0.5], "seed": [0, 1]}),
            ("cosface", {"seed": [0, 1, 2]})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "version": 1, "name": name, "loss": name, "fixed": {"loss": {"scale": 32.0}},
            "params": {k: {"distribution": "categorical", "choices": v}
                       for k, v in params.items()}}))
        files.append(path)
    return load_spaces(files)


def test_grid_runs_each_point_once_even_when_asked_concurrently(tmp_path: Path) -> None:
    spaces = _grid_spaces(tmp_path)
    sampler = SpaceSampler(spaces, {"epochs": 1}, grid=True)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=build_sampler("grid", 0, spaces))
    # Tune asks for every concurrent trial before telling any: RUNNING points are skipped
    trials = [study.ask() for _ in range(7)]
    configs = [parse_trial_config(sampler(trial)["trial"]) for trial in trials]
    assert sorted(t.params[GRID_PARAM] for t in trials) == list(range(7))
    assert all(set(t.params) == {GRID_PARAM} for t in trials)
    points = sorted((c.loss.name, c.loss.hyperparameters.get("margin"), c.seed)
                    for c in configs)
    assert points == [("arcface", 0.3, 0), ("arcface", 0.3, 1), ("arcface", 0.5, 0),
                      ("arcface", 0.5, 1), ("cosface", None, 0), ("cosface", None, 1),
                      ("cosface", None, 2)]
    assert all(c.loss.hyperparameters["scale"] == 32.0 and c.epochs == 1 for c in configs)
    for trial in trials:  # telling the last point must not raise (GridSampler's study.stop())
        study.tell(trial, [0.5, 1.0])
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 7


def test_grid_refuses_non_categorical_params() -> None:
    with pytest.raises(SpaceError) as error:
        build_sampler("grid", 0, _shipped("cosface"))
    assert error.value.lines[0].endswith(
        "cosface.yaml: params.loss.margin: distribution uniform; --sampler grid needs "
        "categorical params")
    assert len(error.value.lines) == 4  # every non-categorical parameter, one line each


def test_search_state_survives_save_and_restore(tmp_path: Path) -> None:
    """Tune saves the searcher with its experiment and restores it on ``--resume``: the
    restored one tells the same Optuna trials, in the same study, what became of them."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def search() -> StudySearch:
        return StudySearch(SpaceSampler(_shipped("arcface"), {"epochs": 2}),
                           build_sampler("random", 0), "s", storage)

    first = search()
    configs = {trial_id: first.suggest(trial_id) for trial_id in ("a", "b", "c")}
    first.on_trial_complete("a", {"epoch": 1, ACCURACY: 0.75, COMPUTE: 2e6})
    first.save(str(tmp_path / "searcher.pkl"))

    restored = search()  # Tuner.restore builds the searcher anew, then restores its state
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("b", {"epoch": 0, ACCURACY: 0.7, COMPUTE: 2e6})  # stopped early
    restored.on_trial_complete("c", {"epoch": 1, "diverged": 1.0})
    restored.on_trial_complete("a", {"epoch": 1, ACCURACY: 0.1, COMPUTE: 1.0})  # told already

    trials = {t.user_attrs[TUNE_TRIAL_ATTR]: t
              for t in optuna.load_study(study_name="s", storage=storage).trials}
    assert [trials[k].state.name for k in "abc"] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials["a"].values == [0.75, 2e6]
    assert configs["b"]["trial"]["head"]["sample_ratio"] == trials["b"].params["head.sample_ratio"]
    assert pickle.loads(pickle.dumps(restored)).asked == restored.asked
