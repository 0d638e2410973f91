"""The Optuna side of a study: define-by-run over one or several spaces, honest trial states.

Objectives: verification accuracy (maximise) and head FLOPs per sample (minimise). A multi-loss
study first picks the space (``space`` categorical), then samples that space's parameters under
``<space>.<key>`` names, so families never share a distribution.

Ray's ``OptunaSearch`` tells Optuna COMPLETE with whatever the last result held. Here a trial
that diverged, or that errored, is FAIL, and a trial the scheduler stopped before its last
epoch is PRUNED — so neither ever reaches Optuna's Pareto front with early values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from search_spaces import SearchSpace
from study.options import SAMPLERS
from workers.config import parse_trial_config

ACCURACY = "verification_accuracy"
COMPUTE = "head_flops_per_sample"
OBJECTIVES = (ACCURACY, COMPUTE)
MODES = ("max", "min")


class SpaceSampler:
    """Define-by-run function: returns the trial config (``{"trial": ..., "space": ...}``)."""

    def __init__(self, spaces: Sequence[SearchSpace], base: Mapping[str, Any]) -> None:
        self.spaces = {space.name: space for space in spaces}
        self.base = dict(base)

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        names = list(self.spaces)
        name = names[0] if len(names) == 1 else trial.suggest_categorical("space", names)
        space = self.spaces[name]
        prefix = "" if len(names) == 1 else f"{name}."
        values = space.suggest(trial, prefix)
        config = parse_trial_config(space.trial_config(values, self.base), space.path)
        return {"space_name": name, "trial": config.model_dump(mode="json")}


def build_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """``tpe`` (multi-objective TPE), ``nsga2`` or ``random``, seeded."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"--sampler = {name!r} is not one of {list(SAMPLERS)}")


def trial_outcome(result: Mapping[str, Any] | None, error: bool, epochs: int) -> str:
    """``complete``, ``pruned`` (stopped before the last epoch), ``diverged`` or ``failed``."""
    if error or not result:
        return "failed"
    if result.get("diverged"):
        return "diverged"
    if int(result.get("epoch", -1)) + 1 < epochs:
        return "pruned"
    return "complete"


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that records divergence as FAIL and early stops as PRUNED."""

    def __init__(self, *args: Any, epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epochs = epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        outcome = trial_outcome(result, error, self.epochs)
        if outcome == "complete":
            super().on_trial_complete(trial_id, result, error)
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        state = (optuna.trial.TrialState.PRUNED if outcome == "pruned"
                 else optuna.trial.TrialState.FAIL)
        self._ot_study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)
