"""Analytic compute and communication of one training step — what a study trades accuracy for.

Counts are exact for this implementation, not measured: they depend only on shapes, so they
are comparable across machines and do not drift with load.
"""

from __future__ import annotations


def head_flops_per_sample(embedding_dim: int, sampled_classes: float) -> float:
    """Multiply-add FLOPs of the head per sample in one forward + backward pass.

    The chunked log-sum-exp computes ``z = x̃·W̃ᵀ`` in forward and again in backward, then
    ``dx̃ = dz·W̃`` and ``dW̃ = dzᵀ·x̃``: four products of ``2·D·K`` FLOPs per sample, where
    ``K`` is the number of sampled classes summed over all shards.
    """
    return 8.0 * embedding_dim * sampled_classes


def _ring(world_size: int, elements: float) -> float:
    """Elements each rank sends in a ring all-gather / reduce-scatter of ``elements`` in total."""
    return (world_size - 1) / world_size * elements


def head_bytes_per_step(world_size: int, global_batch: int, embedding_dim: int,
                        element_bytes: int) -> float:
    """Bytes each rank sends for the head in one step (ring algorithms: an all-gather or a
    reduce-scatter sends (W−1)/W of the total, an all-reduce twice that).

    Exactly what the head's collectives move when every rank holds ``B/W`` rows. Forward:
    all-gather of every rank's batch shape and label range (5 int64 per rank), of the
    embeddings (B·D in the product dtype, ``element_bytes``: 2 under bf16/fp16 autocast) and
    of the labels (B int64); reduce-scatter of the target logit and ‖W_y‖ (2B float32);
    all-reduce of the row max and of the sum-exp (2 × B float32) and of the loss (float32).
    Backward: reduce-scatter of the embedding gradient (B·D, ``element_bytes``), all-gather of
    the gradients of the target terms (2B float32) and of the LSE (B float32).
    """
    if world_size == 1:
        return 0.0
    batch, dim = global_batch, embedding_dim
    embeddings = 2 * _ring(world_size, batch * dim) * element_bytes
    int64 = (_ring(world_size, 5 * world_size) + _ring(world_size, batch)) * 8
    per_row = (2 * _ring(world_size, 2 * batch) + _ring(world_size, batch)) * 4
    all_reduces = 2 * (2 * batch + 1) * _ring(world_size, 1) * 4
    return embeddings + int64 + per_row + all_reduces


def data_parallel_bytes_per_step(world_size: int, backbone_parameters: int,
                                 element_bytes: int = 4) -> float:
    """Bytes each rank sends for the backbone's gradient all-reduce (ring: 2·(W−1)/W·P)."""
    return 2 * _ring(world_size, backbone_parameters) * element_bytes
