"""Trial outcomes and the define-by-run sampler over one or several spaces."""

from __future__ import annotations

import optuna
import pytest

from search_spaces import load_spaces, shipped_space_files
from study.searcher import SpaceSampler, build_sampler, trial_outcome
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
    with pytest.raises(ValueError, match="--sampler = 'grid' is not one of"):
        build_sampler("grid", 0)
