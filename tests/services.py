"""Real services for tests: a free port, a tiny study command line, an ``mlflow server``
process on loopback, a TCP relay that cuts a service off and restores it, a
token-authenticated Ray cluster, and stopping what they started."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]
#: the ``ray`` command line of this environment
RAY_CLI = Path(sys.executable).with_name("ray")
#: a study small enough for a test: 64 identities × 8 samples, width-16 CNN, one epoch, 1 worker
TINY_STUDY_FLAGS = ("--epochs", "1", "--workers", "1", "--batch-size", "32",
                    "--set", "data.num_identities=64", "--set", "data.samples_per_identity=8",
                    "--set", "data.heldout_identities=32", "--set", "model.width=16",
                    "--set", "evaluation.num_pairs=400")


def study_env() -> dict[str, str]:
    """This environment without ``RAY_ADDRESS``: a study subprocess starts its own local Ray."""
    return {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def tiny_study_command(name: str, root: Path, *flags: str) -> list[str]:
    """``python study/run.py`` on the tiny study: storage under ``root/studies``, MLflow in
    ``root/mlflow.db`` (pass ``--tracking-uri`` to change it); later flags override earlier."""
    return [sys.executable, str(ROOT / "study" / "run.py"), "--name", name,
            "--storage", str(root / "studies"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
            *TINY_STUDY_FLAGS, *flags]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 in its own process group, stopped by its PGID."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        """Start the server (sqlite backend, local artifact root) and wait for ``/health``."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / "server.log"
        with log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_http(f"{self.url}/health", timeout, self.process)
        except RuntimeError as error:
            self.stop()
            raise RuntimeError(f"{error}: {log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        """SIGTERM the server's process group (SIGKILL after 20 s)."""
        if self.process is None:
            return
        stop_process_group(self.process)
        self.process = None


class TcpRelay:
    """A TCP relay from ``port`` on 127.0.0.1 to ``target_port``: ``cut`` makes the service
    unreachable at once (the relay stops listening and closes every open connection) and
    ``start`` restores it on the same port, without restarting the service behind it."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, free_port()
        self._sockets: list[socket.socket] = []  # the listener and every relayed connection
        self._lock = threading.Lock()

    def start(self) -> None:
        """Listen on ``port`` and relay each connection (until ``cut``)."""
        listener = socket.create_server(("127.0.0.1", self.port))
        with self._lock:
            self._sockets.append(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                service = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, service]
            for source, sink in ((client, service), (service, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` to ``sink`` until either side closes, then close both."""
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._sockets = [sock for sock in self._sockets if sock not in (source, sink)]
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump of the other direction
            sock.close()


def wait_for_http(url: str, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    """Poll ``url`` until it answers with any HTTP status (401 counts: auth may be on)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if (process is not None and process.poll() is not None) \
                    or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer") from None
            time.sleep(0.5)


def stop_process_group(process: subprocess.Popen[Any], grace: float = 20.0) -> None:
    """SIGTERM ``process``'s group (it was started with ``start_new_session``), then SIGKILL."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        process.wait()


class RayCluster:
    """``ray start --head`` with token auth, its own temp dir and ports; stopped by PID.

    ``ray stop`` would stop every Ray on the machine; instead every process whose command line
    names this cluster's temp dir or GCS port, and their descendants, get SIGTERM then SIGKILL.
    Ray replaces 127.0.0.1 by the host's own address for the node IP
    (``services.resolve_ip_for_localhost``); the job API listens on 127.0.0.1 only.
    """

    def __init__(self, num_cpus: int = 2) -> None:
        # a short path: Ray's socket paths under it must stay within AF_UNIX's 107 bytes
        self.root, self.num_cpus = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")), num_cpus
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.client_port = free_port()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, token: str | None = "own") -> dict[str, str]:
        """Environment of a ``ray`` CLI call: token mode with this cluster's token, a given
        token, or (``None``) token mode not exported and no token variable at all."""
        env = {k: v for k, v in study_env().items()
               if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env["PATH"] = f"{RAY_CLI.parent}{os.pathsep}{env.get('PATH', '')}"  # jobs' ``python``
        if token is not None:
            env.update(RAY_AUTH_MODE="token",
                       RAY_AUTH_TOKEN=self.token if token == "own" else token)
        return env

    def start(self) -> None:
        """``ray start --head`` (returns once the head's daemons are up)."""
        started = subprocess.run(
            [str(RAY_CLI), "start", "--head", "--node-ip-address=127.0.0.1",
             f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
             f"--ray-client-server-port={self.client_port}", f"--num-cpus={self.num_cpus}",
             f"--temp-dir={self.root / 'ray'}", "--disable-usage-stats"],
            env=self.env(), capture_output=True, text=True, timeout=120)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed: {started.stderr[-3000:]}")
        wait_for_http(f"{self.dashboard_url}/api/version", timeout=120)

    @property
    def gcs_address(self) -> str:
        """Where nodes join: the host's own address (Ray's choice, see above) and GCS port."""
        return (self.root / "ray" / "ray_current_cluster").read_text().strip()

    def join(self, num_cpus: int = 1,
             token: str | None = "own") -> subprocess.CompletedProcess[str]:
        """``ray start --address=<head>`` for one more node on this machine."""
        return subprocess.run(
            [str(RAY_CLI), "start", f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
             "--disable-usage-stats"],
            env=self.env(token), capture_output=True, text=True, timeout=120)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir or GCS port, and descendants."""
        marks = (str(self.root / "ray"), f":{self.gcs_port}")
        found: dict[int, psutil.Process] = {}
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or ())
            if any(mark in command for mark in marks):
                found[process.pid] = process
                try:
                    found.update({child.pid: child for child in process.children(True)})
                except psutil.NoSuchProcess:
                    continue
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left after 15 s."""
        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=15)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def listening_addresses(port: int) -> set[str]:
    """The local IP addresses something listens on at TCP ``port``."""
    return {c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def child_trial_ids(database: Path, status: str) -> list[str]:
    """The Tune trial ids (tag ``marginlab.trial_id``) of the child runs (runs tagged with a
    parent) in ``status`` in an MLflow sqlite store; none while the store or its tables do not
    exist yet. Read with sqlite directly: safe to poll while a study writes the store."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from study.tracking import TRIAL_ID_TAG

    if not database.exists():
        return []
    with contextlib.closing(sqlite3.connect(database)) as connection:
        try:
            rows = connection.execute(
                "select trial.value from runs r "
                "join tags parent on r.run_uuid = parent.run_uuid and parent.key = ? "
                "join tags trial on r.run_uuid = trial.run_uuid and trial.key = ? "
                "where r.status = ?", (MLFLOW_PARENT_RUN_ID, TRIAL_ID_TAG, status)).fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
    return [value for (value,) in rows]


def count_child_runs(database: Path, status: str) -> int:
    """How many child runs are in ``status`` (``child_trial_ids``)."""
    return len(child_trial_ids(database, status))
