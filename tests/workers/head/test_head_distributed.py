"""SampledSoftmaxHead on real CPU gloo groups of 1, 2 and 3 processes against the reference.

One process group per world size runs every case inside the workers (starting one costs
seconds); each rank saves its loss, embedding gradient, shard gradient and sample; the tests
assemble the ranks and compare with ``reference_loss`` on the concatenated batch and the full
matrix.
13 classes never divide evenly over 2 or 3 ranks; float64 throughout. Every loss runs at three
logit budgets: the default (every chunk kept at this size), 0 (every chunk recomputed) and one
that keeps each shard's first chunk only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.spies import record_collective_groups
from workers.head import SampledSoftmaxHead, initial_rows
from workers.losses import build_loss, get_loss_class, list_losses, reference_loss

pytestmark = pytest.mark.slow

DIM, NUM_CLASSES, SEED = 5, 13, 1234
#: five distinct classes over 12 rows, so sampled shards fill with random negatives
LABELS = [0, 5, 5, 12, 2, 0, 9, 12, 2, 5, 0, 9]
EVEN_SIZES = {1: [12], 2: [6, 6], 3: [4, 4, 4]}
UNEVEN_SIZES = {1: [12], 2: [9, 3], 3: [7, 0, 5]}
WORLD_SIZES = [1, 2, 3]


@dataclass(frozen=True)
class Case:
    name: str
    loss: str
    sample_ratio: float = 1.0
    sampling: str = "uniform"
    chunk_size: int = 4
    uneven: bool = False
    steps: tuple[int, ...] = (3,)
    #: ``"default"``, ``"recompute"`` (0) or ``"first-chunk"``
    budget: str = "default"


CASES = (
    [Case(f"{name}-full", name) for name in list_losses()]
    + [Case(f"{name}-recompute", name, budget="recompute") for name in list_losses()]
    # sampled at r = 0.7 (UniFace at r = 1: its b₀ depends on r, and the reference has no state)
    + [Case(f"{name}-first-chunk", name, sample_ratio=1.0 if name == "uniface" else 0.7,
            uneven=True, budget="first-chunk") for name in list_losses()]
    + [Case(f"{name}-uneven", name, uneven=True)
       for name in ("arcface", "sphereface", "virtual", "dsoftmax", "softmax")]
    + [Case(f"{name}-r0.7", name, sample_ratio=0.7, steps=(3, 4, 3))
       for name in ("arcface", "cosface", "sphereface", "virtual", "dsoftmax", "sosoftmax")]
    + [Case(f"{name}-batch", name, sampling="batch") for name in ("dsoftmax", "arcface", "virtual")]
    + [Case(f"normface-r0.6-chunk{size}", "normface", sample_ratio=0.6, chunk_size=size,
            uneven=True) for size in (1, 7, 100)]
)
CASE_BY_NAME = {case.name: case for case in CASES}


def build_case_loss(name: str) -> Any:
    """The loss ``name`` with scale 8 where it has a scale (well-conditioned float64 parity)."""
    has_scale = any(spec.name == "scale" for spec in get_loss_class(name).hyperparameters())
    return build_loss(name, scale=8.0) if has_scale else build_loss(name)


def budget_kwargs(case: Case, loss: Any) -> dict[str, float]:
    """The head's ``logit_budget_mb`` for ``case``: 1.5 × one chunk's float64 logits (12 rows ×
    chunk·K) for the first chunk."""
    if case.budget == "default":
        return {}
    chunk_bytes = len(LABELS) * case.chunk_size * loss.subcenters * 8
    return {"logit_budget_mb": 0 if case.budget == "recompute" else 1.5 * chunk_bytes / 2**20}


def case_weight(loss: Any, weight: torch.Tensor) -> torch.Tensor:
    """The centre matrix for ``loss``: ``weight``, or for K sub-centres (C, K·DIM) with
    sub-centre 0 = ``weight`` and the others seeded random rows."""
    if loss.subcenters == 1:
        return weight
    generator = torch.Generator().manual_seed(7)
    others = torch.randn(NUM_CLASSES, (loss.subcenters - 1) * DIM, generator=generator,
                         dtype=torch.float64)
    return torch.cat([weight, others], dim=1)


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global embeddings (12 × 5), the full centre matrix (13 × 5), labels; same on every rank."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(len(LABELS), DIM, generator=generator, dtype=torch.float64)
    weight = torch.randn(NUM_CLASSES, DIM, generator=generator, dtype=torch.float64)
    return embeddings, weight, torch.tensor(LABELS)


def _worker(rank: int, world_size: int, out_dir: Path) -> None:
    group = dist.new_group(list(range(world_size)))
    calls = record_collective_groups(group)
    embeddings, weight, labels = make_data()
    records: dict[str, Any] = {}
    for case in CASES:
        sizes = (UNEVEN_SIZES if case.uneven else EVEN_SIZES)[world_size]
        lo = sum(sizes[:rank])
        rows = slice(lo, lo + sizes[rank])
        loss = build_case_loss(case.loss)
        head = SampledSoftmaxHead(DIM, NUM_CLASSES, loss, case.sample_ratio, case.sampling, group,
                                  case.chunk_size, seed=SEED, dtype=torch.float64,
                                  **budget_kwargs(case, loss))
        with torch.no_grad():
            head.weight.copy_(case_weight(head.loss, weight)[head.shard.start : head.shard.stop])
        steps = []
        for step in case.steps:
            head.zero_grad()
            x, y = embeddings[rows].clone().requires_grad_(), labels[rows].clone()
            value = head(x, y, step=step)
            value.backward()
            steps.append({
                "loss": value.detach(), "x_grad": x.grad, "w_grad": head.weight.grad.clone(),
                "sample": head.last_sample,
                "unchanged": torch.equal(x.detach(), embeddings[rows])
                and torch.equal(y, labels[rows]),
            })
        records[case.name] = {"steps": steps, "shard": (head.shard.start, head.shard.stop)}
    records["weight"] = head.weight.detach().clone()
    records["initial_weight"] = SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss("normface"),
                                                   process_group=group, seed=SEED).weight.detach()
    records["group_used"] = calls
    torch.save(records, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def distributed(gloo_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``get(world_size)``: every rank's records, starting the group once per world size."""
    cache: dict[int, list[dict[str, Any]]] = {}

    def get(world_size: int) -> list[dict[str, Any]]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"gloo{world_size}")
            gloo_runner(_worker, world_size, out)
            cache[world_size] = [torch.load(out / f"rank{rank}.pt")
                                 for rank in range(world_size)]
        return cache[world_size]

    return get


def _num_sample(case: Case, shard_size: int) -> int:
    return 0 if case.sampling == "batch" else int(case.sample_ratio * shard_size)


@pytest.mark.parametrize("case_name", list(CASE_BY_NAME))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_matches_reference(distributed: Any, world_size: int, case_name: str) -> None:
    """Loss on every rank, every rank's embedding gradient and every shard's gradient."""
    case, ranks = CASE_BY_NAME[case_name], distributed(world_size)
    loss = build_case_loss(case.loss)
    embeddings, weight, labels = make_data()
    for index, step in enumerate(case.steps):
        per_rank = [rank[case_name]["steps"][index] for rank in ranks]
        classes = torch.cat([record["sample"] for record in per_rank])
        if case.sample_ratio == 1.0 and case.sampling == "uniform":
            assert torch.equal(classes, torch.arange(NUM_CLASSES))
        x = embeddings.clone().requires_grad_()
        w = case_weight(loss, weight).clone().requires_grad_()
        expected = reference_loss(loss, x, w, labels, step=step, classes=classes, seed=SEED)
        expected.backward()
        for record in per_rank:
            torch.testing.assert_close(record["loss"], expected.detach(), rtol=0, atol=1e-10)
        x_grad = torch.cat([record["x_grad"] for record in per_rank])
        w_grad = torch.cat([record["w_grad"] for record in per_rank])
        torch.testing.assert_close(x_grad, x.grad, rtol=0, atol=1e-10)
        torch.testing.assert_close(w_grad, w.grad, rtol=0, atol=1e-10)
        unsampled = torch.ones(NUM_CLASSES, dtype=torch.bool)
        unsampled[classes] = False
        assert torch.count_nonzero(w_grad[unsampled]) == 0


@pytest.mark.parametrize("case_name", [c.name for c in CASES if c.sample_ratio < 1
                                       or c.sampling == "batch"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sample_invariants(distributed: Any, world_size: int, case_name: str) -> None:
    """Per shard: sorted, unique, every positive kept, ``max(int(r·shard), #positives)`` rows."""
    case, labels = CASE_BY_NAME[case_name], torch.tensor(LABELS)
    for rank in distributed(world_size):
        start, stop = rank[case_name]["shard"]
        positives = labels[(labels >= start) & (labels < stop)].unique()
        for record in rank[case_name]["steps"]:
            sample = record["sample"]
            assert torch.equal(sample, sample.unique())
            assert bool(((sample >= start) & (sample < stop)).all())
            assert bool(torch.isin(positives, sample).all())
            assert len(sample) == max(_num_sample(case, stop - start), len(positives))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_sample_reproducible_for_same_step(distributed: Any, world_size: int) -> None:
    """Steps (3, 4, 3): the sample of the repeated step is identical on every rank."""
    for rank in distributed(world_size):
        for case in CASES:
            if case.steps == (3, 4, 3):
                first, _, again = rank[case.name]["steps"]
                assert torch.equal(first["sample"], again["sample"])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_inputs_not_mutated(distributed: Any, world_size: int) -> None:
    for rank in distributed(world_size):
        assert all(record["unchanged"] for case in CASES for record in rank[case.name]["steps"])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_explicit_group_used_by_every_collective(distributed: Any, world_size: int) -> None:
    """Every collective got the explicit group; with one rank no collective runs at all."""
    for rank in distributed(world_size):
        calls = rank["group_used"]
        assert all(calls)
        assert (len(calls) > 0) == (world_size > 1)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shards_join_to_the_matrix_and_init_ignores_world_size(distributed: Any,
                                                                world_size: int) -> None:
    """The shards concatenate to the loaded matrix; the initial matrix is the same for any
    world size."""
    _, weight, _ = make_data()
    ranks = distributed(world_size)
    assert torch.equal(torch.cat([rank["weight"] for rank in ranks]), weight)
    assert torch.equal(torch.cat([rank["initial_weight"] for rank in ranks]),
                       initial_rows(SEED, 0, NUM_CLASSES, DIM))
