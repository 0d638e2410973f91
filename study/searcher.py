"""The Optuna side of a study: define-by-run over one or several spaces, honest trial states.

Objectives: verification accuracy (maximise) and head FLOPs per sample (minimise). A multi-loss
study first picks the space (``space`` categorical), then samples that space's parameters under
``<space>.<key>`` names, so families never share a distribution. With ``--sampler grid`` a
trial instead samples one categorical ``grid_point``, an index into the study's grid
(``search_spaces.study_grid``: every space's categorical combinations, concatenated), which
Optuna's ``GridSampler`` hands out once each.

Ray's ``OptunaSearch`` tells Optuna COMPLETE with whatever the last result held. Here a trial
that diverged, or that errored, is FAIL, and a trial the scheduler stopped before its last
epoch is PRUNED — so neither ever reaches Optuna's Pareto front with early values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from search_spaces import SearchSpace, study_grid
from study.options import SAMPLERS
from workers.config import parse_trial_config

ACCURACY = "verification_accuracy"
COMPUTE = "head_flops_per_sample"
OBJECTIVES = (ACCURACY, COMPUTE)
MODES = ("max", "min")
#: the one Optuna parameter of a grid study: an index into ``study_grid(spaces)``
GRID_PARAM = "grid_point"


class SpaceSampler:
    """Define-by-run function: returns the trial config (``{"trial": ..., "space": ...}``).

    ``grid``: sample the index ``grid_point`` into ``study_grid(spaces)`` instead of each
    parameter.
    """

    def __init__(self, spaces: Sequence[SearchSpace], base: Mapping[str, Any],
                 grid: bool = False) -> None:
        self.spaces = {space.name: space for space in spaces}
        self.base = dict(base)
        self.grid = study_grid(spaces) if grid else []

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.grid:
            index = trial.suggest_categorical(GRID_PARAM, list(range(len(self.grid))))
            space, values = self.grid[index]
        else:
            names = list(self.spaces)
            name = names[0] if len(names) == 1 else trial.suggest_categorical("space", names)
            space = self.spaces[name]
            values = space.suggest(trial, "" if len(names) == 1 else f"{name}.")
        config = parse_trial_config(space.trial_config(values, self.base), space.path)
        return {"space_name": space.name, "trial": config.model_dump(mode="json")}


class StudyGridSampler(optuna.samplers.GridSampler):
    """``GridSampler`` that leaves ending the study to Tune (``num_samples``).

    ``GridSampler.after_trial`` calls ``study.stop()`` once the grid is exhausted, which raises
    outside ``Study.optimize`` — and Tune drives Optuna through ask and tell. Which point a
    trial gets is unchanged: ``before_trial`` skips points RUNNING or finished.
    """

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    state: optuna.trial.TrialState, values: Sequence[float] | None) -> None:
        """Nothing: Tune stops asking after ``--trials``."""


def build_sampler(name: str, seed: int, spaces: Sequence[SearchSpace] = ()
                  ) -> optuna.samplers.BaseSampler:
    """``tpe`` (multi-objective TPE), ``nsga2``, ``random`` or ``grid`` (over
    ``study_grid(spaces)``), seeded."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return StudyGridSampler({GRID_PARAM: list(range(len(study_grid(spaces))))}, seed=seed)
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


#: Optuna user attribute: the Tune trial id an Optuna trial was asked for
TUNE_TRIAL_ATTR = "tune_trial_id"


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that records divergence as FAIL and early stops as PRUNED (before the
    epochs of the trial's own config), and tags each Optuna trial with its Tune trial id
    (``TUNE_TRIAL_ATTR``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: each trial's epochs, from the trial config it was given (saved with the searcher)
        self.epochs: dict[str, int] = {}

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        if isinstance(config, dict):
            self.epochs[trial_id] = config["trial"]["epochs"]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        outcome = trial_outcome(result, error, self.epochs[trial_id])
        if outcome == "complete":
            super().on_trial_complete(trial_id, result, error)
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        state = (optuna.trial.TrialState.PRUNED if outcome == "pruned"
                 else optuna.trial.TrialState.FAIL)
        self._ot_study.tell(self._ot_trials[trial_id], state=state)
        self._completed_trials.add(trial_id)
