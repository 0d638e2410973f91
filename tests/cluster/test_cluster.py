"""Cluster use as the README describes it: ``ray start --head`` with token auth, a study sent with
``ray job submit --working-dir .``, its runs in a real ``mlflow server``, seen in the MLflow UI.

Everything here is started by the test (free ports, temporary directories) and stopped by PID
at the end, also when a test fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tests.browser import Browser
from tests.services import (
    RAY_CLI,
    ROOT,
    TINY_STUDY_FLAGS,
    MlflowServer,
    RayCluster,
    listening_addresses,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
STUDY = "on_cluster"
#: set to a path to keep the MLflow UI screenshot (the README's picture is made this way)
SCREENSHOT_ENV = "MARGINLAB_UI_SCREENSHOT"


@dataclass
class SubmittedStudy:
    cluster: RayCluster
    server: MlflowServer
    submit: subprocess.CompletedProcess[str]
    root: Path


def _ray(cluster: RayCluster, *args: str, token: str | None = "own",
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RAY_CLI), *args], env=cluster.env(token), capture_output=True,
                          text=True, timeout=timeout)


def _submit(cluster: RayCluster, server: MlflowServer, root: Path, submission_id: str,
            token: str | None = "own") -> subprocess.CompletedProcess[str]:
    return _ray(cluster, "job", "submit", "--address", cluster.dashboard_url,
                "--submission-id", submission_id, "--working-dir", str(ROOT), "--",
                "python", "study/run.py", "--name", STUDY, "--space", "cosface", "arcface",
                "--trials", "2", "--scheduler", "none", "--sampler", "random",
                "--storage", str(root / "studies"), "--tracking-uri", server.url,
                *TINY_STUDY_FLAGS, token=token, timeout=900)


@pytest.fixture(scope="module")
def submitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubmittedStudy]:
    """A cluster and an MLflow server, and a tiny two-loss study submitted as a Ray job."""
    root = tmp_path_factory.mktemp("cluster")
    server = MlflowServer(root / "mlflow")
    cluster = RayCluster()
    try:
        server.start()
        cluster.start()
        yield SubmittedStudy(cluster, server, _submit(cluster, server, root, "study-1"), root)
    finally:
        cluster.stop()
        server.stop()


def _runs(server: MlflowServer) -> tuple[Run, list[Run]]:
    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None, "the study never reached the MLflow server"
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    return parents[0], [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]


def test_submitted_study_succeeds_and_lands_in_the_mlflow_server(
        submitted: SubmittedStudy) -> None:
    assert submitted.submit.returncode == 0, submitted.submit.stderr[-3000:]
    status = _ray(submitted.cluster, "job", "status", "--address",
                  submitted.cluster.dashboard_url, "study-1")
    assert "job 'study-1' succeeded" in status.stdout.lower()
    parent, children = _runs(submitted.server)
    assert parent.info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["head.loss"] for c in children} <= {"cosface", "arcface"}
    assert parent.data.params["cli.tracking_uri"] == submitted.server.url
    client = MlflowClient(submitted.server.url)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")} == {
        "pareto/pareto.csv", "pareto/pareto.parquet", "pareto/pareto.png"}
    # security: the cluster's token is nowhere in what the study logged
    for run in (parent, *children):
        logged = {**run.data.params, **run.data.tags, **run.data.metrics}
        assert not any(submitted.cluster.token in f"{k}{v}" for k, v in logged.items())


@pytest.mark.parametrize(("token", "refusal"), [
    (None, "no authentication token was found"),
    ("0" * 64, "token is invalid or incorrect"),
], ids=["no-token", "wrong-token"])
def test_submission_without_the_token_is_refused(submitted: SubmittedStudy, token: str | None,
                                                 refusal: str) -> None:
    refused = _submit(submitted.cluster, submitted.server, submitted.root, f"refused-{token}",
                      token=token)
    assert refused.returncode != 0
    assert refusal in refused.stdout + refused.stderr
    listed = _ray(submitted.cluster, "job", "list", "--address", submitted.cluster.dashboard_url)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert "study-1" in listed.stdout and "refused-" not in listed.stdout


def test_a_node_joins_with_the_token_and_not_without(submitted: SubmittedStudy) -> None:
    cluster = submitted.cluster
    refused = cluster.join(token="0" * 64)
    assert refused.returncode != 0
    assert "Authentication token is missing or incorrect" in refused.stdout + refused.stderr
    joined = cluster.join()
    assert joined.returncode == 0, joined.stderr[-2000:]
    deadline = time.monotonic() + 60
    while True:  # the autoscaler's status lists a new node a few seconds after it joined
        status = _ray(cluster, "status", f"--address={cluster.gcs_address}")
        assert status.returncode == 0, status.stderr[-2000:]
        if f"0.0/{cluster.num_cpus + 1}.0 CPU" in status.stdout:  # the head's 2, the node's 1
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(2)
    assert status.stdout.split("Active:")[1].split("Pending:")[0].count("node_") == 2


def test_services_listen_on_loopback_only(submitted: SubmittedStudy) -> None:
    assert listening_addresses(submitted.server.port) == {"127.0.0.1"}
    assert listening_addresses(submitted.cluster.dashboard_port) == {"127.0.0.1"}


def test_mlflow_ui_nests_the_child_runs_under_the_study(submitted: SubmittedStudy,
                                                       tmp_path: Path) -> None:
    parent, children = _runs(submitted.server)
    child_names = sorted(c.info.run_name for c in children)
    url = f"{submitted.server.url}/#/experiments/{parent.info.experiment_id}/runs"
    screenshot = tmp_path / "mlflow-ui.png"

    async def look() -> tuple[str, str]:
        async with Browser(tmp_path / "chromium") as page:
            await page.open(url)
            collapsed = await page.wait_for_text(parent.info.run_name,
                                                 f"{len(children) + 1} matching runs")
            # the parent row's expander (the only one: child rows have none)
            clicked = await page.evaluate(
                "(() => { const b = document.querySelectorAll("
                "'button[data-component-id*=\"runnamecellrenderer\"]');"
                " b.forEach(x => x.click()); return b.length; })()")
            assert clicked == 1
            expanded = await page.wait_for_text(*child_names)
            await page.screenshot(screenshot)
            return collapsed, expanded

    collapsed, expanded = asyncio.run(look())
    assert not any(name in collapsed for name in child_names), "children not nested"
    assert all(expanded.index(parent.info.run_name) < expanded.index(name)
               for name in child_names)
    assert screenshot.stat().st_size > 20_000
    if keep := os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(screenshot, keep)
