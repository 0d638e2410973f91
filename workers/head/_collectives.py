"""Differentiable collectives over the rows of a batch split unevenly across ranks.

Rank ``r`` holds ``sizes[r]`` rows (possibly 0); the global batch is the rank-ordered
concatenation. Each op's backward is its exact adjoint, so every one passes gradcheck on its
own and nothing is rescaled by the world size anywhere:

* ``gather_rows``: local → global by all-gather; backward reduce-scatter (sum) to own rows;
* ``scatter_rows_sum``: global → local by reduce-scatter (sum); backward all-gather;
* ``local_rows``: a replicated global tensor → own rows by slicing; backward all-gather
  (every rank then holds the full gradient of the replicated tensor);
* ``all_reduce_sum``: forward sum over ranks; backward identity (rank ``r``'s term has
  derivative 1 in the sum);
* ``replicated``: a tensor every rank computed identically (a loss's learnable state) used by
  every rank; forward identity, backward all-reduce (sum) — every rank then holds the full
  gradient, the sum of every rank's use.

With ``shard.world_size == 1`` every op is the identity and no collective is called.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ._partition import HeadShard


def all_gather_rows(local: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
    """Concatenate every rank's rows (padded to the largest rank for the collective)."""
    if shard.world_size == 1:
        return local
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=shard.group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def reduce_scatter_rows(full: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
    """Sum ``full`` (global rows) over ranks and keep this rank's rows."""
    if shard.world_size == 1:
        return full
    width = max(sizes)
    inputs = []
    for part in torch.split(full, sizes):
        padded = full.new_zeros((width, *full.shape[1:]))
        padded[: len(part)] = part
        inputs.append(padded)
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=shard.group)
    return out[: sizes[shard.rank]]


def row_offset(sizes: list[int], rank: int) -> int:
    """Index of rank ``rank``'s first row in the global batch."""
    return sum(sizes[:rank])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
        ctx.sizes, ctx.shard = sizes, shard
        return all_gather_rows(local, sizes, shard)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return reduce_scatter_rows(grad.contiguous(), ctx.sizes, ctx.shard), None, None


class _ScatterRowsSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, full: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
        ctx.sizes, ctx.shard = sizes, shard
        return reduce_scatter_rows(full, sizes, shard)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_rows(grad.contiguous(), ctx.sizes, ctx.shard), None, None


class _LocalRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, full: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
        ctx.sizes, ctx.shard = sizes, shard
        start = row_offset(sizes, shard.rank)
        return full[start : start + sizes[shard.rank]].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return all_gather_rows(grad.contiguous(), ctx.sizes, ctx.shard), None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, shard: HeadShard) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, shard: HeadShard) -> torch.Tensor:
        ctx.shard = shard
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.shard.group)
        return total, None


def gather_rows(local: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
    """Global rows from local rows; backward reduce-scatters the gradient (sum over ranks)."""
    return local if shard.world_size == 1 else _GatherRows.apply(local, sizes, shard)


def scatter_rows_sum(full: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
    """This rank's rows of ``Σ_ranks full``; backward all-gathers the local gradients."""
    return full if shard.world_size == 1 else _ScatterRowsSum.apply(full, sizes, shard)


def local_rows(full: torch.Tensor, sizes: list[int], shard: HeadShard) -> torch.Tensor:
    """This rank's rows of a replicated global tensor; backward all-gathers the gradients."""
    return full if shard.world_size == 1 else _LocalRows.apply(full, sizes, shard)


def all_reduce_sum(tensor: torch.Tensor, shard: HeadShard) -> torch.Tensor:
    """``Σ_ranks tensor``; backward passes the gradient through unchanged."""
    return tensor if shard.world_size == 1 else _AllReduceSum.apply(tensor, shard)


def replicated(tensor: torch.Tensor, shard: HeadShard) -> torch.Tensor:
    """``tensor`` (identical on every rank); backward all-reduces (sums) its gradient."""
    if shard.world_size == 1 or not tensor.requires_grad:
        return tensor
    return _Replicated.apply(tensor, shard)
