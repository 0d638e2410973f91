"""The deployable answer: the cheapest trial within ε of the best TAR, from a constructed MLflow
store; its threshold against one computed independently; the exported YAML trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.pareto import Point, completed_points
from study.recommend import NoRecommendation, export_recommendation, recommend
from study.run import UsageError, build_parser, options_from_args
from study.tracking import OUTCOME_TAG, SPACE_TAG, TRIAL_ID_TAG
from tests.services import study_env
from workers.config import parse_trial_config
from workers.data import TensorDataset
from workers.evaluation import evaluate_open_set, sample_pairs

#: a trial config small enough to train in seconds (``tests/workers/test_train.py``'s)
CONFIG = parse_trial_config({
    "epochs": 1, "batch_size": 32, "loss": {"name": "cosface"},
    "data": {"source": "synthetic", "num_identities": 96, "samples_per_identity": 12,
             "heldout_identities": 48},
    "model": {"backbone": "small_cnn", "embedding_dim": 64, "width": 16},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.45},
    "evaluation": {"num_pairs": 600}})


def _trial(tar: float, flops: float, *, std: float = 0.03, accuracy: float = 0.9,
           outcome: str = "complete", far: str = "1e-03") -> dict[str, Any]:
    return {"outcome": outcome, "metrics": {
        "verification_accuracy": accuracy, "verification_accuracy_std": 0.01,
        "head_flops_per_sample": flops, f"tar_at_far_{far}": tar, f"tar_at_far_{far}_std": std,
        f"threshold_at_far_{far}": 0.25 + tar / 10, "samples_per_second": 1e6 / flops}}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """One sqlite MLflow store; each test builds its own study (experiment) in it."""
    root = tmp_path_factory.mktemp("store")
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _study(client: MlflowClient, name: str, trials: dict[str, dict[str, Any]]
           ) -> list[Point]:
    """A parent run with one child run per trial (tags, last-epoch metrics and ``trial.yaml``,
    as ``study.tracking`` logs them); returns ``completed_points`` read back."""
    experiment = client.create_experiment(name)
    parent = client.create_run(experiment).info.run_id
    for trial_id, trial in trials.items():
        run = client.create_run(experiment, tags={
            MLFLOW_PARENT_RUN_ID: parent, OUTCOME_TAG: trial["outcome"],
            TRIAL_ID_TAG: trial_id, SPACE_TAG: "cosface"}).info.run_id
        client.log_batch(run, metrics=[Metric(key, value, 0, 1)
                                       for key, value in trial["metrics"].items()])
        client.log_text(run, CONFIG.to_yaml(), "trial.yaml")
    return completed_points(client, experiment, parent)


def _chosen(recommendation: Any) -> tuple[str, str]:
    return recommendation.point.trial_id, recommendation.best.trial_id


def test_cheapest_trial_within_the_best_trials_fold_spread(store: MlflowClient) -> None:
    points = _study(store, "spread", {
        "best": _trial(0.90, 400, std=0.03),
        "close": _trial(0.88, 100),             # 0.88 ≥ 0.90 − 0.03: within, cheapest
        "pricier": _trial(0.895, 200),          # within, dearer
        "too_low": _trial(0.86, 50),            # cheaper, but outside ε
        "pruned": _trial(0.99, 10, outcome="pruned"),
        "other_far": _trial(0.99, 10, far="1e-02")})  # reports another FAR only
    recommendation = recommend(points, 1e-3)
    assert _chosen(recommendation) == ("close", "best")
    assert recommendation.epsilon == 0.03 and recommendation.within == 3
    assert recommendation.epsilon_source.startswith("the best trial's spread of TAR")
    # a given ε replaces the fold spread
    assert _chosen(recommend(points, 1e-3, epsilon=0.01)) == ("pricier", "best")
    assert _chosen(recommend(points, 1e-3, epsilon=0.0)) == ("best", "best")
    assert _chosen(recommend(points, 1e-3, epsilon=1.0)) == ("too_low", "best")
    assert _chosen(recommend(points, 1e-2)) == ("other_far", "other_far")


def test_ties_break_on_tar_then_accuracy_then_run_id() -> None:
    def point(run_id: str, tar: float, accuracy: float, flops: float) -> Point:
        return Point(run_id, run_id, "s", accuracy, flops,
                     {"tar_at_far_1e-03": tar, "tar_at_far_1e-03_std": 0.02,
                      "threshold_at_far_1e-03": 0.3}, {})

    best_tar = [point("a", 0.90, 0.90, 100), point("b", 0.90, 0.91, 100),
                point("c", 0.89, 0.99, 100)]
    # the same FLOPs: the higher TAR, then (same TAR) the higher accuracy
    assert _chosen(recommend(best_tar, 1e-3)) == ("b", "b")
    twins = [point("y", 0.9, 0.9, 100), point("x", 0.9, 0.9, 100)]
    assert _chosen(recommend(twins, 1e-3)) == ("x", "x")
    with pytest.raises(NoRecommendation, match=r"^no recommendation at --target-far 0\.001: "
                                               r"the best trial \(run z\) does not report "
                                               r"tar_at_far_1e-03_std; give --epsilon$"):
        recommend([Point("z", "z", "s", 0.9, 1, {"tar_at_far_1e-03": 0.5,
                                                  "threshold_at_far_1e-03": 0.3}, {})], 1e-3)


def test_no_trial_reaching_the_far_leaves_one_line_and_no_file(store: MlflowClient,
                                                               tmp_path: Path) -> None:
    points = _study(store, "unresolved", {"a": _trial(0.9, 100, far="1e-02"),
                                          "b": _trial(0.8, 50, outcome="pruned")})
    (tmp_path / "recommended.yaml").write_text("stale")  # from an earlier run of the study
    facts, why = export_recommendation(store, points, 1e-3, None, tmp_path)
    assert facts is None and not list(tmp_path.iterdir())
    assert why == ("no recommendation at --target-far 0.001: none of the 1 completed trials "
                   "reports tar_at_far_1e-03 and threshold_at_far_1e-03 (a FAR is reported when "
                   "FAR × impostor pairs ≥ 1; held-out pairs are half impostors, so "
                   "evaluation.num_pairs ≥ 2000 resolves it), or pick a larger --target-far")
    assert export_recommendation(store, [], 1e-3, None, tmp_path)[1].startswith(
        "no recommendation at --target-far 0.001: no trial completed (")


def _header(text: str) -> dict[str, Any]:
    """The commented ``recommendation:`` block at the top of ``recommended.yaml``."""
    lines = text.splitlines()
    start = lines.index("# recommendation:")
    block = [line[2:] for line in lines[start:] if line.startswith("#")]
    return yaml.safe_load("\n".join(block))["recommendation"]


@pytest.fixture(scope="module")
def exported(store: MlflowClient, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], Path]:
    points = _study(store, "exported", {"best": _trial(0.90, 400, std=0.03, accuracy=0.95),
                                        "close": _trial(0.88, 100, accuracy=0.93)})
    directory = tmp_path_factory.mktemp("recommended")
    facts, why = export_recommendation(store, points, 1e-3, None, directory)
    assert why == "" and facts is not None
    return facts, directory


def test_recommended_yaml_holds_the_operating_point_and_md_says_why(exported: tuple) -> None:
    facts, directory = exported
    assert facts["files"] == [str(directory / "recommended.yaml"),
                              str(directory / "recommended.md")]
    text = (directory / "recommended.yaml").read_text()
    header = _header(text)
    assert header == {key: value for key, value in facts.items() if key != "files"}
    assert (header["trial_id"], header["target_far"], header["tar"]) == ("close", 0.001, 0.88)
    assert header["threshold"] == pytest.approx(0.338) and header["tar_fold_std"] == 0.03
    assert header["head_flops_per_sample"] == 100 and header["samples_per_second"] == 1e4
    assert header["best_tar"]["trial_id"] == "best" and header["epsilon"] == 0.03
    assert parse_trial_config(yaml.safe_load(text)) == CONFIG  # the comments are only that
    paragraph = (directory / "recommended.md").read_text()
    assert paragraph.count("\n") == 1 and "**Recommended: cosface trial close**" in paragraph
    for expected in ("accepts 88.00% of genuine pairs (± 3.00% over the verification folds) "
                     "at the cosine threshold 0.3380",
                     "chosen over the most accurate trial at this FAR, cosface trial best "
                     "(TAR 90.00%, accuracy 95.00%, 400 FLOP per sample)",
                     "within ε = 3.00% of that trial's (ε: the best trial's spread of TAR over "
                     "its 10 verification folds, a difference that evaluation cannot tell from "
                     "noise) for 4.0× less head compute",
                     "the cheapest of the 2 trials within ε"):
        assert expected in paragraph, paragraph


@pytest.mark.slow
def test_recommended_yaml_trains_through_workers_train(exported: tuple, tmp_path: Path) -> None:
    _, directory = exported
    process = subprocess.run(
        [sys.executable, "-m", "workers.train", "--config", str(directory / "recommended.yaml"),
         "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
        env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]
    ran = parse_trial_config(yaml.safe_load((tmp_path / "out" / "trial.yaml").read_text()))
    assert ran == CONFIG
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["epoch"] == 0


def test_logged_threshold_is_the_held_out_score_at_the_far() -> None:
    """``evaluate_open_set``'s threshold and TAR at FAR F, against a brute force over the
    held-out pair scores: the lowest impostor score t with (#impostors > t) ≤ F·I."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60).repeat_interleave(4)
    centres = torch.randn(60, 8, generator=generator)
    features = centres[labels] + 0.8 * torch.randn(240, 8, generator=generator)
    model = torch.nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(8, 8, generator=generator))
    metrics = evaluate_open_set(model, TensorDataset(features, labels), [], num_pairs=2000,
                                seed=5)
    with torch.no_grad():
        embeddings = F.normalize(model(features), dim=1).numpy()
    left, right, issame = sample_pairs(labels, 2000, seed=5)
    scores = (embeddings[left] * embeddings[right]).sum(1)
    impostors, genuine = scores[~issame], scores[issame]
    for far, name in ((1e-2, "1e-02"), (1e-3, "1e-03")):
        allowed = far * len(impostors)
        threshold = min(t for t in impostors if (impostors > t).sum() <= allowed)
        assert metrics[f"threshold_at_far_{name}"] == pytest.approx(threshold, abs=1e-6)
        assert metrics[f"tar_at_far_{name}"] == pytest.approx(np.mean(genuine > threshold),
                                                              abs=1e-3)
    assert 0 < metrics["tar_at_far_1e-02"] < 1  # neither end: the threshold decides


@pytest.mark.parametrize(("flags", "expected"), [
    (["--target-far", "0.005"], "--target-far = 0.005 must be one of the FARs evaluation "
                                "reports: 0.1, 0.01, 0.001, 0.0001"),
    (["--target-far", "1"], "--target-far = 1.0 must be one of the FARs evaluation reports"),
    (["--epsilon", "1.5"], "--epsilon = 1.5 must be a number in [0, 1] (a difference of TAR)"),
    (["--epsilon", "nan"], "--epsilon = nan must be a number in [0, 1]"),
])
def test_bad_target_far_and_epsilon_are_one_line_before_ray(flags: list[str], expected: str,
                                                            tmp_path: Path) -> None:
    args = build_parser().parse_args([*flags, "--storage", str(tmp_path),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    with pytest.raises(UsageError) as error:
        options_from_args(args)
    assert str(error.value).startswith(expected), str(error.value)
    assert "\n" not in str(error.value)
