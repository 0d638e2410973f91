"""``LSE_{j≠y, j sampled}(φ(z_j))`` over sharded class centres, chunked, recomputed in backward.

This computes, for every global row ``i`` (and equals, without ever holding the ``B × K``
matrix)::

    n = φ(x @ Ŵ[index].T).masked_fill(column of row i's own class, −inf)
    lse = logsumexp(cat over ranks of n, dim=1)

with ``Ŵ = W / max(‖W‖, ε)`` row-wise when ``normalize_weights`` (else ``W``). Forward walks
``index`` in chunks of ``chunk_size`` classes, merging chunk log-sum-exps in the accumulation
dtype, then combines the shards with an all-reduce of the row maxima and one of the rescaled
sums. Backward recomputes each chunk: ``p = ḡ·exp(n − lse)``, ``dz = (∂n/∂z)ᵀ p`` by autograd
through φ (any elementwise map), ``dx += dz @ Ŵ_c``, ``dŴ_c = dzᵀ @ x`` and
``dW_c = (dŴ_c − Ŵ_c·rowsum(Ŵ_c ⊙ dŴ_c)) / ‖W_c‖``. ``dx`` is this shard's share only (the
caller's all-gather backward sums the shards); ``ḡ`` must be the gradient of the full,
replicated ``lse``. Rows without any negative get ``lse = −inf`` and zero gradient.

The weight's gradient is the dense ``C_shard × D`` tensor with zero unsampled rows, or with
``sparse_weight_grad`` a sparse COO tensor holding only the ``K`` sampled rows (its memory and
every later per-row operation then follow ``r·C``, not ``C``).

Saved for backward: ``x``, ``W`` (the parameter itself), ``index``, ``target``, ``lse`` and the
K row norms; peak extra memory is O(B·chunk_size + B·D + K) plus the shard gradient (dense:
``C_shard × D``; sparse: ``K × D``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ._partition import HeadShard

Phi = Callable[[torch.Tensor], torch.Tensor]
#: F.normalize's default ε: ``Ŵ = W / max(‖W‖, ε)``
EPS = 1e-12


@dataclass(frozen=True)
class LSEOptions:
    """The non-tensor options of ``ChunkedLSE`` (its backward returns ``None`` for them).

    ``phi``: the elementwise map of the logits; ``normalize_weights``: use ``Ŵ = W/‖W‖``;
    ``chunk_size``: classes per chunk; ``shard``: the rows and the group of this rank;
    ``compute_dtype``: the matmul dtype; ``sparse_weight_grad``: return the weight's gradient
    as a sparse COO tensor of the sampled rows instead of a dense shard-sized one.
    """

    phi: Phi
    normalize_weights: bool
    chunk_size: int
    shard: HeadShard
    compute_dtype: torch.dtype
    sparse_weight_grad: bool = False


class ChunkedLSE(torch.autograd.Function):
    """The sharded, chunked log-sum-exp of the sampled negatives (see the module docstring).

    ``apply(x, weight, index, target, options)``.

    ``x``: (B, D) global rows; ``weight``: (C_shard, D) raw shard; ``index``: (K,) sorted
    sampled local rows; ``target``: (B,) position of each row's class in ``index`` or −1;
    ``options``: ``LSEOptions``. Returns ``lse`` (B,) in float32 (float64 if ``x`` is).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                target: torch.Tensor, options: LSEOptions) -> torch.Tensor:
        phi, chunk_size, shard = options.phi, options.chunk_size, options.shard
        compute_dtype = options.compute_dtype
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        lse = x.new_full((len(x),), float("-inf"), dtype=acc)
        norms = weight.new_ones(len(index))
        x_c = x.to(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, len(index), chunk_size):
                w = weight[_rows(index, len(weight), start, chunk_size)]
                if options.normalize_weights:
                    norms[start : start + chunk_size] = norm = w.norm(dim=1)
                    w = w / norm.clamp_min(EPS).unsqueeze(1)
                n = phi((x_c @ w.to(compute_dtype).T).to(acc))
                _mask_targets(n, target, start, -float("inf"))
                row_max = _finite_or_zero(n.amax(dim=1))
                chunk_sum = n.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
                lse = torch.logaddexp(lse, chunk_sum.log_().add_(row_max))
        if shard.world_size > 1:
            row_max = lse.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
            row_max = _finite_or_zero(row_max)
            total = torch.exp(lse - row_max)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
            lse = total.log_().add_(row_max)
        ctx.save_for_backward(x, weight, index, target, lse, norms)
        ctx.options = options
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, index, target, lse, norms = ctx.saved_tensors
        options: LSEOptions = ctx.options
        phi, chunk_size, compute_dtype = options.phi, options.chunk_size, options.compute_dtype
        # p = ḡ·exp(n − lse) = sign(ḡ)·exp(n − shift); the sign is applied on the B × D side
        shift = (_finite_or_zero(lse) - grad_lse.abs().log()).unsqueeze(1)
        sign = grad_lse.sign().unsqueeze(1)
        x_c = x.to(compute_dtype)
        x_signed = x_c * sign.to(compute_dtype)
        grad_x = torch.zeros_like(x, dtype=lse.dtype)
        if options.sparse_weight_grad:
            grad_rows = weight.new_empty((len(index), weight.shape[1]))
        else:  # every row is written below when the whole shard is sampled
            grad_rows = (torch.empty_like if len(index) == len(weight) else torch.zeros_like)(
                weight)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, len(index), chunk_size):
                rows = _rows(index, len(weight), start, chunk_size)
                w_hat = weight[rows].detach()
                if options.normalize_weights:
                    norm = norms[start : start + chunk_size]
                    w_hat = w_hat / norm.clamp_min(EPS).unsqueeze(1)
                w_c = w_hat.to(compute_dtype)
                with torch.enable_grad():
                    z = (x_c @ w_c.T).requires_grad_()
                    n = phi(z.to(lse.dtype))
                p = torch.sub(n.detach(), shift).exp_()
                _mask_targets(p, target, start, 0.0)
                (dz,) = torch.autograd.grad(n, z, p)
                grad_x.add_(dz @ w_c)
                grad_w_hat = (dz.T @ x_signed).to(weight.dtype)
                if options.normalize_weights:
                    dot = torch.linalg.vecdot(w_hat, grad_w_hat) * (norm >= EPS)
                    grad_w_hat.addcmul_(w_hat, dot.unsqueeze(1), value=-1)
                    grad_w_hat.div_(norm.clamp_min(EPS).unsqueeze(1))
                grad_rows[slice(start, start + chunk_size) if options.sparse_weight_grad
                          else rows] = grad_w_hat
        grad_w = grad_rows
        if options.sparse_weight_grad:  # ``index`` is sorted and unique: already coalesced
            grad_w = torch.sparse_coo_tensor(index.unsqueeze(0), grad_rows, weight.shape,
                                             is_coalesced=True, check_invariants=False)
        return grad_x.mul_(sign).to(x.dtype), grad_w, None, None, None


def _rows(index: torch.Tensor, shard_size: int, start: int,
          chunk_size: int) -> slice | torch.Tensor:
    """The chunk's shard rows: a slice (no gather) when the whole shard is sampled."""
    if len(index) == shard_size:
        return slice(start, start + chunk_size)
    return index[start : start + chunk_size]


def _finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    """``values`` with ±inf replaced by 0 (a safe shift for rows without any negative)."""
    return torch.where(torch.isfinite(values), values, 0.0)


def _mask_targets(values: torch.Tensor, target: torch.Tensor, start: int, fill: float) -> None:
    """In place: ``values[i, target[i] − start] = fill`` where row i's class is in this chunk."""
    width = values.shape[1]
    column = target - start
    hit = (column >= 0) & (column < width)
    rows, column = torch.arange(len(values), device=values.device), column.clamp(0, width - 1)
    values[rows, column] = torch.where(hit, fill, values[rows, column])
