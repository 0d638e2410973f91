"""Fixtures of the worker tests: a local Ray for the Ray Train fits of one module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from workers.train import TRAIN_ENV


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """``ray.init`` with 2 CPUs and the fast health check; shut down after the module."""
    import ray

    os.environ.update(TRAIN_ENV)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": TRAIN_ENV})
    yield ray
    ray.shutdown()
