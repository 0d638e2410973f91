"""``ChunkedLSE``'s extensions for the modern zoo, one process: sub-centres (max over K), the
inter-class filter, the ``'sum'`` reduction and a per-row context with a gradient — gradcheck
in float64 and a dense, materialised formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.head import ChunkedLSE, HeadShard, LSEOptions

SHARD = HeadShard(0, 7)
INDEX = torch.tensor([0, 2, 3, 6])
TARGET = torch.tensor([1, -1, 3, 0])
K, D = 3, 5


def phi_with_context(z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A row-dependent φ: softplus(s·z − b_i) (UniFace's per-class term, b per row)."""
    return F.softplus(6.0 * z - context[:, :1])


def phi_plain(z: torch.Tensor) -> torch.Tensor:
    return 6.0 * z + z**2


def run(x: torch.Tensor, w: torch.Tensor, context: torch.Tensor | None, *, reduction: str,
        subcenters: int, threshold: float, chunk_size: int = 2, budget: int = 0) -> torch.Tensor:
    phi = phi_plain if context is None else phi_with_context
    options = LSEOptions(phi, True, chunk_size, SHARD, x.dtype, subcenters=subcenters,
                         filter_threshold=threshold, reduction=reduction,
                         logit_budget_bytes=budget)
    if context is None:
        return ChunkedLSE.apply(x, w, INDEX, TARGET, options)
    return ChunkedLSE.apply(x, w, INDEX, TARGET, options, context)


def dense(x: torch.Tensor, w: torch.Tensor, context: torch.Tensor | None, *, reduction: str,
          subcenters: int, threshold: float) -> torch.Tensor:
    centres = F.normalize(w[INDEX].unflatten(1, (subcenters, D)), dim=2)
    z = torch.einsum("bd,ckd->bck", x, centres).max(dim=2).values
    if threshold:
        z = torch.where(z > threshold, torch.zeros_like(z), z)
    n = phi_plain(z) if context is None else phi_with_context(z, context)
    own = torch.zeros_like(n, dtype=torch.bool)
    rows = (TARGET >= 0).nonzero().squeeze(1)
    own[rows, TARGET[rows]] = True
    if reduction == "sum":
        return n.masked_fill(own, 0.0).sum(dim=1)
    return torch.logsumexp(n.masked_fill(own, float("-inf")), dim=1)


def _inputs(subcenters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(4, D, generator=generator, dtype=torch.float64), dim=1)
    w = torch.randn(7, subcenters * D, generator=generator, dtype=torch.float64)
    context = torch.randn(4, 1, generator=generator, dtype=torch.float64)
    return x.requires_grad_(), w.requires_grad_(), context.requires_grad_()


SETTINGS = [("lse", 1, 0.0, False), ("lse", K, 0.0, False), ("lse", K, 0.2, False),
            ("sum", 1, 0.0, True), ("sum", K, 0.2, True), ("lse", 1, 0.2, True)]


@pytest.mark.parametrize(("reduction", "subcenters", "threshold", "with_context"), SETTINGS)
def test_gradcheck(reduction: str, subcenters: int, threshold: float,
                   with_context: bool) -> None:
    x, w, context = _inputs(subcenters)
    kw = {"reduction": reduction, "subcenters": subcenters, "threshold": threshold}
    if with_context:
        assert torch.autograd.gradcheck(lambda a, b, c: run(a, b, c, **kw), (x, w, context),
                                        eps=1e-6, atol=1e-6)
    else:
        assert torch.autograd.gradcheck(lambda a, b: run(a, b, None, **kw), (x, w),
                                        eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kept_chunks", [0, 1, 4])
@pytest.mark.parametrize("chunk_size", [1, 2, 4])
@pytest.mark.parametrize(("reduction", "subcenters", "threshold", "with_context"), SETTINGS)
def test_matches_the_dense_formula(reduction: str, subcenters: int, threshold: float,
                                   with_context: bool, chunk_size: int, kept_chunks: int) -> None:
    """Every chunk recomputed, the first kept (its B × chunk·K float64 products), all kept."""
    x, w, context = _inputs(subcenters)
    kw = {"reduction": reduction, "subcenters": subcenters, "threshold": threshold}
    c = context if with_context else None
    budget = kept_chunks * len(x) * chunk_size * subcenters * 8
    got = run(x, w, c, chunk_size=chunk_size, budget=budget, **kw)
    want = dense(x, w, c, **kw)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    inputs = (x, w, context) if with_context else (x, w)
    got_grads = torch.autograd.grad(got.sum(), inputs)
    want_grads = torch.autograd.grad(want.sum(), inputs)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    unsampled = [row for row in range(7) if row not in INDEX.tolist()]
    assert float(got_grads[1][unsampled].abs().max()) == 0.0


def test_subcenter_gradient_reaches_the_argmax_rows_only() -> None:
    x, w, _ = _inputs(K)
    (grad,) = torch.autograd.grad(run(x, w, None, reduction="lse", subcenters=K,
                                      threshold=0.0).sum(), (w,))
    centres = F.normalize(w.detach()[INDEX].unflatten(1, (K, D)), dim=2)
    chosen = torch.einsum("bd,ckd->bck", x.detach(), centres).argmax(dim=2)  # (B, n)
    used = torch.zeros(len(INDEX), K, dtype=torch.bool)
    for row in range(len(x)):
        for column in range(len(INDEX)):
            if TARGET[row] != column:
                used[column, chosen[row, column]] = True
    per_row = grad[INDEX].unflatten(1, (K, D)).norm(dim=2)
    assert bool((per_row[~used] == 0).all()) and bool((per_row[used] > 0).all())


def test_unknown_reduction_is_one_line() -> None:
    x, w, _ = _inputs(1)
    with pytest.raises(ValueError, match=r"^reduction = 'max' must be 'lse' or 'sum'$"):
        run(x, w, None, reduction="max", subcenters=1, threshold=0.0)
