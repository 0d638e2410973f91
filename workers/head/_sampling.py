"""Partial FC class sampling of one shard: a pure function of the global labels and a generator."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._partition import HeadShard


class SampledClasses(NamedTuple):
    """The sampled rows of a shard and where each global sample's own class sits among them.

    ``index``: sorted, unique local row indices (``0 ≤ index < shard.size``).
    ``target``: per global sample, the position of its class in ``index``, or ``-1`` when the
    class lies in another shard (so ``index[target[i]] == labels[i] − shard.start``).
    """

    index: torch.Tensor
    target: torch.Tensor


def sample_classes(
    labels: torch.Tensor, shard: HeadShard, num_sample: int, generator: torch.Generator | None
) -> SampledClasses:
    """Keep every class of ``labels`` that falls in ``shard``; fill up to ``num_sample`` rows.

    The fill is uniform without replacement over the shard's other classes: every row gets a
    ``U(0, 1)`` score from ``generator``, positives get 2, the top ``num_sample`` are kept. If the
    positives alone reach ``num_sample``, only they are kept (``num_sample = 0`` is the
    ``sampling='batch'`` strategy); ``num_sample ≥ shard.size`` keeps the whole shard and draws
    nothing. So ``len(index) == min(shard.size, max(num_sample, #positives))``. ``labels`` is
    never modified. ``generator`` may be ``None`` only when no random fill is needed.
    """
    in_shard = (labels >= shard.start) & (labels < shard.stop)
    local = labels[in_shard] - shard.start
    positives = torch.unique(local)
    if num_sample >= shard.size:
        index = torch.arange(shard.size, device=labels.device)
    elif num_sample <= len(positives):
        index = positives
    else:
        if generator is None:
            raise ValueError("sample_classes: a generator is needed to fill with random classes")
        scores = torch.rand(shard.size, generator=generator, device=generator.device)
        scores = scores.to(labels.device)
        scores[positives] = 2.0
        index = torch.topk(scores, num_sample, sorted=False).indices.sort().values
    target = torch.full_like(labels, -1)
    target[in_shard] = torch.searchsorted(index, local)
    return SampledClasses(index, target)
