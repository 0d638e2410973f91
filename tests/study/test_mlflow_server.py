"""A study logging over HTTP to a real ``mlflow server`` process on loopback completes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from tests.services import MlflowServer, study_env, tiny_study_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_study_over_http_completes(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    process = subprocess.run(
        tiny_study_command("over_http", tmp_path, "--space", "cosface", "--trials", "2",
                           "--tracking-uri", mlflow_server.url),
        capture_output=True, text=True, timeout=900, env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("over_http")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    children = [r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "pareto")} == {
        "pareto/pareto.csv", "pareto/pareto.parquet", "pareto/pareto.png"}
