"""The Optuna side of a study: define-by-run over one or several spaces, honest trial states.

Objectives: verification accuracy (maximise) and head FLOPs per sample (minimise). A multi-loss
study first picks the space (``space`` categorical), then samples that space's parameters under
``<space>.<key>`` names, so families never share a distribution. With ``--sampler grid`` a
trial instead samples one categorical ``grid_point``, an index into the study's grid
(``search_spaces.study_grid``: every space's categorical combinations, concatenated), which
Optuna's ``GridSampler`` hands out once each.

``StudySearch`` drives Optuna through its public ask-and-tell interface (not Ray's
``OptunaSearch``, whose subclassing needs its private attributes, and which tells COMPLETE with
whatever the last result held). A trial that diverged, or that errored, is FAIL, and a trial
the scheduler stopped before its last epoch is PRUNED — so neither ever reaches Optuna's Pareto
front with early values.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from ray.tune.search import Searcher

from search_spaces import SearchSpace, study_grid
from study.options import SAMPLERS
from workers.config import parse_trial_config

ACCURACY = "verification_accuracy"
COMPUTE = "head_flops_per_sample"
OBJECTIVES = (ACCURACY, COMPUTE)
MODES = ("max", "min")
#: the one Optuna parameter of a grid study: an index into ``study_grid(spaces)``
GRID_PARAM = "grid_point"
#: the Optuna parameter choosing a multi-space study's space
SPACE_PARAM = "space"


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
            name = names[0] if len(names) == 1 else trial.suggest_categorical(SPACE_PARAM, names)
            space = self.spaces[name]
            values = space.suggest(trial, self._prefix(name))
        config = parse_trial_config(space.trial_config(values, self.base), space.path)
        return {"space_name": space.name, "trial": config.model_dump(mode="json")}

    def _prefix(self, name: str) -> str:
        """How space ``name``'s parameters are named in Optuna: bare in a one-space study,
        ``<space>.<key>`` in a multi-space one (families never share a distribution)."""
        return "" if len(self.spaces) == 1 else f"{name}."

    def warm_start_points(self) -> list[dict[str, Any]]:
        """Each space's published setting (``SearchSpace.warm_start``) as the Optuna params
        ``__call__`` samples, for ``Study.enqueue_trial``: one point per space."""
        several = len(self.spaces) > 1
        return [{**({SPACE_PARAM: name} if several else {}),
                 **space.warm_start(self._prefix(name))} for name, space in self.spaces.items()]


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


class StudySearch(Searcher):
    """Tune's searcher over one Optuna study, through Optuna's public ask-and-tell interface.

    ``suggest`` asks Optuna for a trial, runs the define-by-run ``space`` on it and tags it with
    its Tune trial id (``TUNE_TRIAL_ATTR``); ``on_trial_complete`` tells Optuna the objectives of
    a complete trial, PRUNED for a trial stopped before its config's last epoch, and FAIL for a
    diverged or errored one. The study lives in ``storage`` (an RDB URL); ``save`` keeps only
    the Tune-to-Optuna trial mapping and the sampler, so ``--resume`` reattaches to the same
    study.
    """

    def __init__(self, space: SpaceSampler, sampler: optuna.samplers.BaseSampler,
                 study_name: str, storage: str) -> None:
        super().__init__(metric=list(OBJECTIVES), mode=list(MODES))
        self.space = space
        self.sampler = sampler
        self.study_name = study_name
        self.storage = storage
        #: Tune trial id -> (Optuna trial number, epochs of its trial config)
        self.asked: dict[str, tuple[int, int]] = {}
        self.study = self._open_study()

    def _open_study(self) -> optuna.Study:
        return optuna.create_study(
            storage=self.storage, sampler=self.sampler, study_name=self.study_name,
            load_if_exists=True,
            directions=["maximize" if mode == "max" else "minimize" for mode in MODES])

    def suggest(self, trial_id: str) -> dict | None:
        trial = self.study.ask()
        trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        config = self.space(trial)
        self.asked[trial_id] = (trial.number, config["trial"]["epochs"])
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self.asked:
            return
        number, epochs = self.asked[trial_id]
        outcome = trial_outcome(result, error, epochs)
        if outcome == "complete":
            self.study.tell(number, [float(result[name]) for name in OBJECTIVES],
                            skip_if_finished=True)
        else:
            self.study.tell(number, state=optuna.trial.TrialState.PRUNED
                            if outcome == "pruned" else optuna.trial.TrialState.FAIL,
                            skip_if_finished=True)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the open study (a database connection): reattached on unpickling."""
        return {key: value for key, value in self.__dict__.items() if key != "study"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.study = self._open_study()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file).__dict__)
