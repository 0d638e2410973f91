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

``LSEOptions`` extends the chunk pass for the modern losses, each a no-op at its default:

* ``subcenters = K``: every weight row holds a class's K centre rows side by side (width
  K·D); the chunk's logits are ``max_k x·Ŵ_{c,k}`` (autograd sends the gradient to the
  arg-max row), normalisation is per sub-centre;
* ``filter_threshold = τ > 0``: a logit above τ becomes 0 before φ (Partial FC's inter-class
  filter; no gradient through it);
* ``reduction = 'sum'``: ``Σ_{j≠y} φ(z_j)`` instead of the log-sum-exp (UniFace's per-class
  terms): the same chunks and recompute, the shards joined by one all-reduce (sum); backward
  ``p = ḡ`` instead of ``ḡ·exp(n − lse)``.

``context`` (optional 6th input, ``(B, k)``): the loss's per-row context, passed to φ as
``phi(z, context)``; its gradient (UniFace's learnable bias) is this shard's share, like ``dx``.
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

    ``phi``: the elementwise map of the logits (``phi(z, context)`` when a context is given);
    ``normalize_weights``: use ``Ŵ = W/‖W‖``; ``chunk_size``: classes per chunk; ``shard``:
    the rows and the group of this rank; ``compute_dtype``: the matmul dtype;
    ``sparse_weight_grad``: return the weight's gradient as a sparse COO tensor of the sampled
    rows instead of a dense shard-sized one; ``subcenters``: centre rows per class (max over
    them); ``filter_threshold``: inter-class filter τ (0: off); ``reduction``: ``'lse'`` or
    ``'sum'`` of the negatives' terms.
    """

    phi: Phi
    normalize_weights: bool
    chunk_size: int
    shard: HeadShard
    compute_dtype: torch.dtype
    sparse_weight_grad: bool = False
    subcenters: int = 1
    filter_threshold: float = 0.0
    reduction: str = "lse"


class ChunkedLSE(torch.autograd.Function):
    """The sharded, chunked log-sum-exp of the sampled negatives (see the module docstring).

    ``apply(x, weight, index, target, options[, context])``.

    ``x``: (B, D) global rows; ``weight``: (C_shard, K·D) raw shard; ``index``: (n,) sorted
    sampled local rows; ``target``: (B,) position of each row's class in ``index`` or −1;
    ``options``: ``LSEOptions``; ``context``: (B, k) per-row context of φ or None. Returns
    ``lse`` (B,) — or the sum, ``reduction='sum'`` — in float32 (float64 if ``x`` is).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                target: torch.Tensor, options: LSEOptions,
                context: torch.Tensor | None = None) -> torch.Tensor:
        chunk_size, shard = options.chunk_size, options.shard
        compute_dtype, k, summed = options.compute_dtype, options.subcenters, _summed(options)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        lse = x.new_full((len(x),), 0.0 if summed else float("-inf"), dtype=acc)
        norms = weight.new_ones(len(index) * k)
        x_c = x.to(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, len(index), chunk_size):
                w = weight[_rows(index, len(weight), start, chunk_size)]
                if k > 1:
                    w = w.reshape(-1, x.shape[1])
                if options.normalize_weights:
                    norms[start * k : (start + chunk_size) * k] = norm = w.norm(dim=1)
                    w = w / norm.clamp_min(EPS).unsqueeze(1)
                n = _negatives(x_c @ w.to(compute_dtype).T, acc, options, context)
                if summed:
                    _mask_targets(n, target, start, 0.0)
                    lse += n.sum(dim=1)
                    continue
                _mask_targets(n, target, start, -float("inf"))
                row_max = _finite_or_zero(n.amax(dim=1))
                chunk_sum = n.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
                lse = torch.logaddexp(lse, chunk_sum.log_().add_(row_max))
        if shard.world_size > 1 and summed:
            dist.all_reduce(lse, op=dist.ReduceOp.SUM, group=shard.group)
        elif shard.world_size > 1:
            row_max = lse.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
            row_max = _finite_or_zero(row_max)
            total = torch.exp(lse - row_max)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
            lse = total.log_().add_(row_max)
        ctx.save_for_backward(x, weight, index, target, lse, norms, context)
        ctx.options = options
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, index, target, lse, norms, context = ctx.saved_tensors
        options: LSEOptions = ctx.options
        chunk_size, compute_dtype, k = options.chunk_size, options.compute_dtype, options.subcenters
        summed = _summed(options)
        # p = ḡ·exp(n − lse) = sign(ḡ)·exp(n − shift) (sum: p = ḡ = sign(ḡ)·|ḡ|); the sign is
        # applied on the B × D side
        shift = (_finite_or_zero(lse) - grad_lse.abs().log()).unsqueeze(1)
        sign = grad_lse.sign().unsqueeze(1)
        x_c = x.to(compute_dtype)
        x_signed = x_c * sign.to(compute_dtype)
        grad_x = torch.zeros_like(x, dtype=lse.dtype)
        context_leaf, grad_context = None, None
        if context is not None and ctx.needs_input_grad[5]:
            context_leaf = context.detach().requires_grad_()
            grad_context = torch.zeros_like(context)
        elif context is not None:
            context_leaf = context.detach()
        if options.sparse_weight_grad:
            grad_rows = weight.new_empty((len(index), weight.shape[1]))
        else:  # every row is written below when the whole shard is sampled
            grad_rows = (torch.empty_like if len(index) == len(weight) else torch.zeros_like)(
                weight)
        with torch.autocast(x.device.type, enabled=False):
            for start in range(0, len(index), chunk_size):
                rows = _rows(index, len(weight), start, chunk_size)
                w_hat = weight[rows].detach()
                if k > 1:
                    w_hat = w_hat.reshape(-1, x.shape[1])
                if options.normalize_weights:
                    norm = norms[start * k : (start + chunk_size) * k]
                    w_hat = w_hat / norm.clamp_min(EPS).unsqueeze(1)
                w_c = w_hat.to(compute_dtype)
                with torch.enable_grad():
                    z = (x_c @ w_c.T).requires_grad_()
                    n = _negatives(z, lse.dtype, options, context_leaf)
                if summed:
                    p = grad_lse.abs().unsqueeze(1).expand_as(n).clone()
                else:
                    p = torch.sub(n.detach(), shift).exp_()
                _mask_targets(p, target, start, 0.0)
                inputs = (z,) if grad_context is None else (z, context_leaf)
                dz, *d_context = torch.autograd.grad(n, inputs, p)
                if grad_context is not None:
                    grad_context.add_(d_context[0])
                grad_x.add_(dz @ w_c)
                grad_w_hat = (dz.T @ x_signed).to(weight.dtype)
                if options.normalize_weights:
                    dot = torch.linalg.vecdot(w_hat, grad_w_hat) * (norm >= EPS)
                    grad_w_hat.addcmul_(w_hat, dot.unsqueeze(1), value=-1)
                    grad_w_hat.div_(norm.clamp_min(EPS).unsqueeze(1))
                if k > 1:
                    grad_w_hat = grad_w_hat.reshape(-1, weight.shape[1])
                grad_rows[slice(start, start + chunk_size) if options.sparse_weight_grad
                          else rows] = grad_w_hat
        grad_w = grad_rows
        if options.sparse_weight_grad:  # ``index`` is sorted and unique: already coalesced
            grad_w = torch.sparse_coo_tensor(index.unsqueeze(0), grad_rows, weight.shape,
                                             is_coalesced=True, check_invariants=False)
        if grad_context is not None:
            grad_context.mul_(sign.to(grad_context.dtype))
        return grad_x.mul_(sign).to(x.dtype), grad_w, None, None, None, grad_context


def _summed(options: LSEOptions) -> bool:
    """Whether the negatives' terms are summed (``'sum'``) rather than log-sum-exped."""
    if options.reduction not in ("lse", "sum"):
        raise ValueError(f"reduction = {options.reduction!r} must be 'lse' or 'sum'")
    return options.reduction == "sum"


def _negatives(products: torch.Tensor, acc: torch.dtype, options: LSEOptions,
               context: torch.Tensor | None) -> torch.Tensor:
    """φ of a chunk's logits: the raw products (B, chunk·K) in the accumulation dtype, the
    max over each class's K sub-centres, the inter-class filter, then φ."""
    z = products.to(acc)
    if options.subcenters > 1:
        z = z.unflatten(1, (-1, options.subcenters)).max(dim=2).values
    if options.filter_threshold > 0:
        z = z.masked_fill(z > options.filter_threshold, 0.0)
    return options.phi(z) if context is None else options.phi(z, context)


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
