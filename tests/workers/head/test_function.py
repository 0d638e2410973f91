"""The chunked LSE Function on one process: gradcheck, dense reference, chunking, dtypes, and
the logit budget (which chunks are kept, and that backward skips their products)."""

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
#: φ by name; ``"plain"`` is ``phi=None`` (the identity, kept as forward's exponentials)
PHIS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "scaled": lambda z: 8.0 * z,
    "identity": lambda z: z,
    "quadratic": lambda z: 3.0 * z + 2.0 * z**2,
    "plain": None,
}
#: logit bytes of INDEX's chunks of 3 classes for the 4 float64 rows (the last holds 1 class)
CHUNK_BYTES = 4 * 3 * 8
#: logit budgets: every chunk recomputed, the first of the two chunks kept, both kept
BUDGETS = {"recompute": 0, "some": CHUNK_BYTES, "all": 1 << 20}


def lse(x: torch.Tensor, w: torch.Tensor, phi: str, normalize: bool, chunk_size: int = 3,
        index: torch.Tensor = INDEX, target: torch.Tensor = TARGET,
        compute_dtype: torch.dtype | None = None, sparse: bool = False,
        budget: int = 0) -> torch.Tensor:
    options = LSEOptions(PHIS[phi], normalize, chunk_size, SHARD, compute_dtype or x.dtype,
                         sparse_weight_grad=sparse, logit_budget_bytes=budget)
    return ChunkedLSE.apply(x, w, index, target, options)


def dense_lse(x: torch.Tensor, w: torch.Tensor, phi: str, normalize: bool,
              index: torch.Tensor = INDEX, target: torch.Tensor = TARGET) -> torch.Tensor:
    """The materialised formula: logsumexp of φ over the sampled columns, own class masked."""
    w_sampled = F.normalize(w[index], dim=1) if normalize else w[index]
    phi_map = PHIS[phi]
    n = x @ w_sampled.T if phi_map is None else phi_map(x @ w_sampled.T)
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


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize(("phi", "normalize"), [("scaled", True), ("identity", False),
                                                ("quadratic", True), ("plain", True),
                                                ("plain", False)])
def test_matches_dense_and_unsampled_rows_get_zero(phi: str, normalize: bool,
                                                   budget: str) -> None:
    x, w = _inputs()
    upstream = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    got = lse(x, w, phi, normalize, budget=BUDGETS[budget])
    grad_x, grad_w = torch.autograd.grad(got, (x, w), upstream)
    expected = dense_lse(x, w, phi, normalize)
    ref_x, ref_w = torch.autograd.grad(expected, (x, w), upstream)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_x, ref_x, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_w, rtol=0, atol=1e-12)
    assert torch.count_nonzero(grad_w[[1, 4, 5]]) == 0


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("phi", ["quadratic", "plain"])
@pytest.mark.parametrize(("index", "chunk_size"), [(INDEX, 3), (INDEX, 1), (torch.arange(7), 2)])
def test_sparse_weight_gradient_equals_the_dense_one(index: torch.Tensor, chunk_size: int,
                                                     phi: str, budget: str) -> None:
    """The sparse COO gradient holds exactly the sampled rows of the dense gradient."""
    x, w = _inputs()
    target = torch.tensor([1, -1, 3, 0])
    upstream = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    dense = torch.autograd.grad(lse(x, w, phi, True, chunk_size, index, target,
                                    budget=BUDGETS[budget]), (x, w), upstream)
    sparse = torch.autograd.grad(lse(x, w, phi, True, chunk_size, index, target, sparse=True,
                                     budget=BUDGETS[budget]), (x, w), upstream)
    assert sparse[1].is_sparse and torch.equal(sparse[1].indices()[0], index)
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=0)
    torch.testing.assert_close(sparse[1].to_dense(), dense[1], rtol=0, atol=0)


@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_chunking_does_not_change_values_or_grads(chunk_size: int, budget: str) -> None:
    x, w = _inputs()
    index, target = torch.arange(7), torch.tensor([1, 6, 0, 3])
    whole = lse(x, w, "plain", True, 10_000, index, target)
    chunked = lse(x, w, "plain", True, chunk_size, index, target, budget=BUDGETS[budget])
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(chunked.sum(), (x, w)),
                             torch.autograd.grad(whole.sum(), (x, w)), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("phi", "budget"), [("scaled", 0), ("scaled", 1 << 20),
                                            ("plain", 1 << 20)])
def test_row_without_negatives_is_minus_inf_with_zero_grad(phi: str, budget: int) -> None:
    """Only the row's own class sampled: ``lse = −inf``; no NaN forward or backward."""
    x, w = _inputs()
    got = lse(x, w, phi, True, index=torch.tensor([2]), target=torch.tensor([0, 0, -1, 0]),
              budget=budget)
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


@pytest.mark.parametrize(("phi", "budget"), [("scaled", 0), ("scaled", 1 << 20),
                                            ("plain", 0), ("plain", 1 << 20)])
def test_bfloat16_products_accumulate_in_float32(phi: str, budget: int) -> None:
    """bf16 matmuls, float32 log-sum-exp: close to float32 at bf16 tolerance, grads too (the
    plain logits' kept exponentials are bf16)."""
    x, w = _inputs(torch.float32)
    if phi == "plain":  # the scale of "scaled" folded into x
        x = (8.0 * x).detach().requires_grad_()
    got = lse(x, w, phi, True, compute_dtype=torch.bfloat16, budget=budget)
    assert got.dtype == torch.float32
    expected = dense_lse(x, w, phi, True)
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


def _saved_bytes(phi: str, budget: int) -> int:
    """Bytes the Function saves for backward (``saved_tensors_hooks`` sees every one)."""
    x, w = _inputs()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lse(x, w, phi, True, budget=budget)
    return total


@pytest.mark.parametrize("phi", ["quadratic", "plain"])
def test_budget_keeps_the_leading_chunks_that_fit(phi: str) -> None:
    """Kept: the first ⌊budget / logit bytes of a full chunk⌋ chunks (3 classes, then 1), as
    products (φ given) or exponentials and the 4 row maxima (plain)."""
    maxima = 4 * 8 if phi == "plain" else 0
    first, last = CHUNK_BYTES + maxima, CHUNK_BYTES // 3 + maxima
    baseline = _saved_bytes(phi, 0)
    for budget, kept in [(CHUNK_BYTES - 1, 0), (CHUNK_BYTES, first), (2 * CHUNK_BYTES - 1, first),
                         (2 * CHUNK_BYTES, first + last)]:
        assert _saved_bytes(phi, budget) - baseline == kept, budget


@pytest.mark.parametrize("phi", ["quadratic", "plain"])
@pytest.mark.parametrize(("budget", "recomputed"), [("recompute", 2), ("some", 1), ("all", 0)])
def test_backward_recomputes_only_the_chunks_beyond_the_budget(phi: str, budget: str,
                                                                recomputed: int) -> None:
    """Backward runs ``dx`` and ``dW`` products per chunk, plus ``x @ Ŵ_cᵀ`` per chunk that
    was not kept."""
    x, w = _inputs()
    value = lse(x, w, phi, True, budget=BUDGETS[budget]).sum()
    with torch.profiler.profile() as prof:
        value.backward()
    products = [event for event in prof.events() if event.name == "aten::mm"]
    assert len(products) == 2 * 2 + recomputed
