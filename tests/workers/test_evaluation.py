"""Open-set evaluation: embedding, pair sampling, verification metrics, class statistics."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from tests.spies import record_collective_groups
from workers.data import TensorDataset, read_pairs_bin, write_pairs_bin
from workers.evaluation import (
    FARS,
    class_centre_statistics,
    class_statistics,
    embed,
    embed_gathered,
    evaluate_open_set,
    evaluate_pair_set,
    evaluate_verification,
    heldout_subset,
    sample_pairs,
    select_heldout,
    tar_at_far,
    verification_metrics,
)
from workers.head import HeadShard


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
    weights = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) + 0.3
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


def _reference_centre_statistics(weights: torch.Tensor, max_pairs: int,
                                 seed: int) -> tuple[float, float]:
    """Dense float64: mean of the off-diagonal cosines; p99 of all pairs i < j, or of the
    documented seeded sample of pairs when there are more than ``max_pairs``."""
    unit = F.normalize(weights.double(), dim=1)
    count = len(unit)
    cos = unit @ unit.T
    mean = (cos.sum() - cos.diagonal().sum()) / (count * (count - 1))
    if count * (count - 1) // 2 <= max_pairs:
        values = _dense_upper(unit)
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(count, (max_pairs,), generator=generator)
        second = (first + torch.randint(1, count, (max_pairs,), generator=generator)) % count
        values = (unit[first] * unit[second]).sum(1)
    return float(mean), float(torch.quantile(values, 0.99))


@pytest.mark.parametrize(("count", "max_pairs", "chunk"), [(13, 1000, 4), (300, 2_000_000, 7),
                                                            (300, 5000, 64), (300, 4999, 5000)])
def test_centre_statistics_equal_a_dense_float64_reference(count: int, max_pairs: int,
                                                           chunk: int) -> None:
    weights = torch.randn(count, 6, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(count)) + 0.2
    mean, p99 = _reference_centre_statistics(weights, max_pairs, seed=5)
    stats = class_centre_statistics(weights, max_pairs=max_pairs, seed=5, chunk=chunk)
    assert stats["inter_separation_mean"] == pytest.approx(mean, abs=1e-12)
    assert stats["inter_separation_p99"] == pytest.approx(p99, abs=1e-12)
    with pytest.raises(ValueError, match="≥ 2 centres"):
        class_centre_statistics(weights[:1])


def _labels_with_gaps() -> torch.Tensor:
    """40 identities with labels 0, 3, 6, … (gaps) and 1 … 12 images each, shuffled."""
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 13, (40,), generator=generator)
    labels = (3 * torch.arange(40)).repeat_interleave(counts)
    return labels[torch.randperm(len(labels), generator=generator)]


@pytest.mark.parametrize(("max_identities", "per_identity"), [(None, None), (7, None),
                                                              (None, 4), (7, 4), (100, 2)])
def test_select_heldout_respects_the_caps(max_identities: int | None,
                                          per_identity: int | None) -> None:
    labels = _labels_with_gaps()
    counts = torch.bincount(labels)
    chosen = select_heldout(labels, max_identities, per_identity, seed=3)
    assert torch.equal(chosen, torch.sort(chosen).values) and torch.equal(chosen,
                                                                          chosen.unique())
    identities, taken = torch.unique(labels[chosen], return_counts=True)
    assert len(identities) == min(max_identities or 40, 40)
    expected = counts[identities].clamp(max=per_identity or counts.max())
    assert torch.equal(taken, expected)
    assert torch.equal(chosen, select_heldout(labels.clone(), max_identities, per_identity, 3))
    if max_identities is None and per_identity is None:
        assert torch.equal(chosen, torch.arange(len(labels)))


def test_select_heldout_depends_on_the_seed_and_draws_every_identity() -> None:
    labels = _labels_with_gaps()
    draws = {tuple(select_heldout(labels, 5, 3, seed).tolist()) for seed in range(20)}
    assert len(draws) == 20
    seen = torch.cat([labels[torch.tensor(draw)] for draw in draws]).unique()
    assert len(seen) > 30  # 20 draws of 5 of 40 identities reach most of them
    with pytest.raises(ValueError, match="max_identities"):
        select_heldout(labels, 0, None, 0)


def test_heldout_subset_is_seeded_and_keeps_labels() -> None:
    labels = _labels_with_gaps()
    dataset = TensorDataset(torch.arange(len(labels), dtype=torch.float32).unsqueeze(1), labels)
    subset = heldout_subset(dataset, 5, 3, 11)
    assert torch.equal(heldout_subset(dataset, 5, 3, 11).data, subset.data)
    assert heldout_subset(dataset, None, None, 11) is dataset
    indices = select_heldout(labels, 5, 3, 11)
    assert torch.equal(subset.data.flatten().long(), indices)
    assert torch.equal(subset.labels, labels[indices])


class _Linear64(torch.nn.Module):
    """A float64 linear embedder of flattened inputs (any input dtype)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, dim, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(dim, in_features, dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1).double())


def _heldout_features() -> TensorDataset:
    """15 identities (labels 1, 3, …, 29) of 2 … 14 float64 features around their centres."""
    generator = torch.Generator().manual_seed(2)
    counts = torch.randint(2, 15, (15,), generator=generator)
    labels = (2 * torch.arange(15) + 1).repeat_interleave(counts)
    centres = torch.randn(30, 16, dtype=torch.float64, generator=generator)
    noise = torch.randn(len(labels), 16, dtype=torch.float64, generator=generator)
    return TensorDataset(centres[labels] + 0.8 * noise, labels)


def _write_pair_file(path: Path) -> None:
    """20 pairs of 4 × 4 gray images: genuine pairs are near-duplicates, impostors unrelated."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, size=(30, 4, 4))
    images, issame = [], []
    for pair in range(20):
        same = pair % 2 == 0
        first = patterns[pair]
        second = np.clip(first + rng.integers(-40, 40, size=(4, 4)), 0, 255) if same \
            else patterns[pair + 10]
        images += [_png(first.astype(np.uint8)), _png(second.astype(np.uint8))]
        issame.append(same)
    write_pairs_bin(path, images, issame)


def test_open_set_names_and_objective(tmp_path: Path) -> None:
    """Held-out metrics are the objective; with no held-out identities the first pair file's
    are; with neither there is nothing to evaluate."""
    _write_pair_file(tmp_path / "pairs.bin")
    pairs = read_pairs_bin(tmp_path / "pairs.bin", image_size=4, channels=1)
    model, heldout = _Linear64(16, 8), _heldout_features()
    metrics = evaluate_open_set(model, heldout, [pairs, pairs], **EVAL_OPTIONS)
    subset = heldout_subset(heldout, 10, 5, 7)
    assert 0 < len(subset) < len(heldout)
    held = evaluate_verification(model, subset, num_pairs=200, batch_size=4, seed=7)
    on_pairs = evaluate_pair_set(model, pairs)
    statistics = ("intra_compactness", "inter_separation_mean", "inter_separation_p99")
    assert metrics == {**{f"heldout_{k}" if k in statistics else k: v for k, v in held.items()},
                       **{f"pairs{i}_{k}": v for i in (0, 1) for k, v in on_pairs.items()}}
    assert metrics["verification_accuracy"] != on_pairs["verification_accuracy"]
    empty = heldout.subset(torch.arange(0), torch.arange(0))
    fallback = evaluate_open_set(model, empty, [pairs], **EVAL_OPTIONS)
    assert fallback == {**on_pairs, **{f"pairs0_{k}": v for k, v in on_pairs.items()}}
    with pytest.raises(ValueError, match="heldout_fraction") as error:
        evaluate_open_set(model, empty, [], **EVAL_OPTIONS)
    assert "\n" not in str(error.value)


EVAL_OPTIONS: dict[str, Any] = {"num_pairs": 200, "max_identities": 10,
                                "images_per_identity": 5, "batch_size": 4, "seed": 7}
#: contiguous row counts of 13 and 300 centres per rank: uneven, one rank empty at 3
CENTRE_SIZES = {1: [[13], [300]], 2: [[9, 4], [1, 299]], 3: [[7, 0, 6], [100, 150, 50]]}
CENTRE_CASES = [(0, 1000, 4), (1, 2_000_000, 64), (1, 5000, 64)]  # (matrix, max_pairs, chunk)


def _centres() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randn(count, 6, dtype=torch.float64, generator=generator) + 0.2
            for count in (13, 300)]


def _evaluation_worker(rank: int, world_size: int, pair_path: Path, out_dir: Path) -> None:
    group = dist.new_group(list(range(world_size)))
    explicit = record_collective_groups(group)
    shard = HeadShard(0, 0, rank, world_size, group)
    model, heldout = _Linear64(16, 8), _heldout_features()
    pairs = read_pairs_bin(pair_path, image_size=4, channels=1)
    empty = heldout.subset(torch.arange(0), torch.arange(0))
    records: dict[str, Any] = {
        "open_set": evaluate_open_set(model, heldout, [pairs], shard, **EVAL_OPTIONS),
        "pairs_only": evaluate_open_set(model, empty, [pairs], shard, **EVAL_OPTIONS),
        "tiny": embed_gathered(model, heldout.subset(torch.arange(2), heldout.labels[:2]), shard),
        "selection": select_heldout(heldout.labels, 10, 5, 7),
        "centres": [],
    }
    for matrix, max_pairs, chunk in CENTRE_CASES:
        sizes = CENTRE_SIZES[world_size][matrix]
        start = sum(sizes[:rank])
        rows = _centres()[matrix][start:start + sizes[rank]]
        centre_shard = HeadShard(start, start + sizes[rank], rank, world_size, group)
        records["centres"].append(class_centre_statistics(rows, max_pairs, seed=9, chunk=chunk,
                                                          shard=centre_shard))
    records["explicit_group"] = explicit
    torch.save(records, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def distributed_evaluation(gloo_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``get(world_size)``: the pair file and every rank's records (one group per size)."""
    pair_path = tmp_path_factory.mktemp("pairs") / "pairs.bin"
    _write_pair_file(pair_path)
    cache: dict[int, list[dict[str, Any]]] = {}

    def get(world_size: int) -> tuple[Path, list[dict[str, Any]]]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"evaluation{world_size}")
            gloo_runner(_evaluation_worker, world_size, pair_path, out)
            cache[world_size] = [torch.load(out / f"rank{rank}.pt")
                                 for rank in range(world_size)]
        return pair_path, cache[world_size]

    return get


def _assert_same_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_evaluation_equals_one_process(distributed_evaluation: Any,
                                               world_size: int) -> None:
    """Verification and centre statistics on 1–3 gloo ranks (uneven slices and shards, one
    empty) equal the single-process values in float64, on every rank."""
    pair_path, ranks = distributed_evaluation(world_size)
    model, heldout = _Linear64(16, 8), _heldout_features()
    pairs = read_pairs_bin(pair_path, image_size=4, channels=1)
    expected = evaluate_open_set(model, heldout, [pairs], **EVAL_OPTIONS)
    empty = heldout.subset(torch.arange(0), torch.arange(0))
    pairs_only = evaluate_open_set(model, empty, [pairs], **EVAL_OPTIONS)
    tiny = embed(model, heldout.subset(torch.arange(2), heldout.labels[:2]))
    for record in ranks:
        _assert_same_metrics(record["open_set"], expected)
        _assert_same_metrics(record["pairs_only"], pairs_only)
        torch.testing.assert_close(record["tiny"], tiny, rtol=0, atol=1e-12)
        assert torch.equal(record["selection"], select_heldout(heldout.labels, 10, 5, 7))
        for (matrix, max_pairs, chunk), stats in zip(CENTRE_CASES, record["centres"],
                                                     strict=True):
            _assert_same_metrics(stats, class_centre_statistics(
                _centres()[matrix], max_pairs, seed=9, chunk=chunk))
        # one process calls no collective; several call each with the explicit group
        assert all(record["explicit_group"])
        assert bool(record["explicit_group"]) == (world_size > 1)


@pytest.mark.parametrize("ties", [False, True])
def test_average_ranks_equal_scipys(ties: bool) -> None:
    from scipy.stats import rankdata

    from workers.evaluation import average_ranks

    rng = np.random.default_rng(3)
    for size in (1, 2, 9, 1000):
        values = rng.integers(0, 4, size).astype(float) if ties else rng.normal(size=size)
        np.testing.assert_array_equal(average_ranks(values), rankdata(values))
