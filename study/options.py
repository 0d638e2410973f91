"""What a study is asked to do: validated options and the constants validation needs.

Kept free of Ray, MLflow and Tune imports so ``study/run.py`` rejects bad input in seconds.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import SearchSpace

#: CPU of each trial's own function (it only waits on the Train run)
TRIAL_CPUS = 0.1
#: Optuna samplers a study can use
SAMPLERS = ("tpe", "nsga2", "random", "grid")


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
    """``uri`` with any password in it replaced by ``***`` (safe to print or log)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True)
class StudyOptions:
    """Everything a study needs, already validated."""

    name: str
    spaces: tuple[SearchSpace, ...]
    base: dict[str, Any]
    num_trials: int
    max_concurrent: int
    epochs: int
    num_workers: int
    cpus_per_worker: float
    sampler: str
    seed: int
    scheduler: str
    tracking_uri: str
    storage_path: Path
    output: Path
    budget_fraction: float
    resume: bool
    ray_address: str | None = None
    cli_args: dict[str, Any] = field(default_factory=dict)
    #: MLflow's basic-auth variables, taken out of the tracking URI (never logged)
    tracking_credentials: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def study_dir(self) -> Path:
        return self.storage_path / self.name

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.study_dir / 'optuna.db'}"
