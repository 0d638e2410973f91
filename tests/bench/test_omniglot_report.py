"""The Omniglot report: its spaces are grid studies of the expected sizes, and the document
is generated from what MLflow holds (a store filled directly, no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from bench import omniglot_report as report
from search_spaces import load_spaces, study_grid
from study.tracking import OUTCOME_TAG, SPACE_TAG, STUDY_TAG

#: grid points per campaign and question: every point × the campaign's seeds
SIZES = {
    "omniglot-1-epoch": {"q1_margins": 18, "q2_partial_fc": 12, "q3_dsoftmax": 9,
                         "q4_virtual_so": 6},
    "omniglot-12-epochs": {"q1_margins": 12, "q4_virtual_so": 4, "q5_modern": 16},
    "glyphs": {"q1_margins": 2, "q2_partial_fc": 8, "q3_dsoftmax": 6},
}


def _command_trials(campaign: report.Campaign, question: str, output: Path, **kw: Any) -> int:
    command = report.study_command(campaign, question, output, **kw)
    return int(command[command.index("--trials") + 1])


def test_campaign_spaces_are_grid_studies_of_the_expected_sizes(tmp_path: Path) -> None:
    assert {c.name: dict.fromkeys(c.questions) for c in report.CAMPAIGNS} == {
        name: dict.fromkeys(sizes) for name, sizes in SIZES.items()}
    for campaign in report.CAMPAIGNS:
        for question in campaign.questions:
            spaces = load_spaces(report.campaign_spaces(campaign, question, tmp_path))
            assert len(study_grid(spaces)) == SIZES[campaign.name][question]
            assert {p.key for s in spaces for p in s.params} <= {"seed", "head.sample_ratio"}
            quick = load_spaces(report.campaign_spaces(campaign, question, tmp_path / "q",
                                                       quick=True))
            assert {seed for _, values in study_grid(quick) for seed in [values["seed"]]} == {0}


def test_every_point_names_a_space_and_ratio_its_campaign_runs(tmp_path: Path) -> None:
    for campaign in report.CAMPAIGNS:
        for name in campaign.questions:
            question = report.BY_NAME[name]
            labels = [p.label for p in question.points]
            assert question.baseline in labels
            assert {c.candidate for c in question.claims} | {
                c.reference for c in question.claims} <= set(labels)
            if campaign.space_names(name) is not None:
                continue  # a baseline-only study
            for point in question.points:
                assert point.study in campaign.questions, (campaign.name, point)
                grid = study_grid(load_spaces(report.campaign_spaces(campaign, point.study,
                                                                     tmp_path)))
                ratios = {v.get("head.sample_ratio", 1.0) for s, v in grid
                          if s.name == point.space}
                assert ratios, (campaign.name, point)
                assert point.sample_ratio is None or point.sample_ratio in ratios, point


def glyph_folder(path: Path) -> Path:
    """A folder with the manifest ``python -m workers.data.glyphs`` writes (no images)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({
        "identities": 10000, "seed": 0, "styles_min": 12, "styles_max": 0, "size": 64,
        "images": 303209, "fonts": [{"images": 9}] * 30 + [{"images": 0}],
        "split": {"heldout": [0] * 2000},
        "data": {"source": "recordio", "path": str(path), "seed": 0, "heldout_fraction": 0.2,
                 "image_size": 64, "channels": 1}}))
    return path


def test_study_commands_run_every_grid_point_once_on_their_data(tmp_path: Path) -> None:
    one_epoch, twelve, glyphs = report.CAMPAIGNS
    command = report.study_command(one_epoch, "q2_partial_fc", tmp_path)
    assert command[command.index("--trials") + 1] == "12"
    assert command[command.index("--sampler") + 1] == "grid"
    assert command[command.index("--name") + 1] == "q2_partial_fc"
    assert command[command.index("--data") + 1] == "omniglot"
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in command and "--resume" not in command
    command = report.study_command(twelve, "q5_modern", tmp_path, resume=True)
    assert command[command.index("--name") + 1] == "e12_q5_modern" and "--resume" in command
    assert command[command.index("--epochs") + 1] == "12"
    assert "optim.schedule=cosine" in command and "optim.warmup_epochs=1" in command
    folder = glyph_folder(tmp_path / "glyphs")
    command = report.study_command(glyphs, "q2_partial_fc", tmp_path, glyphs=folder)
    assert command[command.index("--data") + 1] == "recordio"
    assert command[command.index("--data-path") + 1] == str(folder / "train.rec")
    assert "data.heldout_fraction=0.2" in command and "data.channels=1" in command
    assert _command_trials(glyphs, "q1_margins", tmp_path, glyphs=folder) == 2
    assert "10000 identities, 303209 images from 30 font faces; 2000 identities held out" in \
        report.glyph_data(folder)


def test_bad_campaign_input_is_one_line_before_any_study(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        report.main(["--campaign", "glyphs", "--output", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "--glyphs = None: the glyphs campaign needs the folder" in capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    (tmp_path / "out").mkdir()
    _fill_store(uri, [report.CAMPAIGNS[0]])
    with pytest.raises(SystemExit):
        report.main(["--campaign", "omniglot-1-epoch", "--output", str(tmp_path / "out")])
    assert "already holds q1_margins, q2_partial_fc" in capsys.readouterr().err


def _fill_store(uri: str, campaigns: Any = report.CAMPAIGNS) -> None:
    """Every seed of every point of every question of ``campaigns``, accuracy rising with the
    point's index (12-epoch runs 0.05 higher)."""
    client = MlflowClient(uri)
    for campaign in campaigns:
        for name in campaign.questions:
            question = report.BY_NAME[name]
            study = campaign.study(name)
            experiment = client.create_experiment(study)
            parent = client.create_run(experiment, tags={"marginlab.role": "parent",
                                                         STUDY_TAG: study,
                                                         "marginlab.git_revision": "abc123"})
            client.log_param(parent.info.run_id, "version.torch", "2.x")
            client.log_metric(parent.info.run_id, "study_wall_seconds", 1800.0)
            client.set_terminated(parent.info.run_id)
            names = campaign.space_names(name)
            points = [p for p in question.points if p.study == name
                      and (names is None or p.space in names)]
            for index, point in enumerate(points):
                ratio = point.sample_ratio or 1.0
                for seed in campaign.seeds:
                    child = client.create_run(experiment, tags={
                        MLFLOW_PARENT_RUN_ID: parent.info.run_id, OUTCOME_TAG: "complete",
                        SPACE_TAG: point.space, STUDY_TAG: study})
                    run_id = child.info.run_id
                    client.log_param(run_id, "head.loss", point.space.split("_")[0])
                    client.log_param(run_id, "inter.sample_ratio", str(ratio))
                    accuracy = 0.8 + 0.02 * index + 0.001 * seed
                    metrics = {
                        "verification_accuracy": accuracy + 0.05 * (campaign.prefix == "e12_"),
                        "head_flops_per_sample": 1e5 * ratio * (index + 1),
                        "sampled_classes": 700 * ratio, "epoch_train_seconds": 60 + seed,
                        "head_seconds_per_step": 0.01 * ratio, "peak_memory_bytes": 2**30,
                        "tar_at_far_1e-02": 0.5, "tar_at_far_1e-03": 0.1,
                        "heldout_intra_compactness": 0.8,
                        "heldout_inter_separation_mean": 0.1}
                    for key, value in metrics.items():
                        client.log_metric(run_id, key, value)
                    client.set_terminated(run_id)


@pytest.mark.timeout(180)
def test_document_is_generated_from_mlflow(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fill_store(uri)
    doc = report.write_report(uri, tmp_path / "results.md", tmp_path / "images")
    text = doc.read_text()
    assert "`abc123`" in text and "torch 2.x" in text
    sections = [line for line in text.splitlines() if line.startswith("# ")]
    assert sections[1:] == [f"# {c.title}" for c in reversed(report.CAMPAIGNS)]
    assert "studies' wall time 2.00 h (4 of 4 studies)" in text  # the first campaign
    for campaign in report.CAMPAIGNS:
        assert f"--campaign {campaign.name}`" in text
        for name in campaign.questions:
            if campaign.space_names(name) is not None:
                assert f"## {campaign.name} · {name}:" not in text
                continue
            assert f"## {campaign.name} · {name}:" in text
            for kind in ("pareto", "accuracy_vs_flops"):
                assert (tmp_path / "images" / f"{campaign.prefix}{name}_{kind}.png").is_file()
        assert (tmp_path / "images" / f"{campaign.prefix}intra_vs_inter.png").is_file()
    assert "| tar_at_far_1e-03 |" in text.replace("| accuracy | ", "| ")
    one_epoch = text[text.index("# Omniglot, one epoch"):]
    # q1: cosface (index 2) − normface (index 1) = +0.02 beyond a spread of 0.002
    assert ("cosface − normface = +0.0200 accuracy, seeds' spread 0.0020 (n = 3, 3): claim "
            "higher — **reproduced**") in one_epoch
    # q2: r=0.3 comes from q2 (index 0) and r=1.0 from q1's arcface (index 3)
    assert "arcface r=0.3 − arcface r=1.0 = -0.0600" in one_epoch
    assert ("| arcface r=0.3 | 3 | 0.8010 ± 0.0010 | 0.1000 ± 0.0000 | 3e+04 | 210.0 | "
            "61.0 ± 1.0 | 3.0 | 1024 |") in one_epoch
    # glyphs: r=1.0 is the baseline-only q1 study's arcface (its only point, index 0)
    glyphs = text[text.index("# Font glyphs"):text.index("# Omniglot at a real schedule")]
    assert "arcface r=0.3 − arcface r=1.0 = +0.0000 accuracy" in glyphs
    # near-saturated accuracy: the claims are also checked on the table's TAR
    assert ("arcface r=0.3 − arcface r=1.0 = +0.0000 tar_at_far_1e-03, seeds' spread 0.0000 "
            "(n = 2, 2): claim matching — **reproduced (within noise)**") in glyphs
    assert "tar_at_far_1e-03, seeds'" not in one_epoch
    assert "| arcface r=1.0 | 2 | 0.8005 ± 0.0007 |" in glyphs
    # 12 epochs: the modern losses against ArcFace, two seeds each
    twelve = text[text.index("# Omniglot at a real schedule"):text.index("# Omniglot, one")]
    assert "adaface − arcface = -0.0600 accuracy, seeds' spread 0.0014 (n = 2, 2)" in twelve
    assert "the same" not in text  # every sampled point saw its own number of classes


def test_a_campaign_missing_from_the_store_says_how_to_run_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fill_store(uri, [report.CAMPAIGNS[0]])
    text = report.write_report(uri, tmp_path / "results.md", tmp_path / "images").read_text()
    assert ("Not in this store: `python bench/omniglot_report.py --campaign glyphs` runs it."
            in text)
    assert "## omniglot-1-epoch · q1_margins:" in text


def test_points_that_saw_the_same_classes_are_named() -> None:
    summary = pd.DataFrame({"sampled_classes_mean": [769.0, 76.2, 61.5, 61.4, 769.0]},
                           index=["full", "r=0.1", "r=0.03", "batch", "other full"])
    assert report.same_classes(summary) == [
        "- r=0.03, batch: the same 61.5 classes per step — the batch's positives, always kept, "
        "outnumber the sampled fraction"]


def test_a_campaign_the_store_lacks_keeps_its_earlier_section(tmp_path: Path) -> None:
    """Regenerating from a store with one campaign keeps another campaign's section from the
    document's earlier generation (marked as kept, once), and never invents one."""
    first = f"sqlite:///{tmp_path / 'first.db'}"
    _fill_store(first, [report.CAMPAIGNS[0]])
    doc = report.write_report(first, tmp_path / "results.md", tmp_path / "images")
    one_epoch = doc.read_text()[doc.read_text().index("# Omniglot, one epoch"):]
    second = f"sqlite:///{tmp_path / 'second.db'}"
    _fill_store(second, [report.CAMPAIGNS[2]])
    for _ in range(2):
        text = report.write_report(second, doc, tmp_path / "images").read_text()
        kept = text[text.index("# Omniglot, one epoch"):]
        assert kept.count(report.KEPT) == 1
        assert kept.replace(report.KEPT + "\n\n", "").rstrip() == one_epoch.rstrip()
    assert "## glyphs · q2_partial_fc:" in text
    assert "Not in this store: `python bench/omniglot_report.py --campaign omniglot-12-epochs`" \
        in text
