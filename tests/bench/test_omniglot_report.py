"""The Omniglot report: its spaces are grid studies of the expected sizes, and the document
is generated from what MLflow holds (a store filled directly, no training)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from bench import omniglot_report as report
from search_spaces import load_spaces, study_grid
from study.tracking import OUTCOME_TAG, SPACE_TAG, STUDY_TAG

#: grid points per question: every point × seeds 0, 1, 2
SIZES = {"q1_margins": 18, "q2_partial_fc": 12, "q3_dsoftmax": 9, "q4_virtual_so": 6}


def test_report_spaces_are_grid_studies_of_the_expected_sizes() -> None:
    assert [q.name for q in report.QUESTIONS] == list(SIZES)
    for question in report.QUESTIONS:
        spaces = load_spaces(report.space_files(question.name))
        assert len(study_grid(spaces)) == report.grid_size(question.name) == SIZES[question.name]
        assert all(p.key == "seed" or p.key.startswith(("head.", "loss.")) for s in spaces
                   for p in s.params)
        assert report.grid_size(question.name, quick=True) == len(
            study_grid(load_spaces(report.space_files(question.name, quick=True)))) // 3


def test_every_point_names_a_space_and_ratio_its_study_runs() -> None:
    for question in report.QUESTIONS:
        labels = [p.label for p in question.points]
        assert question.baseline in labels
        assert {c.candidate for c in question.claims} | {c.reference for c in question.claims} \
            <= set(labels)
        for point in question.points:
            grid = study_grid(load_spaces(report.space_files(point.study)))
            ratios = {v.get("head.sample_ratio", 1.0) for s, v in grid if s.name == point.space}
            assert ratios, point
            assert point.sample_ratio is None or point.sample_ratio in ratios, point


def test_study_command_runs_every_grid_point_once(tmp_path: Path) -> None:
    command = report.study_command("q2_partial_fc", tmp_path, quick=False)
    assert command[command.index("--trials") + 1] == "12"
    assert command[command.index("--sampler") + 1] == "grid"
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in command


def _fill_store(uri: str) -> None:
    """Three seeds of every point of every question, accuracy rising with the FLOPs."""
    client = MlflowClient(uri)
    for question in report.QUESTIONS:
        experiment = client.create_experiment(question.name)
        parent = client.create_run(experiment, tags={"marginlab.role": "parent",
                                                     STUDY_TAG: question.name,
                                                     "marginlab.git_revision": "abc123"})
        client.log_param(parent.info.run_id, "version.torch", "2.x")
        client.log_metric(parent.info.run_id, "study_wall_seconds", 60.0)
        client.set_terminated(parent.info.run_id)
        for index, point in enumerate(p for p in question.points if p.study == question.name):
            ratio = point.sample_ratio or 1.0
            for seed in range(3):
                child = client.create_run(experiment, tags={
                    MLFLOW_PARENT_RUN_ID: parent.info.run_id, OUTCOME_TAG: "complete",
                    SPACE_TAG: point.space, STUDY_TAG: question.name})
                run_id = child.info.run_id
                client.log_param(run_id, "head.loss", point.space.split("_")[0])
                client.log_param(run_id, "inter.sample_ratio", str(ratio))
                metrics = {"verification_accuracy": 0.8 + 0.02 * index + 0.001 * seed,
                           "head_flops_per_sample": 1e5 * ratio * (index + 1),
                           "sampled_classes": 700 * ratio, "epoch_train_seconds": 60 + seed,
                           "tar_at_far_1e-02": 0.5, "tar_at_far_1e-03": 0.1,
                           "heldout_intra_compactness": 0.8,
                           "heldout_inter_separation_mean": 0.1}
                for key, value in metrics.items():
                    client.log_metric(run_id, key, value)
                client.set_terminated(run_id)


@pytest.mark.timeout(120)
def test_document_is_generated_from_mlflow(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fill_store(uri)
    doc = report.write_report(uri, tmp_path / "results.md", tmp_path / "images", "CMD")
    text = doc.read_text()
    assert "`CMD`" in text and "`abc123`" in text and "torch 2.x" in text
    for question in report.QUESTIONS:
        assert f"## {question.name}:" in text
        assert (tmp_path / "images" / f"{question.name}_pareto.png").is_file()
        assert (tmp_path / "images" / f"{question.name}_accuracy_vs_flops.png").is_file()
    assert (tmp_path / "images" / "intra_vs_inter.png").is_file()
    assert "| tar_at_far_1e-03 |" in text.replace("| accuracy | ", "| ")
    # q1: cosface (index 2) − normface (index 1) = +0.02 beyond a spread of 0.002
    assert ("cosface − normface = +0.0200 accuracy, seeds' spread 0.0020 (n = 3, 3): claim "
            "higher — **reproduced**") in text
    # q2: r=0.3 comes from q2 (index 0) and r=1.0 from q1's arcface (index 3)
    assert "arcface r=0.3 − arcface r=1.0 = -0.0600" in text
    assert "| arcface r=0.3 | 3 | 0.8010 ± 0.0010 | 0.1000 ± 0.0000 | 3e+04 | 210.0 |" in text
    assert "the same" not in text  # every sampled point saw its own number of classes


def test_points_that_saw_the_same_classes_are_named() -> None:
    summary = pd.DataFrame({"sampled_classes_mean": [769.0, 76.2, 61.5, 61.4, 769.0]},
                           index=["full", "r=0.1", "r=0.03", "batch", "other full"])
    assert report.same_classes(summary) == [
        "- r=0.03, batch: the same 61.5 classes per step — the batch's positives, always kept, "
        "outnumber the sampled fraction"]
