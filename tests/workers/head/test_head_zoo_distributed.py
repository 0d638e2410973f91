"""The modern zoo in the sharded head on real CPU gloo groups of 1, 2 and 3 processes.

Per case, three training-mode steps with fixed centres: every rank's loss, embedding
gradient and shard gradient, the loss state after each step (identical on every rank), the
gradient of the replicated loss parameters (UniFace's b) and ElasticFace's per-row margins are
compared with ``reference_loss`` run step by step on the concatenated batch with one
``LossState``. 13 classes never split evenly over 2 or 3 ranks; batches are split unevenly
([9, 3], [7, 0, 5]: a rank may hold no row); float64 throughout. The filter cases and UniFace
also run at logit budget 0 (every chunk recomputed) and at one that keeps each shard's first
chunk only (the others: the default, every chunk kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import workers.losses.elasticface as elasticface_module
from tests.spies import record_collective_groups
from workers.head import SampledSoftmaxHead
from workers.losses import Batch, LossState, build_loss, get_loss_class, reference_loss
from workers.losses.elasticface import elastic_margins

pytestmark = pytest.mark.slow

DIM, NUM_CLASSES, SEED, STEPS = 5, 13, 4321, 3
LABELS = [0, 5, 5, 12, 2, 0, 9, 12, 2, 5, 0, 9]
SIZES = {1: [12], 2: [9, 3], 3: [7, 0, 5]}
WORLD_SIZES = [1, 2, 3]
ZOO = ["curricularface", "magface", "adaface", "elasticface_arc", "elasticface_cos",
       "subcenter_arcface", "uniface"]
#: hyperparameters beside scale 8: MagFace's norm range holds the test's norms (≈ 0.5–4)
EXTRA = {"magface": {"l_a": 0.5, "u_a": 60.0}, "curricularface": {"t_alpha": 0.3},
         "adaface": {"t_alpha": 0.3}, "elasticface_arc": {"sigma": 0.1}}


@dataclass(frozen=True)
class Case:
    name: str
    loss: str
    sample_ratio: float = 1.0
    sampling: str = "uniform"
    filter_threshold: float = 0.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    #: ``"default"``, ``"recompute"`` (0) or ``"first-chunk"``
    budget: str = "default"


BUDGETED = [
    Case("curricularface-filter", "curricularface", 0.7, filter_threshold=0.3),
    Case("arcface-filter", "arcface", 0.7, filter_threshold=0.3),
    Case("subcenter_arcface-k2-filter", "subcenter_arcface", 0.7, filter_threshold=0.2,
         hyperparameters={"subcenters": 2}),
    Case("uniface-r0.7", "uniface", 0.7),
]


CASES = (
    [Case(f"{name}-full", name) for name in ZOO]
    + [Case(f"{name}-r0.7", name, sample_ratio=0.7) for name in ZOO]
    + [Case(f"{name}-batch", name, sampling="batch") for name in ZOO]
    + BUDGETED[:3]
    + [Case("elasticface_arc-plus", "elasticface_arc", hyperparameters={"plus": True})]
    + [dataclasses.replace(case, name=f"{case.name}-{budget}", budget=budget)
       for case in BUDGETED for budget in ("recompute", "first-chunk")]
)
CASE_BY_NAME = {case.name: case for case in CASES}


def case_loss(case: Case) -> Any:
    specs = {spec.name for spec in get_loss_class(case.loss).hyperparameters()}
    kwargs = {"scale": 8.0} if "scale" in specs else {}
    return build_loss(case.loss, **kwargs, **EXTRA.get(case.loss, {}), **case.hyperparameters)


def budget_kwargs(case: Case, loss: Any) -> dict[str, float]:
    """The head's ``logit_budget_mb``: 1.5 × one chunk's float64 logits (12 rows × 4·K) for the
    first chunk."""
    if case.budget == "default":
        return {}
    chunk_bytes = len(LABELS) * 4 * loss.subcenters * 8
    return {"logit_budget_mb": 0 if case.budget == "recompute" else 1.5 * chunk_bytes / 2**20}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 + step)
    return (torch.randn(len(LABELS), DIM, generator=generator, dtype=torch.float64),
            torch.tensor(LABELS))


def centres(loss: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(NUM_CLASSES, DIM * loss.subcenters, generator=generator,
                       dtype=torch.float64)


def _worker(rank: int, world_size: int, out_dir: Path) -> None:
    group = dist.new_group(list(range(world_size)))
    calls = record_collective_groups(group)
    margins: list[torch.Tensor] = []

    def spy(loss: Any, batch_: Batch) -> torch.Tensor:
        drawn = elastic_margins(loss, batch_)
        margins.append(drawn.detach().clone())
        return drawn

    elasticface_module.elastic_margins = spy  # the losses look the helper up at call time
    sizes = SIZES[world_size]
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    records: dict[str, Any] = {}
    for case in CASES:
        loss = case_loss(case)
        head = SampledSoftmaxHead(DIM, NUM_CLASSES, loss, case.sample_ratio, case.sampling,
                                  group, 4, seed=SEED, dtype=torch.float64,
                                  filter_threshold=case.filter_threshold,
                                  **budget_kwargs(case, loss))
        with torch.no_grad():
            head.weight.copy_(centres(loss)[head.shard.start : head.shard.stop])
        steps = []
        for step in range(STEPS):
            margins.clear()
            head.zero_grad()
            embeddings, labels = batch(step)
            x = embeddings[rows].clone().requires_grad_()
            value = head(x, labels[rows], step=step)
            value.backward()
            steps.append({
                "loss": value.detach(), "x_grad": x.grad, "w_grad": head.weight.grad.clone(),
                "sample": head.last_sample, "state": head.loss_state_values(),
                "param_grads": [p.grad.clone() for p in head.replicated_parameters()],
                "margins": [m.clone() for m in margins]})
        records[case.name] = steps
    records["group_used"] = calls
    torch.save(records, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def distributed(gloo_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[int, list[dict[str, Any]]] = {}

    def get(world_size: int) -> list[dict[str, Any]]:
        if world_size not in cache:
            out = tmp_path_factory.mktemp(f"zoo{world_size}")
            gloo_runner(_worker, world_size, out)
            cache[world_size] = [torch.load(out / f"rank{rank}.pt")
                                 for rank in range(world_size)]
        return cache[world_size]

    return get


def _reference_steps(case: Case, ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The single-process run: one ``LossState`` through the steps, on each step's sample."""
    loss = case_loss(case)
    state = LossState(loss, NUM_CLASSES, case.sample_ratio, dtype=torch.float64)
    results = []
    for index in range(STEPS):
        embeddings, labels = batch(index)
        classes = torch.cat([rank[case.name][index]["sample"] for rank in ranks])
        x = embeddings.clone().requires_grad_()
        w = centres(loss).requires_grad_()
        state.zero_grad()
        value = reference_loss(loss, x, w, labels, step=index, classes=classes, state=state,
                               seed=SEED, filter_threshold=case.filter_threshold)
        value.backward()
        results.append({"loss": value.detach(), "x_grad": x.grad, "w_grad": w.grad,
                        "state": state.values(),
                        "param_grads": [p.grad.clone() for p in state.parameters()]})
    return results


@pytest.mark.parametrize("case_name", list(CASE_BY_NAME))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_matches_the_single_process_run(distributed: Any, world_size: int,
                                        case_name: str) -> None:
    case, ranks = CASE_BY_NAME[case_name], distributed(world_size)
    for index, expected in enumerate(_reference_steps(case, ranks)):
        per_rank = [rank[case_name][index] for rank in ranks]
        for record in per_rank:
            torch.testing.assert_close(record["loss"], expected["loss"], rtol=0, atol=1e-10)
            # the loss state: the same on every rank, and the reference's
            assert record["state"] == per_rank[0]["state"]
            assert record["state"] == pytest.approx(expected["state"], abs=1e-12)
            for got, want in zip(record["param_grads"], expected["param_grads"], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.cat([r["x_grad"] for r in per_rank]),
                                   expected["x_grad"], rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.cat([r["w_grad"] for r in per_rank]),
                                   expected["w_grad"], rtol=0, atol=1e-10)
    if case.loss in ("curricularface", "adaface"):
        assert ranks[0][case_name][-1]["state"] != ranks[0][case_name][0]["state"]


@pytest.mark.parametrize("case_name", [c.name for c in CASES if c.loss.startswith("elastic")])
def test_elastic_margins_do_not_depend_on_the_split(distributed: Any, case_name: str) -> None:
    """Every rank of every world size draws the same margin for the same global row."""
    single = distributed(1)[0][case_name]
    for world_size in WORLD_SIZES:
        for rank in distributed(world_size):
            for step in range(STEPS):
                (drawn,) = rank[case_name][step]["margins"]
                assert drawn.shape == (len(LABELS), 1)
                assert torch.equal(drawn, single[step]["margins"][0])
    assert not torch.equal(single[0]["margins"][0], single[1]["margins"][0])  # per step


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_explicit_group_used_by_every_collective(distributed: Any, world_size: int) -> None:
    for rank in distributed(world_size):
        calls = rank["group_used"]
        assert all(calls) and (len(calls) > 0) == (world_size > 1)
