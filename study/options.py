"""What a study is asked to do: validated options and the constants validation needs.

Kept free of Ray, MLflow and Tune imports so ``study/run.py`` rejects bad input in seconds.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import SearchSpace
from workers.config import ConfigError, TrialConfig, parse_trial_config
from workers.data import ingest_cpus

#: CPU of each trial's own function (it only waits on the Train run)
TRIAL_CPUS = 0.1
#: trial-config keys whose largest value over a study's trials sizes study-wide decisions
BOUNDED = ("epochs", "resources.num_workers", "resources.cpus_per_worker",
           "resources.gpus_per_worker", "data.ray_data_cpus")
#: Optuna samplers a study can use
SAMPLERS = ("tpe", "nsga2", "random", "grid")
#: early-stopping schedulers a study can use (``study.schedulers.build_scheduler``)
SCHEDULERS = ("asha", "mo-asha", "none")


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``uri`` without ``user:password@``, and MLflow's environment variables carrying them.

    MLflow prints run links with the tracking URI; credentials kept out of it travel as
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (HTTP basic auth) instead.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri, {}
    credentials = {"MLFLOW_TRACKING_USERNAME": urllib.parse.unquote(parts.username)}
    if parts.password is not None:
        credentials["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), credentials


def redact_uri(uri: str) -> str:
    """``uri`` with any password in it replaced by ``***`` (safe to print or log), also when
    ``uri`` is not a valid URL."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True)
class StudyOptions:
    """Everything a study needs, already validated.

    The trial configs are the one source of epochs and resources: ``base`` (the flags and
    ``--set``), then each space's ``fixed`` and sampled ``params``. Study-wide facts that depend
    on them (ASHA's ``max_t``, the concurrency cap, the resource check) come from
    ``largest_trials``.
    """

    name: str
    spaces: tuple[SearchSpace, ...]
    base: dict[str, Any]
    num_trials: int
    max_concurrent: int
    sampler: str
    seed: int
    scheduler: str
    tracking_uri: str
    storage_path: Path
    output: Path
    budget_fraction: float
    resume: bool
    ray_address: str | None = None
    #: enqueue each space's published setting (``SearchSpace.warm_start``) as the first trials
    warm_start: bool = False
    #: the FAR of the recommendation (one of ``workers.config.FARS``)
    target_far: float = 1e-3
    #: how far below the best TAR a recommendation may be (None: the best trial's fold spread)
    epsilon: float | None = None
    #: the flag that set each trial-config field of ``base`` (errors name it)
    flags: dict[str, str] = field(default_factory=dict)
    cli_args: dict[str, Any] = field(default_factory=dict)
    #: MLflow's basic-auth variables, taken out of the tracking URI (never logged)
    tracking_credentials: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def study_dir(self) -> Path:
        return self.storage_path / self.name

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.study_dir / 'optuna.db'}"

    @property
    def largest_trials(self) -> tuple[TrialConfig, ...]:
        """Per space, the trial config with the most epochs and resources its trials can have
        (each sampled key of ``BOUNDED`` at its largest value)."""
        return tuple(parse_trial_config(space.largest(BOUNDED, self.base), space.path)
                     for space in self.spaces)

    @property
    def max_epochs(self) -> int:
        """The most epochs any trial runs (ASHA's ``max_t``)."""
        return max(trial.epochs for trial in self.largest_trials)

    @property
    def trial_cpus(self) -> float:
        """The most CPUs one trial holds: its function, its workers and its Ray Data ingest."""
        return max(TRIAL_CPUS + trial.resources.num_workers * trial.resources.cpus_per_worker
                   + ingest_cpus(trial.data) for trial in self.largest_trials)

    @property
    def trial_gpus(self) -> float:
        """The most GPUs one trial holds (its workers')."""
        return max(trial.resources.num_workers * trial.resources.gpus_per_worker
                   for trial in self.largest_trials)

    def resource_problems(self, available: Mapping[str, float],
                          nodes: Sequence[Mapping[str, float]] = ()) -> list[str]:
        """One line per space whose largest trial cannot be scheduled on ``available`` (Ray's
        ``CPU``/``GPU``) or, when given, on ``nodes`` (each live node's resources), naming the
        flag or space entry that set each value."""
        from workers.train import check_resources  # the train loop's import: only when needed

        problems: list[str] = []
        for space, trial in zip(self.spaces, self.largest_trials, strict=True):
            names = {**self.flags, **{key: where for key in (*BOUNDED, "resources.precision")
                                      if (where := space.source_of(key)) is not None}}
            try:
                check_resources(trial, available, names=names, trial_cpus=TRIAL_CPUS,
                                nodes=nodes)
            except ConfigError as error:
                problems += [line for line in error.lines if line not in problems]
        return problems
