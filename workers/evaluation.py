"""Open-set evaluation: verification on held-out identities or pair files, class statistics.

Every function that takes ``shard`` (a ``HeadShard``: rank, world size, process group) splits
its work over the ranks and is collective there; every rank returns the same values, equal to
one process's (``shard=None``) — one code path, the single process being its world-size-1
case. Each rank embeds a contiguous slice of the images and the embeddings are all-gathered;
class-centre statistics take each rank's rows of the centres and combine sums by one
all-reduce and seeded row samples by all-gathers, so no process holds the ``C × D`` matrix.

Everything returns plain ``dict[str, float]`` with stable names (the train loop reports them):

- ``verification_accuracy`` / ``verification_accuracy_std`` / ``verification_threshold``:
  the LFW 10-fold protocol on cosine scores — the pairs are cut into 10 contiguous folds;
  for each fold the threshold with the best accuracy on the other 9 is applied to it; mean
  and (population) std of the 10 fold accuracies, mean of the thresholds;
- ``tar_at_far_1e-01`` … ``tar_at_far_1e-04``: the true-accept rate at the lowest threshold
  whose false-accept rate is ≤ FAR (``far_operating_point``), with ``threshold_at_far_<FAR>``,
  that threshold (a pair is accepted when its cosine is above it), and
  ``tar_at_far_<FAR>_std``, the (population) std over the 10 folds of the fraction of each
  fold's genuine pairs accepted at it. A FAR is reported only when the impostor count resolves
  it, i.e. ``FAR · impostors ≥ 1`` (at least one impostor may be accepted); otherwise the keys
  are absent;
- ``roc_auc``: area under the ROC curve (Mann–Whitney statistic, ties count ½);
- ``intra_compactness``: mean over samples of cos(x, mean of its class);
- ``inter_separation_mean`` / ``inter_separation_p99``: mean and 99th percentile of the
  cosine between distinct class means (or between the head's class centres).

``evaluate_open_set`` names them as a trial reports them: held-out verification under the names
above, held-out class statistics as ``heldout_<name>``, pair file ``i`` as ``pairs<i>_<name>``.
The objective ``verification_accuracy`` is the held-out one; with no held-out identities
(``data.heldout_fraction = 0``, allowed only with ``data.pair_files``) the unprefixed
verification metrics are those of the first pair file.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from workers.config import FARS, TAR_AT_FAR, TAR_AT_FAR_STD, THRESHOLD_AT_FAR
from workers.data import LabelledDataset, PairSet
from workers.head import HeadShard, all_gather_rows, all_reduce_sum, partition_n_into_range
from workers.seeding import derive_seed

#: class statistics of the held-out embeddings, reported as ``heldout_<name>``
HELDOUT_STATISTICS = ("intra_compactness", "inter_separation_mean", "inter_separation_p99")


def embed(model: torch.nn.Module, dataset: LabelledDataset, batch_size: int = 256,
          device: torch.device | str | None = None, flip: bool = False,
          indices: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised embeddings ``(n, D)`` (CPU; float32, float64 for a float64 model) of the
    inputs at ``indices`` (default: every input, in order), in batches.

    Runs under ``torch.no_grad`` with ``model.eval()`` (the previous mode is restored).
    ``flip``: test-time augmentation, ``normalise(f(x) + f(flip_horizontal(x)))``.
    ``device`` defaults to the device of the model's first parameter.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} must be ≥ 1")
    if device is None:
        device = next(model.parameters()).device
    if indices is None:
        indices = torch.arange(len(dataset))
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(indices), batch_size):
                inputs = dataset.inputs(indices[start:start + batch_size]).to(device)
                if flip and inputs.dim() != 4:
                    raise ValueError(f"flip needs image inputs (B, C, H, W), got "
                                     f"{tuple(inputs.shape)}")
                output = model(inputs)
                if flip:
                    output = output + model(inputs.flip(-1))
                dtype = torch.promote_types(output.dtype, torch.float32)
                chunks.append(F.normalize(output.to(dtype), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def embed_gathered(model: torch.nn.Module, dataset: LabelledDataset,
                   shard: HeadShard | None = None, *, batch_size: int = 256,
                   device: torch.device | str | None = None,
                   flip: bool = False) -> torch.Tensor:
    """``embed`` of every input, the work split over the ranks of ``shard``.

    Rank ``r`` embeds the contiguous slice ``partition_n_into_range(N, W)[r]``; the slices are
    all-gathered in rank order, so every rank returns the same ``(N, D)`` CPU tensor, row ``n``
    being the embedding of input ``n``. A rank whose slice is empty (``N < W``) embeds one
    input only to learn the width and dtype, and sends nothing. Collective when ``W > 1``.
    """
    if shard is None or shard.world_size == 1 or len(dataset) == 0:
        return embed(model, dataset, batch_size, device, flip)
    ranges = partition_n_into_range(len(dataset), shard.world_size)
    start, stop = ranges[shard.rank]
    indices = torch.arange(start, stop) if stop > start else torch.zeros(1, dtype=torch.int64)
    local = embed(model, dataset, batch_size, device, flip, indices)[: stop - start]
    gather_device = next(model.parameters()).device if device is None else device
    sizes = [high - low for low, high in ranges]
    return all_gather_rows(local.to(gather_device), sizes, shard).cpu()


def select_heldout(labels: torch.Tensor, max_identities: int | None,
                   images_per_identity: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset of samples with labels in ``[0, L)``.

    ``max_identities`` of the K identities present, drawn uniformly without replacement, and of
    each of them ``images_per_identity`` of its images, likewise (``None`` or fewer available:
    all). A deterministic function of its arguments, so identical on every rank. Cost
    O(N + L) (counts, a permutation of the identities, masks) plus O(N_s log N_s) to draw
    images among the N_s samples of the chosen identities; no loop over identities.
    """
    for name, cap in (("max_identities", max_identities),
                      ("images_per_identity", images_per_identity)):
        if cap is not None and cap < 1:
            raise ValueError(f"`{name} >= 1` (or None) must hold, but got {name} = {cap}")
    generator = torch.Generator().manual_seed(derive_seed("heldout-selection", seed))
    counts = torch.bincount(labels)
    present = torch.nonzero(counts).flatten()
    chosen = torch.zeros(len(counts), dtype=torch.bool)
    chosen[present[torch.randperm(len(present), generator=generator)[:max_identities]]] = True
    candidates = torch.nonzero(chosen[labels]).flatten()
    if images_per_identity is None:
        return candidates
    shuffled = candidates[torch.randperm(len(candidates), generator=generator)]
    by_identity, order = torch.sort(labels[shuffled], stable=True)
    rank_in_identity = torch.arange(len(order)) - torch.searchsorted(by_identity, by_identity)
    return torch.sort(shuffled[order[rank_in_identity < images_per_identity]]).values


def heldout_subset(dataset: LabelledDataset, max_identities: int | None,
                   images_per_identity: int | None, seed: int) -> LabelledDataset:
    """``dataset`` restricted to ``select_heldout`` (labels kept); ``dataset`` itself when the
    caps keep everything. A training run selects once, when it builds its runtime."""
    indices = select_heldout(dataset.labels, max_identities, images_per_identity, seed)
    if len(indices) == len(dataset):
        return dataset
    return dataset.subset(indices, dataset.labels[indices])


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


def far_operating_point(scores: np.ndarray, issame: np.ndarray,
                        far: float) -> tuple[float, float]:
    """``(threshold, TAR)`` at the lowest threshold whose false-accept rate is ≤ ``far``.

    A pair is accepted when its score is above the threshold. With the I impostor scores
    sorted descending as ``s_0 ≥ s_1 ≥ …``, at most ``k = ⌊far·I⌋`` of them may be accepted,
    so the threshold is ``s_k`` (``−inf`` when ``k ≥ I``: every pair is accepted) and
    TAR is the fraction of genuine scores above it.
    """
    impostor = np.sort(scores[~issame])[::-1]
    allowed = int(np.floor(far * len(impostor) + 1e-9))
    if allowed >= len(impostor):
        return float("-inf"), 1.0
    threshold = float(impostor[allowed])
    return threshold, float(np.mean(scores[issame] > threshold))


def tar_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float:
    """True-accept rate at the lowest threshold whose false-accept rate is ≤ ``far``
    (``far_operating_point``'s TAR)."""
    return far_operating_point(scores, issame, far)[1]


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing the mean of their ranks (``scipy.stats.rankdata``
    with ``method="average"``, without importing SciPy into every worker): a value whose group
    of ``c`` equal values ends at sorted position ``e`` ranks ``e − (c − 1)/2``."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]


def verification_metrics(scores: np.ndarray | torch.Tensor, issame: np.ndarray | torch.Tensor,
                         folds: int = 10, fars: Sequence[float] = FARS) -> dict[str, float]:
    """k-fold accuracy (LFW protocol), TAR with its threshold and fold spread at the
    resolvable FARs, and ROC AUC of pair scores (names: module docstring)."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    num_genuine, num_impostor = int(issame.sum()), int((~issame).sum())
    if len(scores) != len(issame) or len(scores) < folds or num_genuine == 0 \
            or num_impostor == 0:
        raise ValueError(f"verification needs ≥ {folds} scored pairs with both genuine and "
                         f"impostor pairs; got {len(scores)} scores, {len(issame)} labels, "
                         f"{num_genuine} genuine")
    accuracies, thresholds = [], []
    fold_indices = np.array_split(np.arange(len(scores)), folds)
    for test in fold_indices:
        train = np.setdiff1d(np.arange(len(scores)), test, assume_unique=True)
        threshold = _best_threshold(scores[train], issame[train])
        accuracies.append(np.mean((scores[test] >= threshold) == issame[test]))
        thresholds.append(threshold)
    ranks = average_ranks(scores)
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
            threshold, tar = far_operating_point(scores, issame, far)
            accepted = scores > threshold
            fold_tars = [accepted[test][issame[test]].mean() for test in fold_indices
                         if issame[test].any()]
            metrics[TAR_AT_FAR.format(far=far)] = tar
            metrics[TAR_AT_FAR_STD.format(far=far)] = float(np.std(fold_tars))
            metrics[THRESHOLD_AT_FAR.format(far=far)] = threshold
    return metrics


def class_statistics(embeddings: torch.Tensor, labels: torch.Tensor, max_pairs: int = 2_000_000,
                     seed: int = 0, chunk: int = 4096) -> dict[str, float]:
    """Intra-class compactness and inter-class separation of embeddings ``(N, D)``; the
    separation is ``class_centre_statistics`` of the class means."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"class statistics need ≥ 2 classes, got {len(classes)}")
    unit = F.normalize(embeddings.to(torch.promote_types(embeddings.dtype, torch.float32)), dim=1)
    sums = unit.new_zeros(len(classes), unit.shape[1]).index_add_(0, inverse, unit)
    means = F.normalize(sums, dim=1)
    intra = (unit * means[inverse]).sum(1).mean()
    return {"intra_compactness": float(intra),
            **class_centre_statistics(means, max_pairs, seed, chunk)}


def class_centre_statistics(weights: torch.Tensor, max_pairs: int = 2_000_000, seed: int = 0,
                            chunk: int = 4096,
                            shard: HeadShard | None = None) -> dict[str, float]:
    """Inter-class separation of class centres ``(C, D)``, each row normalised: the mean and
    the 99th percentile of ``cos(u_i, u_j)`` over pairs ``i ≠ j``.

    With ``shard``, ``weights`` are this rank's rows of the centres (ranks hold contiguous
    row ranges in rank order, any sizes) and the call is collective; without, one process
    holds them all. Either way:

    - mean: ``Σ_{i≠j} u_i·u_j = ‖Σ_i u_i‖² − Σ_i ‖u_i‖²`` over ``C(C − 1)`` ordered pairs;
      float64 sums over chunks of ``chunk`` rows, summed over the ranks together with their
      row counts by one all-reduce;
    - p99: exact over all ``C(C − 1)/2`` pairs when that is ≤ ``max_pairs`` (then the
      C ≲ 2000 rows are gathered), else over ``max_pairs`` seeded pairs of global rows,
      ``i ~ U[0, C)``, ``j = (i + U[1, C)) mod C`` from ``torch.Generator().manual_seed(seed)``
      (the same on every rank, whatever the sharding); each block of ``chunk`` pairs
      gathers only its sampled rows from their owners.

    No float64 copy beyond a chunk, no C × C matrix, nothing gathered but bounded rows; the
    same names as ``class_statistics`` (callers prefix them, e.g. ``centre_``).
    """
    shard = HeadShard(0, len(weights)) if shard is None else shard
    local = weights.detach()
    dtype, dim = torch.promote_types(local.dtype, torch.float32), local.shape[1]
    totals = local.new_zeros(dim + 1 + shard.world_size, dtype=torch.float64)
    for start in range(0, len(local), chunk):
        unit64 = F.normalize(local[start:start + chunk].to(dtype), dim=1).double()
        totals[:dim] += unit64.sum(0)
        totals[dim] += unit64.square().sum()
    totals[dim + 1 + shard.rank] = len(local)
    totals = all_reduce_sum(totals, shard)
    sizes = [int(size) for size in totals[dim + 1:].tolist()]
    count, offset = sum(sizes), sum(sizes[:shard.rank])
    if count < 2:
        raise ValueError(f"centre statistics need ≥ 2 centres, got {count}")
    mean = (totals[:dim].square().sum() - totals[dim]) / (count * (count - 1))
    values = []
    if count * (count - 1) // 2 <= max_pairs:
        unit = all_gather_rows(F.normalize(local.to(dtype), dim=1), sizes, shard)
        for start in range(0, count, chunk):
            block = unit[start:start + chunk] @ unit[start:].T
            rows = torch.arange(len(block), device=block.device).unsqueeze(1)
            values.append(block[torch.arange(block.shape[1], device=block.device) > rows])
    else:
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(count, (max_pairs,), generator=generator)
        second = (first + torch.randint(1, count, (max_pairs,), generator=generator)) % count
        bounds = torch.tensor([0, *itertools.accumulate(sizes)])
        for start in range(0, max_pairs, chunk):
            pairs = torch.cat([first[start:start + chunk], second[start:start + chunk]])
            rows, position = torch.unique(pairs, return_inverse=True)
            cuts = torch.searchsorted(rows, bounds).tolist()
            mine = (rows[cuts[shard.rank]:cuts[shard.rank + 1]] - offset).to(local.device)
            unit = all_gather_rows(F.normalize(local[mine].to(dtype), dim=1),
                                   [high - low for low, high in itertools.pairwise(cuts)],
                                   shard)
            left, right = position.to(unit.device).chunk(2)
            values.append((unit[left] * unit[right]).sum(1))
    p99 = torch.quantile(torch.cat(values).double(), 0.99)
    return {"inter_separation_mean": float(mean), "inter_separation_p99": float(p99)}


def evaluate_verification(model: torch.nn.Module, dataset: LabelledDataset, *,
                          num_pairs: int = 6000, batch_size: int = 256,
                          device: torch.device | str | None = None, flip: bool = False,
                          seed: int = 0, shard: HeadShard | None = None) -> dict[str, float]:
    """Verification on ``num_pairs`` sampled pairs plus class statistics, on held-out data
    (embedded by ``embed_gathered``: split over the ranks of ``shard``, collective)."""
    embeddings = embed_gathered(model, dataset, shard, batch_size=batch_size, device=device,
                                flip=flip)
    left, right, issame = sample_pairs(dataset.labels, num_pairs, seed)
    scores = (embeddings[left] * embeddings[right]).sum(1).numpy()
    return {**verification_metrics(scores, issame),
            **class_statistics(embeddings, dataset.labels, seed=seed)}


def evaluate_pair_set(model: torch.nn.Module, pairs: PairSet, *, batch_size: int = 256,
                      device: torch.device | str | None = None, flip: bool = False,
                      shard: HeadShard | None = None) -> dict[str, float]:
    """Verification metrics on a pair file (pair ``i`` = images ``2i`` and ``2i + 1``),
    embedded by ``embed_gathered`` (split over the ranks of ``shard``, collective)."""
    embeddings = embed_gathered(model, pairs.images, shard, batch_size=batch_size,
                                device=device, flip=flip)
    scores = (embeddings[0::2] * embeddings[1::2]).sum(1).numpy()
    return verification_metrics(scores, pairs.issame.numpy())


def evaluate_open_set(model: torch.nn.Module, heldout: LabelledDataset,
                      pair_sets: Sequence[PairSet], shard: HeadShard | None = None, *,
                      num_pairs: int = 3000, max_identities: int | None = None,
                      images_per_identity: int | None = None, batch_size: int = 256,
                      device: torch.device | str | None = None, flip: bool = False,
                      seed: int = 0) -> dict[str, float]:
    """Every verification metric of a trial, named as it reports them (module docstring).

    The held-out part is ``heldout_subset(heldout, max_identities, images_per_identity,
    seed)``; without held-out samples the objective is the first pair file's. Collective
    over the ranks of ``shard``; every rank returns the same dict.
    """
    if not len(heldout) and not pair_sets:
        raise ValueError("no held-out identities and no pair files: `data.heldout_fraction > 0` "
                         "or non-empty `data.pair_files` must hold")
    options = {"batch_size": batch_size, "device": device, "flip": flip, "shard": shard}
    metrics: dict[str, float] = {}
    if len(heldout):
        subset = heldout_subset(heldout, max_identities, images_per_identity, seed)
        result = evaluate_verification(model, subset, num_pairs=num_pairs, seed=seed, **options)
        metrics.update({f"heldout_{k}" if k in HELDOUT_STATISTICS else k: v
                        for k, v in result.items()})
    for index, pairs in enumerate(pair_sets):
        result = evaluate_pair_set(model, pairs, **options)
        if index == 0 and not len(heldout):
            metrics.update(result)
        metrics.update({f"pairs{index}_{k}": v for k, v in result.items()})
    return metrics
