"""Shared fixtures: a CPU gloo group runner, a real ``mlflow server`` process on loopback (the
helpers behind them are in ``tests/services.py``) and the checked Omniglot file.

The session keeps out of the user's MarginLab home: ``MARGINLAB_HOME`` points to a temporary
folder for the whole session (set before any test module is imported: ``study.run`` reads it
at import), and the session fails if ``~/.marginlab`` was created or changed meanwhile.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.services import MlflowServer, free_port

GlooFn = Callable[..., None]

#: the user's own MarginLab home (``study.run``'s default), which no test may touch
USER_HOME = Path.home() / ".marginlab"
#: sha256 of ``images_background.npz``, the Omniglot background set the tests read
OMNIGLOT_SHA256 = "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199"
_SESSION_HOME = pytest.StashKey[Path]()
_USER_HOME_STATE = pytest.StashKey[dict[str, tuple[int, int]]]()


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time (ns) of ``root`` and of every path below it, by path
    relative to ``root`` (empty when ``root`` does not exist). A file created and removed
    again still changes its folder's time."""
    state = {}
    for path in (root, *root.rglob("*")) if root.exists() else ():
        info = path.lstat()
        state[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return state


def pytest_configure(config: pytest.Config) -> None:
    """Point ``MARGINLAB_HOME`` at a fresh folder and note the state of ``~/.marginlab``."""
    home = Path(tempfile.mkdtemp(prefix="marginlab-home-"))
    os.environ["MARGINLAB_HOME"] = str(home)
    config.stash[_SESSION_HOME] = home
    config.stash[_USER_HOME_STATE] = _tree_state(USER_HOME)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's ``MARGINLAB_HOME``."""
    if (home := config.stash.get(_SESSION_HOME, None)) is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def user_home_untouched(pytestconfig: pytest.Config) -> Iterator[None]:
    """Fails the session (at its last teardown) if ``~/.marginlab`` was created or changed."""
    yield
    before, after = pytestconfig.stash[_USER_HOME_STATE], _tree_state(USER_HOME)
    changed = sorted(path for path in before.keys() | after.keys()
                     if before.get(path) != after.get(path))
    if changed:
        pytest.fail(f"{USER_HOME} was written during the test session (tests write under "
                    f"$MARGINLAB_HOME): {', '.join(changed)}", pytrace=False)


@pytest.fixture(scope="session")
def omniglot_npz() -> Path:
    """The Omniglot background set (``workers.data.resolve_omniglot_path``), checked against
    ``OMNIGLOT_SHA256``; a missing or different file fails the test with one line."""
    from workers.data import resolve_omniglot_path
    from workers.data._omniglot import ENV_VAR

    path = resolve_omniglot_path()
    if not path.is_file():
        pytest.fail(f"omniglot: {path} not found; CI keeps it at ../shared/datasets/omniglot/"
                    f"images_background.npz beside the clone, or set {ENV_VAR} to the file",
                    pytrace=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != OMNIGLOT_SHA256:
        pytest.fail(f"omniglot: {path} has sha256 {digest}, not the {OMNIGLOT_SHA256} recorded "
                    "in tests/conftest.py", pytrace=False)
    return path


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
