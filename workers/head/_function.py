"""``LSE_{j≠y, j sampled}(φ(z_j))`` over sharded class centres, chunked; each chunk's logits are
kept for backward while a memory budget lasts and recomputed beyond it.

This computes, for every global row ``i`` (and equals, without ever holding the ``B × K``
matrix)::

    n = φ(x @ Ŵ[index].T).masked_fill(column of row i's own class, −inf)
    lse = logsumexp(cat over ranks of n, dim=1)

with ``Ŵ = W / max(‖W‖, ε)`` row-wise when ``normalize_weights`` (else ``W``). Forward walks
``index`` in chunks of ``chunk_size`` classes, merging the chunk log-sum-exps
``m_c + log Σ_j exp(n_ij − m_c)`` (``m_c``: the chunk's row maxima) in the accumulation dtype,
then combines the shards with an all-reduce of the row maxima and one of the rescaled sums.
Backward, per chunk: ``p = ḡ·exp(n − lse)``, ``dz = (∂n/∂z)ᵀ p`` by autograd through φ (any
elementwise map), ``dx += dz @ Ŵ_c``, ``dŴ_c = dzᵀ @ x`` and
``dW_c = (dŴ_c − Ŵ_c·rowsum(Ŵ_c ⊙ dŴ_c)) / ‖W_c‖``. ``dx`` is this shard's share only (the
caller's all-gather backward sums the shards); ``ḡ`` must be the gradient of the full,
replicated ``lse``. Rows without any negative get ``lse = −inf`` and zero gradient.

Logit budget (``logit_budget_bytes``): the first ``⌊budget / bytes of one chunk's logits⌋``
chunks keep from forward what backward needs of their logits, in the compute dtype (plus, for
plain logits, ``B`` row maxima per chunk: 1/chunk_size of them); the others recompute
their products ``x @ Ŵ_cᵀ`` in backward (budget 0: every chunk, as memory O(B·chunk_size)
requires). A kept chunk skips the fourth matrix product of the step. What is kept:

* plain logits (``phi=None``: φ is the identity — a linear φ the caller folded into ``x`` —,
  one centre per class, no filter, ``'lse'``): forward's own exponentials
  ``e = exp(n − m_c)`` and ``m_c``. Backward then makes no pass over the chunk:
  ``p = diag(f)·e`` with ``f = ḡ·exp(m_c − lse)`` per row, applied on the ``B × D`` side,
  ``dx += diag(f)(e @ Ŵ_c)`` and ``dŴ_c = eᵀ(diag(f) x)``. (Forward makes four passes over
  a chunk's logits, max, ``− m_c``, exp and sum, all but the first in place; a recomputed
  chunk two in backward, ``− shift`` and exp, in place in the products buffer.)
* otherwise the products ``x @ Ŵ_cᵀ`` (``B × chunk·K``), from which backward recomputes φ.

The weight's gradient is the dense ``C_shard × D`` tensor with zero unsampled rows, or with
``sparse_weight_grad`` a sparse COO tensor holding only the ``K`` sampled rows (its memory and
every later per-row operation then follow ``r·C``, not ``C``).

Saved for backward: ``x``, ``W`` (the parameter itself), ``index``, ``target``, ``lse``, the K
row norms and the kept chunks (at most the budget). Forward and backward each reuse one
``B × chunk·K`` products buffer and one chunk of centres for every chunk they compute, so peak
extra memory is O(B·chunk_size + B·D + K) plus the kept chunks and the shard gradient (dense:
``C_shard × D``; sparse: ``K × D``).

``LSEOptions`` extends the chunk pass for the modern losses, each a no-op at its default:

* ``subcenters = K``: every weight row holds a class's K centre rows side by side (width
  K·D); the chunk's logits are ``max_k x·Ŵ_{c,k}`` (autograd sends the gradient to the
  arg-max row), normalisation is per sub-centre;
* ``filter_threshold = τ > 0``: a logit above τ becomes 0 before φ (Partial FC's inter-class
  filter; no gradient through it);
* ``reduction = 'sum'``: ``Σ_{j≠y} φ(z_j)`` instead of the log-sum-exp (UniFace's per-class
  terms): the same chunks, budget and recompute, the shards joined by one all-reduce (sum);
  backward ``p = ḡ`` instead of ``ḡ·exp(n − lse)``.

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

    ``phi``: the elementwise map of the logits (``phi(z, context)`` when a context is given),
    ``None`` for the identity; ``normalize_weights``: use ``Ŵ = W/‖W‖``; ``chunk_size``:
    classes per chunk; ``shard``: the rows and the group of this rank; ``compute_dtype``: the
    matmul dtype; ``sparse_weight_grad``: return the weight's gradient as a sparse COO tensor of
    the sampled rows instead of a dense shard-sized one; ``subcenters``: centre rows per class
    (max over them); ``filter_threshold``: inter-class filter τ (0: off); ``reduction``:
    ``'lse'`` or ``'sum'`` of the negatives' terms; ``logit_budget_bytes``: bytes of chunk
    logits kept from forward for backward (0: every chunk is recomputed).
    """

    phi: Phi | None
    normalize_weights: bool
    chunk_size: int
    shard: HeadShard
    compute_dtype: torch.dtype
    sparse_weight_grad: bool = False
    subcenters: int = 1
    filter_threshold: float = 0.0
    reduction: str = "lse"
    logit_budget_bytes: int = 0


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
        shard, k, summed = options.shard, options.subcenters, _summed(options)
        plain = _plain(options)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        lse = x.new_full((len(x),), 0.0 if summed else float("-inf"), dtype=acc)
        norms = weight.new_ones(len(index) * k)
        x_c = x.to(options.compute_dtype)
        buffers = _ChunkBuffers(x, len(index), options, acc)
        kept: list[torch.Tensor] = []
        kept_maxima: list[torch.Tensor] = []
        num_kept = _kept_chunks(options, len(x), len(index))
        with torch.autocast(x.device.type, enabled=False):
            for chunk, start in enumerate(range(0, len(index), options.chunk_size)):
                keep = chunk < num_kept
                w_hat, norm = buffers.centres(weight, index, start, None)
                if options.normalize_weights:
                    norms[start * k : start * k + len(norm)] = norm
                # products that are kept (or become what is kept) get their own tensor, the
                # others share the buffer
                own = keep and (not plain or options.compute_dtype == acc)
                products = torch.mm(x_c, w_hat.to(options.compute_dtype).T,
                                     out=None if own else buffers.products(len(w_hat)))
                if plain:  # the negatives are the products
                    n = products if products.dtype == acc else buffers.to_acc(products)
                else:
                    n = _negatives(products, acc, options, context)
                    if keep:  # φ may return its input: mask a copy, not the kept products
                        kept.append(products)
                        n = n.clone() if _shares_memory(n, products) else n
                if summed:
                    _mask_targets(n, target, start, 0.0)
                    lse += n.sum(dim=1)
                    continue
                exponentials, row_max, chunk_lse = _chunk_lse(n, target, start)
                lse = torch.logaddexp(lse, chunk_lse)
                if keep and plain:
                    kept.append(exponentials.to(options.compute_dtype))
                    kept_maxima.append(row_max)
        if shard.world_size > 1 and summed:
            dist.all_reduce(lse, op=dist.ReduceOp.SUM, group=shard.group)
        elif shard.world_size > 1:
            row_max = lse.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=shard.group)
            row_max = _finite_or_zero(row_max)
            total = torch.exp(lse - row_max)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
            lse = total.log_().add_(row_max)
        maxima = torch.stack(kept_maxima) if kept_maxima else lse.new_empty((0, len(x)))
        ctx.save_for_backward(x, weight, index, target, lse, norms, context, maxima, *kept)
        ctx.options = options
        return lse

    @staticmethod
    def backward(ctx: Any, grad_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, index, target, lse, norms, context, maxima, *kept = ctx.saved_tensors
        options: LSEOptions = ctx.options
        compute_dtype, plain = options.compute_dtype, _plain(options)
        weight = weight.detach()
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
        buffers = _ChunkBuffers(x, len(index), options, lse.dtype)
        with torch.autocast(x.device.type, enabled=False):
            for chunk, start in enumerate(range(0, len(index), options.chunk_size)):
                w_hat, norm = buffers.centres(weight, index, start, norms)
                w_c = w_hat.to(compute_dtype)
                row_factor = None
                if plain and chunk < len(kept):  # p = diag(f)·e, f applied on the B × D side
                    dz, row_factor = kept[chunk], torch.exp(maxima[chunk] - shift.squeeze(1))
                else:
                    products = kept[chunk] if chunk < len(kept) else torch.mm(
                        x_c, w_c.T, out=buffers.products(len(w_c)))
                    if plain:
                        dz = _plain_probabilities(products, shift, target, start, buffers)
                    else:
                        dz = _through_phi(products, shift, grad_lse, target, start, options,
                                          context_leaf, grad_context)
                x_side = x_signed
                if row_factor is None:
                    grad_x.add_(dz @ w_c)
                else:
                    grad_x.addcmul_(dz @ w_c, row_factor.unsqueeze(1))
                    x_side = (x_signed * row_factor.unsqueeze(1)).to(compute_dtype)
                _write_weight_gradient(grad_rows, dz, x_side, w_hat, norm, index, start, options)
        grad_w = grad_rows
        if options.sparse_weight_grad:  # ``index`` is sorted and unique: already coalesced
            grad_w = torch.sparse_coo_tensor(index.unsqueeze(0), grad_rows, weight.shape,
                                             is_coalesced=True, check_invariants=False)
        if grad_context is not None:
            grad_context.mul_(sign.to(grad_context.dtype))
        return grad_x.mul_(sign).to(x.dtype), grad_w, None, None, None, grad_context


class _ChunkBuffers:
    """Flat buffers that every computed chunk reuses (one chunk's worth each, allocated lazily):
    its centres, its products ``x @ Ŵ_cᵀ`` in the compute dtype and, when that is not the
    accumulation dtype, their accumulation-dtype copy."""

    def __init__(self, x: torch.Tensor, sampled: int, options: LSEOptions,
                 acc: torch.dtype) -> None:
        self.options, self.rows, self.dim, self.acc = options, len(x), x.shape[1], acc
        self.width = min(options.chunk_size, sampled) * options.subcenters
        self._x = x
        self._flat: dict[str, torch.Tensor] = {}

    def _view(self, name: str, like: torch.Tensor, dtype: torch.dtype, rows: int,
              columns: int, capacity: int) -> torch.Tensor:
        if name not in self._flat:
            self._flat[name] = like.new_empty(capacity, dtype=dtype)
        return self._flat[name][: rows * columns].view(rows, columns)

    def products(self, columns: int) -> torch.Tensor:
        """A (B, columns) view of the products buffer."""
        return self._view("products", self._x, self.options.compute_dtype, self.rows, columns,
                          self.rows * self.width)

    def to_acc(self, products: torch.Tensor) -> torch.Tensor:
        """``products`` copied into the accumulation-dtype buffer."""
        out = self._view("acc", self._x, self.acc, *products.shape, self.rows * self.width)
        return out.copy_(products)

    def centres(self, weight: torch.Tensor, index: torch.Tensor, start: int,
                norms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's centre rows ``Ŵ_c`` (chunk·K, D) and their norms (computed when
        ``norms`` is None, else read from it; ones without ``normalize_weights``).

        A view of ``weight`` when nothing is gathered or normalised, else written into the
        centres buffer."""
        k = self.options.subcenters
        rows = _rows(index, len(weight), start, self.options.chunk_size)
        if isinstance(rows, slice):
            w = weight[rows].view(-1, self.dim)
        else:
            w = torch.index_select(weight, 0, rows, out=self._centres(weight, len(rows) * k))
            w = w.view(-1, self.dim)
        if not self.options.normalize_weights:
            return w, w.new_ones(len(w))
        norm = w.norm(dim=1) if norms is None else norms[start * k : start * k + len(w)]
        out = self._centres(weight, len(w)).view(-1, self.dim)
        return torch.div(w, norm.clamp_min(EPS).unsqueeze(1), out=out), norm

    def _centres(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """A (rows / K, K·D) view of the centres buffer: room for ``rows`` centre rows."""
        columns = self.dim * self.options.subcenters
        return self._view("centres", weight, weight.dtype, rows // self.options.subcenters,
                          columns, self.width * self.dim)


def _plain(options: LSEOptions) -> bool:
    """Whether a chunk's negatives are its products (identity φ, one centre per class, no
    filter, log-sum-exp): kept chunks then hold forward's exponentials, see the docstring."""
    return (options.phi is None and options.subcenters == 1 and not options.filter_threshold
            and not _summed(options))


def _kept_chunks(options: LSEOptions, rows: int, sampled: int) -> int:
    """How many leading chunks the logit budget keeps: each holds ``B × chunk·K`` logits in the
    compute dtype (plain logits, K = 1: beside ``B`` row maxima)."""
    if sampled == 0:
        return 0
    logits = rows * min(options.chunk_size, sampled) * options.subcenters
    return options.logit_budget_bytes // (logits * options.compute_dtype.itemsize)


def _chunk_lse(n: torch.Tensor, target: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place ``n ← exp(n − m)`` (own class masked, ``m``: the row maxima, 0 where a row has
    no negative); returns it, ``m`` and the chunk's ``m + log Σ_j exp(n_j − m)``."""
    _mask_targets(n, target, start, float("-inf"))
    row_max = _finite_or_zero(n.amax(dim=1))
    exponentials = n.sub_(row_max.unsqueeze(1)).exp_()
    return exponentials, row_max, exponentials.sum(dim=1).log_().add_(row_max)


def _through_phi(products: torch.Tensor, shift: torch.Tensor, grad_lse: torch.Tensor,
                 target: torch.Tensor, start: int, options: LSEOptions,
                 context: torch.Tensor | None, grad_context: torch.Tensor | None) -> torch.Tensor:
    """``dz = (∂n/∂z)ᵀ p`` by autograd through φ (and the sub-centre max and the filter), with
    ``p = |ḡ|`` (``'sum'``) or ``exp(n − shift)``, 0 on the own class; adds φ's gradient with
    respect to ``context`` into ``grad_context`` (when given)."""
    with torch.enable_grad():
        z = products.detach().requires_grad_()
        n = _negatives(z, shift.dtype, options, context)
    if _summed(options):
        p = grad_lse.abs().unsqueeze(1).expand_as(n).clone()
    else:
        p = torch.sub(n.detach(), shift).exp_()
    _mask_targets(p, target, start, 0.0)
    inputs = (z,) if grad_context is None else (z, context)
    dz, *d_context = torch.autograd.grad(n, inputs, p)
    if grad_context is not None:
        grad_context.add_(d_context[0])
    return dz


def _plain_probabilities(products: torch.Tensor, shift: torch.Tensor, target: torch.Tensor,
                         start: int, buffers: _ChunkBuffers) -> torch.Tensor:
    """``p = exp(z − shift)``, own class 0, in the compute dtype: in place in the buffers."""
    n = products if products.dtype == buffers.acc else buffers.to_acc(products)
    p = n.sub_(shift).exp_()
    _mask_targets(p, target, start, 0.0)
    return p if p is products else products.copy_(p)


def _write_weight_gradient(grad_rows: torch.Tensor, dz: torch.Tensor, x_side: torch.Tensor,
                           w_hat: torch.Tensor, norm: torch.Tensor, index: torch.Tensor,
                           start: int, options: LSEOptions) -> None:
    """Write the chunk's rows of the weight gradient: ``dŴ_c = dzᵀ @ x_side``, through the
    normalisation when there is one. The product lands in ``grad_rows`` itself when the chunk's
    rows are contiguous there (sparse gradient, or the whole shard sampled)."""
    size, dim = options.chunk_size, x_side.shape[1]
    if options.sparse_weight_grad:
        destination = grad_rows[start : start + size]
    else:
        rows = _rows(index, len(grad_rows), start, size)
        destination = grad_rows[rows] if isinstance(rows, slice) else None
    if destination is not None and x_side.dtype == grad_rows.dtype:
        grad = torch.mm(dz.T, x_side, out=destination.view(-1, dim))
    else:
        grad = (dz.T @ x_side).to(grad_rows.dtype)
    if options.normalize_weights:
        dot = torch.linalg.vecdot(w_hat, grad) * (norm >= EPS)
        grad.addcmul_(w_hat, dot.unsqueeze(1), value=-1)
        grad.div_(norm.clamp_min(EPS).unsqueeze(1))
    if destination is None:
        grad_rows[index[start : start + size]] = grad.view(-1, grad_rows.shape[1])
    elif grad.data_ptr() != destination.data_ptr():
        destination.copy_(grad.view_as(destination))


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
    if options.phi is None:
        return z
    return options.phi(z) if context is None else options.phi(z, context)


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of the same storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
