"""Open-set evaluation: embedding, pair sampling, verification metrics, class statistics."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from workers.data import TensorDataset, read_pairs_bin, write_pairs_bin
from workers.evaluation import (
    FARS,
    class_centre_statistics,
    class_statistics,
    embed,
    evaluate_pair_set,
    evaluate_verification,
    sample_pairs,
    tar_at_far,
    verification_metrics,
)


class _Recorder(torch.nn.Module):
    """A linear embedder that records the batch sizes it sees."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(x))
        return self.linear(x.flatten(1))


def test_embed_batches_normalises_and_restores_mode() -> None:
    inputs = torch.randn(23, 1, 2, 3)
    model = _Recorder(torch.randn(5, 6))
    model.train()
    out = embed(model, TensorDataset(inputs, torch.zeros(23)), batch_size=8)
    assert out.shape == (23, 5) and model.training
    assert max(model.batch_sizes) <= 8 and sum(model.batch_sizes) == 23
    expected = F.normalize(inputs.flatten(1) @ model.linear.weight.T, dim=1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(23))


def test_embed_runs_in_eval_mode_without_grad() -> None:
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3),
                                torch.nn.BatchNorm1d(3))
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, o.requires_grad)))
    embed(model, TensorDataset(torch.randn(5, 1, 2, 2), torch.zeros(5)), batch_size=2)
    assert seen and all(mode == (False, False) for mode in seen)


def test_flip_tta_sums_both_views() -> None:
    inputs = torch.randn(6, 1, 2, 3)
    model = _Recorder(torch.randn(4, 6))
    out = embed(model, TensorDataset(inputs, torch.zeros(6)), batch_size=4, flip=True)
    weight = model.linear.weight
    expected = inputs.flatten(1) @ weight.T + inputs.flip(-1).flatten(1) @ weight.T
    assert torch.allclose(out, F.normalize(expected, dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="flip needs image"):
        embed(model, TensorDataset(torch.randn(3, 6), torch.zeros(3)), flip=True)


def test_sample_pairs_balanced_valid_and_seeded() -> None:
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])
    left, right, issame = sample_pairs(labels, 1001, seed=3)
    assert len(left) == 1001 and issame.sum() == 500
    assert np.array_equal(labels[left].numpy() == labels[right].numpy(), issame)
    assert np.all(left[issame] != right[issame])
    assert 1 not in labels[left[issame]].tolist() and 4 not in labels[left[issame]].tolist()
    again = sample_pairs(labels, 1001, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (left, right, issame), strict=True))
    assert not np.array_equal(sample_pairs(labels, 1001, seed=4)[0], left)
    with pytest.raises(ValueError, match="class with ≥ 2"):
        sample_pairs(torch.tensor([0, 1, 2]), 10)


def test_auc_and_tar_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    issame = rng.random(4000) < 0.5
    scores = np.round(rng.normal(issame * 1.2, 1.0), 1)  # rounded: many ties
    metrics = verification_metrics(scores, issame)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(issame, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(issame, scores, drop_intermediate=False)
    for far in (0.3, 0.1, 0.01, 0.001):
        expected = tpr[fpr <= far].max()
        assert tar_at_far(scores, issame, far) == pytest.approx(expected, abs=1e-12)
    assert metrics["tar_at_far_1e-01"] == tar_at_far(scores, issame, 0.1)


def test_only_resolvable_fars_are_reported() -> None:
    issame = np.array([True, False] * 500)  # 500 impostors
    metrics = verification_metrics(np.where(issame, 0.9, 0.1), issame)
    assert "tar_at_far_1e-01" in metrics and "tar_at_far_1e-02" in metrics
    assert "tar_at_far_1e-03" not in metrics and "tar_at_far_1e-04" not in metrics
    assert FARS == (1e-1, 1e-2, 1e-3, 1e-4)


def test_ten_fold_protocol_on_a_hand_built_case() -> None:
    """10 folds of 2 pairs (genuine 0.9, impostor 0.1); fold 3's genuine pair scores 0.05.
    Every fold learns threshold 0.5 (midpoint of 0.9 and 0.1: 17/18 or 18/18 correct on its
    9 training folds), so fold 3 scores 1/2 and the others 2/2: mean 0.95, std 0.15."""
    scores = np.array([0.9, 0.1] * 10)
    issame = np.array([True, False] * 10)
    scores[6] = 0.05  # fold 3's genuine pair
    metrics = verification_metrics(scores, issame)
    assert metrics["verification_accuracy"] == pytest.approx(0.95)
    assert metrics["verification_accuracy_std"] == pytest.approx(0.15)
    assert metrics["verification_threshold"] == pytest.approx(0.5)
    perfect = verification_metrics(np.array([0.9, 0.1] * 10), issame)
    assert perfect["verification_accuracy"] == 1.0 and perfect["roc_auc"] == 1.0


def _reference_kfold(scores: np.ndarray, issame: np.ndarray, folds: int = 10) -> list[float]:
    """Brute force: every midpoint between distinct scores (and ±inf), first best wins."""
    accuracies = []
    for test in np.array_split(np.arange(len(scores)), folds):
        train = np.setdiff1d(np.arange(len(scores)), test)
        distinct = np.unique(scores[train])[::-1]
        candidates = [np.inf, *((distinct[:-1] + distinct[1:]) / 2), -np.inf]
        train_acc = [np.mean((scores[train] >= t) == issame[train]) for t in candidates]
        best = candidates[int(np.argmax(train_acc))]
        accuracies.append(np.mean((scores[test] >= best) == issame[test]))
    return accuracies


@pytest.mark.parametrize("decimals", [0, 1, 6])
def test_ten_fold_matches_brute_force(decimals: int) -> None:
    rng = np.random.default_rng(1)
    issame = rng.random(300) < 0.5
    scores = np.round(rng.normal(issame * 1.0, 1.0), decimals)  # few decimals: heavy ties
    expected = _reference_kfold(scores, issame)
    metrics = verification_metrics(scores, issame)
    assert metrics["verification_accuracy"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert metrics["verification_accuracy_std"] == pytest.approx(np.std(expected), abs=1e-12)


def test_verification_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="genuine"):
        verification_metrics(np.zeros(20), np.ones(20, bool))
    with pytest.raises(ValueError, match="genuine"):
        verification_metrics(np.zeros(5), np.array([True, False] * 2 + [True]))


def test_class_statistics_hand_built() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0]])
    stats = class_statistics(embeddings, torch.tensor([0, 0, 1, 1]))
    assert stats["intra_compactness"] == pytest.approx((2 * 2**-0.5 + 2) / 4)
    assert stats["inter_separation_mean"] == pytest.approx(-(2**-0.5))
    assert stats["inter_separation_p99"] == pytest.approx(-(2**-0.5))


def _dense_upper(unit: torch.Tensor) -> torch.Tensor:
    cos = unit @ unit.T
    return cos[torch.triu(torch.ones_like(cos, dtype=torch.bool), diagonal=1)]


def test_centre_statistics_chunked_exact_and_sampled() -> None:
    weights = torch.randn(300, 16) + 0.3
    dense = _dense_upper(F.normalize(weights, dim=1)).double()
    exact = class_centre_statistics(weights, chunk=7)
    assert exact["inter_separation_mean"] == pytest.approx(float(dense.mean()), abs=1e-6)
    assert exact["inter_separation_p99"] == pytest.approx(
        float(torch.quantile(dense, 0.99)), abs=1e-6)
    sampled = class_centre_statistics(weights, max_pairs=20_000, chunk=1000)
    assert sampled["inter_separation_mean"] == exact["inter_separation_mean"]
    assert sampled["inter_separation_p99"] == pytest.approx(
        exact["inter_separation_p99"], abs=0.03)


def test_centre_statistics_scale_without_a_c_by_c_matrix() -> None:
    weights = torch.randn(60_000, 32)  # a 60k × 60k float matrix would need 14 GB
    stats = class_centre_statistics(weights, max_pairs=50_000)
    assert abs(stats["inter_separation_mean"]) < 0.01
    assert 0.3 < stats["inter_separation_p99"] < 0.6


def test_evaluate_verification_on_separable_features() -> None:
    centres = F.normalize(torch.randn(20, 8), dim=1) * 5
    labels = torch.arange(20).repeat_interleave(5)
    features = centres[labels] + 0.1 * torch.randn(100, 8)
    model = _Recorder(torch.eye(8))
    metrics = evaluate_verification(model, TensorDataset(features, labels), num_pairs=2000)
    assert metrics["verification_accuracy"] > 0.95 and metrics["roc_auc"] > 0.99
    assert metrics["intra_compactness"] > 0.99
    assert set(metrics) >= {"verification_accuracy", "verification_accuracy_std",
                            "verification_threshold", "roc_auc", "tar_at_far_1e-01",
                            "tar_at_far_1e-02", "tar_at_far_1e-03", "intra_compactness",
                            "inter_separation_mean", "inter_separation_p99"}
    assert all(isinstance(v, float) for v in metrics.values())


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_evaluate_pair_set_from_a_bin_file(tmp_path) -> None:
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, size=(30, 4, 4), dtype=np.uint8)
    images, issame = [], []
    for pair in range(20):
        same = pair % 2 == 0
        first, second = pair, pair if same else pair + 10
        images += [_png(patterns[first]), _png(patterns[second])]
        issame.append(same)
    write_pairs_bin(tmp_path / "pairs.bin", images, issame)
    pairs = read_pairs_bin(tmp_path / "pairs.bin", image_size=4, channels=1)
    metrics = evaluate_pair_set(_Recorder(torch.eye(16)), pairs, batch_size=7)
    assert metrics["verification_accuracy"] == 1.0 and metrics["roc_auc"] == 1.0
    assert "tar_at_far_1e-01" in metrics and "tar_at_far_1e-02" not in metrics
