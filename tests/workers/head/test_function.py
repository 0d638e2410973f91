"""The chunked LSE Function on one process: gradcheck, dense reference, chunking, dtypes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from workers.head import ChunkedLSE, HeadShard, LSEOptions

SHARD = HeadShard(0, 7)
#: sampled rows of the 7-class shard and, per row, the position of its class in INDEX (or −1)
INDEX = torch.tensor([0, 2, 3, 6])
TARGET = torch.tensor([1, -1, 3, 0])
PHIS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "scaled": lambda z: 8.0 * z,
    "identity": lambda z: z,
    "quadratic": lambda z: 3.0 * z + 2.0 * z**2,
}


def lse(x: torch.Tensor, w: torch.Tensor, phi: str, normalize: bool, chunk_size: int = 3,
        index: torch.Tensor = INDEX, target: torch.Tensor = TARGET,
        compute_dtype: torch.dtype | None = None, sparse: bool = False) -> torch.Tensor:
    options = LSEOptions(PHIS[phi], normalize, chunk_size, SHARD, compute_dtype or x.dtype,
                         sparse_weight_grad=sparse)
    return ChunkedLSE.apply(x, w, index, target, options)


def dense_lse(x: torch.Tensor, w: torch.Tensor, phi: str, normalize: bool,
              index: torch.Tensor = INDEX, target: torch.Tensor = TARGET) -> torch.Tensor:
    """The materialised formula: logsumexp of φ over the sampled columns, own class masked."""
    w_sampled = F.normalize(w[index], dim=1) if normalize else w[index]
    n = PHIS[phi](x @ w_sampled.T)
    own = torch.zeros_like(n, dtype=torch.bool)
    rows = (target >= 0).nonzero().squeeze(1)
    own[rows, target[rows]] = True
    return torch.logsumexp(n.masked_fill(own, float("-inf")), dim=1)


def _inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(4, 5, generator=generator, dtype=torch.float64), dim=1)
    w = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()


@pytest.mark.parametrize(("phi", "normalize"), [("scaled", True), ("identity", False),
                                                ("quadratic", True)])
def test_gradcheck(phi: str, normalize: bool) -> None:
    x, w = _inputs()
    assert torch.autograd.gradcheck(lambda a, b: lse(a, b, phi, normalize), (x, w),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("phi", "normalize"), [("scaled", True), ("identity", False),
                                                ("quadratic", True)])
def test_matches_dense_and_unsampled_rows_get_zero(phi: str, normalize: bool) -> None:
    x, w = _inputs()
    upstream = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    got = lse(x, w, phi, normalize)
    grad_x, grad_w = torch.autograd.grad(got, (x, w), upstream)
    expected = dense_lse(x, w, phi, normalize)
    ref_x, ref_w = torch.autograd.grad(expected, (x, w), upstream)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_x, ref_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_w, rtol=0, atol=1e-12)
    assert torch.count_nonzero(grad_w[[1, 4, 5]]) == 0


@pytest.mark.parametrize(("index", "chunk_size"), [(INDEX, 3), (INDEX, 1), (torch.arange(7), 2)])
def test_sparse_weight_gradient_equals_the_dense_one(index: torch.Tensor,
                                                     chunk_size: int) -> None:
    """The sparse COO gradient holds exactly the sampled rows of the dense gradient."""
    x, w = _inputs()
    target = torch.tensor([1, -1, 3, 0])
    upstream = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    dense = torch.autograd.grad(lse(x, w, "quadratic", True, chunk_size, index, target),
                                (x, w), upstream)
    sparse = torch.autograd.grad(lse(x, w, "quadratic", True, chunk_size, index, target,
                                     sparse=True), (x, w), upstream)
    assert sparse[1].is_sparse and torch.equal(sparse[1].indices()[0], index)
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=0)
    torch.testing.assert_close(sparse[1].to_dense(), dense[1], rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_chunking_does_not_change_values_or_grads(chunk_size: int) -> None:
    x, w = _inputs()
    index, target = torch.arange(7), torch.tensor([1, 6, 0, 3])
    whole = lse(x, w, "scaled", True, 10_000, index, target)
    chunked = lse(x, w, "scaled", True, chunk_size, index, target)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(chunked.sum(), (x, w)),
                             torch.autograd.grad(whole.sum(), (x, w)), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_row_without_negatives_is_minus_inf_with_zero_grad() -> None:
    """Only the row's own class sampled: ``lse = −inf``; no NaN forward or backward."""
    x, w = _inputs()
    got = lse(x, w, "scaled", True, index=torch.tensor([2]), target=torch.tensor([0, 0, -1, 0]))
    assert got[[0, 1, 3]].tolist() == [float("-inf")] * 3
    assert torch.isfinite(got[2])
    grad_x, grad_w = torch.autograd.grad(got[2] + torch.logaddexp(got, torch.zeros(4)).sum(),
                                         (x, w))
    assert bool(torch.isfinite(grad_x).all() and torch.isfinite(grad_w).all())


def test_float64_stays_float64_and_float32_accumulates_in_float32() -> None:
    x, w = _inputs()
    assert lse(x, w, "scaled", True).dtype == torch.float64
    x32, w32 = _inputs(torch.float32)
    assert lse(x32, w32, "scaled", True).dtype == torch.float32


def test_bfloat16_products_accumulate_in_float32() -> None:
    """bf16 matmuls, float32 log-sum-exp: close to float32 at bf16 tolerance, grads too."""
    x, w = _inputs(torch.float32)
    got = lse(x, w, "scaled", True, compute_dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    expected = dense_lse(x, w, "scaled", True)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=5e-2)
    grads = torch.autograd.grad(got.sum(), (x, w))
    ref = torch.autograd.grad(expected.sum(), (x, w))
    assert all(g.dtype == torch.float32 for g in grads)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)


def test_inputs_not_mutated() -> None:
    x, w = _inputs()
    index, target = INDEX.clone(), TARGET.clone()
    before = [t.detach().clone() for t in (x, w, index, target)]
    lse(x, w, "scaled", True, index=index, target=target).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (x, w, index, target), strict=True))
