"""Shared fixtures: a CPU gloo group runner and a real ``mlflow server`` process on loopback
(the helpers behind them are in ``tests/services.py``)."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.services import MlflowServer, free_port

GlooFn = Callable[..., None]


def _gloo_entry(rank: int, world_size: int, port: int, fn: GlooFn, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn: GlooFn, world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes on one gloo group.

    An exception in any rank fails the caller with that rank's traceback. The processes are
    forked (``torch.multiprocessing.start_processes``), not spawned: a spawned child would have
    to re-import this entry point as ``conftest``, a name every conftest.py of the suite shares.
    Each rank runs with one torch thread.
    """
    mp.start_processes(_gloo_entry, args=(world_size, free_port(), fn, args),
                       nprocs=world_size, start_method="fork")


@pytest.fixture(scope="session")
def gloo_runner() -> Callable[..., None]:
    """The ``run_gloo`` helper as a fixture."""
    return run_gloo


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started ``mlflow server`` on loopback, stopped at the end (also on failure)."""
    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        server.start()
        yield server
    finally:
        server.stop()
