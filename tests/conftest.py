"""Shared fixtures: a free TCP port and a helper that runs a function on a CPU gloo group."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GlooFn = Callable[..., None]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
