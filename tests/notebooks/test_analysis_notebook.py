"""notebooks/analysis.ipynb: saved without outputs, and runs headless against a real study."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from nbclient import NotebookClient

from study.pareto import completed_points, non_dominated
from study.tracking import STUDY_TAG
from tests.services import ROOT, study_env, tiny_study_command

NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
STUDY = "nb"


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _output_text(cell: nbformat.NotebookNode) -> str:
    """Everything a cell printed or displayed as text (streams, plain, markdown, html)."""
    parts = []
    for output in cell.outputs:
        parts.append(output.get("text", ""))
        data = output.get("data", {})
        parts += [data.get(kind, "") for kind in ("text/plain", "text/markdown", "text/html")]
    return "\n".join(parts)


def test_notebook_is_saved_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.cells[0].cell_type == "markdown"
    assert "MARGINLAB_TRACKING_URI" in notebook.cells[0].source
    for cell in _code_cells(notebook):
        assert cell.outputs == [], cell.source
        assert cell.execution_count is None, cell.source


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_notebook_shows_the_front_of_a_study_it_did_not_make(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # where tiny_study_command logs
    command = tiny_study_command(STUDY, tmp_path, "--space", "cosface", "arcface", "--trials",
                                 "3", "--scheduler", "none", "--sampler", "random")
    process = subprocess.run(command, capture_output=True, text=True, timeout=900,
                             env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]

    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(STUDY).experiment_id
    (parent,) = client.search_runs([experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{STUDY}'"
                                   " and tags.`marginlab.role` = 'parent'")
    parent_id = parent.info.run_id
    children = {run.info.run_id for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")}
    front = {p.run_id for p in non_dominated(completed_points(client, experiment_id, parent_id))}
    assert len(children) == 3 and front

    monkeypatch.setenv("MARGINLAB_TRACKING_URI", uri)  # the kernel inherits the environment
    monkeypatch.setenv("MARGINLAB_STUDY", STUDY)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, kernel_name="python3", timeout=300,
                   resources={"metadata": {"path": str(ROOT)}}).execute()

    cells = _code_cells(notebook)
    errors = [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    assert errors == []
    (load,) = [cell for cell in cells if cell.source.startswith("# Load")]
    assert parent_id in _output_text(load)
    (pareto,) = [cell for cell in cells if cell.source.startswith("# Pareto front")]
    shown = {run_id for run_id in children if run_id in _output_text(pareto)}
    assert shown == front  # the front's runs, and no run off the front
    plots = [cell for cell in cells if "analysis.plot_" in cell.source]
    assert len(plots) == 3  # the front, accuracy vs sample_ratio, compactness vs separation
    for cell in plots:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
