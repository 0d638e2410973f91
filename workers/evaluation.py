"""Open-set evaluation: verification on held-out identities or pair files, class statistics.

Everything returns plain ``dict[str, float]`` with stable names (the train loop reports them):

- ``verification_accuracy`` / ``verification_accuracy_std`` / ``verification_threshold``:
  the LFW 10-fold protocol on cosine scores — the pairs are cut into 10 contiguous folds;
  for each fold the threshold with the best accuracy on the other 9 is applied to it; mean
  and (population) std of the 10 fold accuracies, mean of the thresholds;
- ``tar_at_far_1e-01`` … ``tar_at_far_1e-04``: the true-accept rate at the lowest threshold
  whose false-accept rate is ≤ FAR. A FAR is reported only when the impostor count resolves
  it, i.e. ``FAR · impostors ≥ 1`` (at least one impostor may be accepted); otherwise the key
  is absent;
- ``roc_auc``: area under the ROC curve (Mann–Whitney statistic, ties count ½);
- ``intra_compactness``: mean over samples of cos(x, mean of its class);
- ``inter_separation_mean`` / ``inter_separation_p99``: mean and 99th percentile of the
  cosine between distinct class means (or between the head's class centres).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from workers.data import LabelledDataset, PairSet

FARS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)


def embed(model: torch.nn.Module, dataset: LabelledDataset, batch_size: int = 256,
          device: torch.device | str | None = None, flip: bool = False) -> torch.Tensor:
    """L2-normalised embeddings ``(N, D)`` (float32, CPU) of every input, in batches.

    Runs under ``torch.no_grad`` with ``model.eval()`` (the previous mode is restored).
    ``flip``: test-time augmentation, ``normalise(f(x) + f(flip_horizontal(x)))``.
    ``device`` defaults to the device of the model's first parameter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be ≥ 1")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                indices = torch.arange(start, min(start + batch_size, len(dataset)))
                inputs = dataset.inputs(indices).to(device)
                if flip and inputs.dim() != 4:
                    raise ValueError(f"flip needs image inputs (B, C, H, W), got "
                                     f"{tuple(inputs.shape)}")
                output = model(inputs)
                if flip:
                    output = output + model(inputs.flip(-1))
                chunks.append(F.normalize(output.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def sample_pairs(labels: torch.Tensor, num_pairs: int,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``num_pairs`` balanced verification pairs ``(left, right, issame)`` over sample indices.

    Half genuine (a class with ≥ 2 samples drawn uniformly, then two distinct samples of it),
    half impostor (two distinct classes drawn uniformly, one sample of each); drawn with
    replacement, shuffled together, deterministic in ``seed``.
    """
    labels_np = labels.cpu().numpy()
    classes, inverse, counts = np.unique(labels_np, return_inverse=True, return_counts=True)
    multi = np.flatnonzero(counts >= 2)
    if num_pairs < 2 or len(classes) < 2 or len(multi) == 0:
        raise ValueError(f"verification needs num_pairs ≥ 2, ≥ 2 classes and a class with ≥ 2 "
                         f"samples; got num_pairs = {num_pairs}, {len(classes)} classes")
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    num_genuine = num_pairs // 2
    num_impostor = num_pairs - num_genuine
    genuine_class = multi[rng.integers(len(multi), size=num_genuine)]
    first = rng.integers(counts[genuine_class])
    second = (first + rng.integers(1, counts[genuine_class])) % counts[genuine_class]
    class_a = rng.integers(len(classes), size=num_impostor)
    class_b = (class_a + rng.integers(1, len(classes), size=num_impostor)) % len(classes)
    left = np.concatenate([order[starts[genuine_class] + first],
                           order[starts[class_a] + rng.integers(counts[class_a])]])
    right = np.concatenate([order[starts[genuine_class] + second],
                            order[starts[class_b] + rng.integers(counts[class_b])]])
    issame = np.concatenate([np.ones(num_genuine, bool), np.zeros(num_impostor, bool)])
    shuffle = rng.permutation(num_pairs)
    return left[shuffle], right[shuffle], issame[shuffle]


def _best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold ``t`` (predict "same" when score ≥ t) with the best accuracy on these
    pairs: the midpoint of the best cut between consecutive distinct sorted scores (first
    best; ``+inf``/``−inf`` for "all different"/"all same")."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_same = scores[order], issame[order]
    true_accepts = np.concatenate([[0], np.cumsum(sorted_same)])
    accepted = np.arange(len(scores) + 1)
    correct = true_accepts + (len(scores) - sorted_same.sum()) - (accepted - true_accepts)
    valid = np.ones(len(scores) + 1, bool)
    valid[1:-1] = sorted_scores[:-1] != sorted_scores[1:]
    cut = int(np.flatnonzero(valid)[np.argmax(correct[valid])])
    if cut == 0:
        return float("inf")
    if cut == len(scores):
        return float("-inf")
    return float((sorted_scores[cut - 1] + sorted_scores[cut]) / 2)


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """True-accept rate at the lowest threshold whose false-accept rate is ≤ ``far``."""
    impostor = np.sort(scores[~issame])[::-1]
    allowed = int(np.floor(far * len(impostor) + 1e-9))
    if allowed >= len(impostor):
        return 1.0
    return float(np.mean(scores[issame] > impostor[allowed]))


def verification_metrics(scores: np.ndarray | torch.Tensor, issame: np.ndarray | torch.Tensor,
                         folds: int = 10, fars: Sequence[float] = FARS) -> dict[str, float]:
    """k-fold accuracy (LFW protocol), TAR at the resolvable FARs and ROC AUC of pair scores."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    num_genuine, num_impostor = int(issame.sum()), int((~issame).sum())
    if len(scores) != len(issame) or len(scores) < folds or num_genuine == 0 \
            or num_impostor == 0:
        raise ValueError(f"verification needs ≥ {folds} scored pairs with both genuine and "
                         f"impostor pairs; got {len(scores)} scores, {len(issame)} labels, "
                         f"{num_genuine} genuine")
    accuracies, thresholds = [], []
    for test in np.array_split(np.arange(len(scores)), folds):
        train = np.setdiff1d(np.arange(len(scores)), test, assume_unique=True)
        threshold = _best_threshold(scores[train], issame[train])
        accuracies.append(np.mean((scores[test] >= threshold) == issame[test]))
        thresholds.append(threshold)
    ranks = rankdata(scores)
    auc = (ranks[issame].sum() - num_genuine * (num_genuine + 1) / 2) / (num_genuine
                                                                          * num_impostor)
    metrics = {
        "verification_accuracy": float(np.mean(accuracies)),
        "verification_accuracy_std": float(np.std(accuracies)),
        "verification_threshold": float(np.mean(np.clip(thresholds, -1.0, 1.0))),
        "roc_auc": float(auc),
    }
    for far in fars:
        if far * num_impostor >= 1:
            metrics[f"tar_at_far_{far:.0e}"] = tar_at_far(scores, issame, far)
    return metrics


def _pairwise_cosine_summary(unit: torch.Tensor, max_pairs: int, seed: int,
                             chunk: int) -> tuple[float, float]:
    """Mean (exact) and 99th percentile of ``cos(u_i, u_j)`` over pairs ``i < j`` of unit
    rows. The mean uses ``Σ_{i≠j} u_i·u_j = ‖Σ u_i‖² − Σ ‖u_i‖²``; the percentile is exact from
    chunked row blocks when there are ≤ ``max_pairs`` pairs, else from ``max_pairs`` random
    pairs — never a full C × C matrix."""
    count = len(unit)
    total_pairs = count * (count - 1) // 2
    unit64 = unit.double()
    mean = (unit64.sum(0).square().sum() - unit64.square().sum()) / (count * (count - 1))
    values = []
    if total_pairs <= max_pairs:
        for start in range(0, count, chunk):
            block = unit[start:start + chunk] @ unit[start:].T
            rows = torch.arange(len(block)).unsqueeze(1)
            values.append(block[torch.arange(block.shape[1]).unsqueeze(0) > rows])
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(count, (max_pairs,), generator=generator)
        second = (first + torch.randint(1, count, (max_pairs,), generator=generator)) % count
        for start in range(0, max_pairs, chunk):
            stop = start + chunk
            values.append((unit[first[start:stop]] * unit[second[start:stop]]).sum(1))
    p99 = torch.quantile(torch.cat(values).double(), 0.99)
    return float(mean), float(p99)


def class_statistics(embeddings: torch.Tensor, labels: torch.Tensor, max_pairs: int = 2_000_000,
                     seed: int = 0, chunk: int = 4096) -> dict[str, float]:
    """Intra-class compactness and inter-class separation of embeddings ``(N, D)``."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"class statistics need ≥ 2 classes, got {len(classes)}")
    unit = F.normalize(embeddings.float(), dim=1)
    sums = torch.zeros(len(classes), unit.shape[1]).index_add_(0, inverse, unit)
    means = F.normalize(sums, dim=1)
    intra = (unit * means[inverse]).sum(1).mean()
    mean, p99 = _pairwise_cosine_summary(means, max_pairs, seed, chunk)
    return {"intra_compactness": float(intra), "inter_separation_mean": mean,
            "inter_separation_p99": p99}


def class_centre_statistics(weights: torch.Tensor, max_pairs: int = 2_000_000, seed: int = 0,
                            chunk: int = 4096) -> dict[str, float]:
    """Inter-class separation of the head's class centres ``(C, D)`` (normalised first);
    the same names as ``class_statistics`` (callers prefix them, e.g. ``centre_``)."""
    if len(weights) < 2:
        raise ValueError(f"centre statistics need ≥ 2 centres, got {len(weights)}")
    unit = F.normalize(weights.detach().float().cpu(), dim=1)
    mean, p99 = _pairwise_cosine_summary(unit, max_pairs, seed, chunk)
    return {"inter_separation_mean": mean, "inter_separation_p99": p99}


def evaluate_verification(model: torch.nn.Module, dataset: LabelledDataset, *,
                      num_pairs: int = 6000, batch_size: int = 256,
                      device: torch.device | str | None = None, flip: bool = False,
                      seed: int = 0) -> dict[str, float]:
    """Verification on ``num_pairs`` sampled pairs plus class statistics, on held-out data."""
    embeddings = embed(model, dataset, batch_size, device, flip)
    left, right, issame = sample_pairs(dataset.labels, num_pairs, seed)
    scores = (embeddings[left] * embeddings[right]).sum(1).numpy()
    return {**verification_metrics(scores, issame),
            **class_statistics(embeddings, dataset.labels, seed=seed)}


def evaluate_pair_set(model: torch.nn.Module, pairs: PairSet, *, batch_size: int = 256,
                      device: torch.device | str | None = None,
                      flip: bool = False) -> dict[str, float]:
    """Verification metrics on a pair file (pair ``i`` = images ``2i`` and ``2i + 1``)."""
    embeddings = embed(model, pairs.images, batch_size, device, flip)
    scores = (embeddings[0::2] * embeddings[1::2]).sum(1).numpy()
    return verification_metrics(scores, pairs.issame.numpy())
