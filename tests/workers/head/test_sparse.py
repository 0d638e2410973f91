"""``unsampled_rows='sparse'`` equals ``'frozen'`` step for step, with O(r·C) gradients.

Both policies train the same float64 head (13 classes, r = 0.3, so most rows sit out each step)
for four optimizer steps, on one process and on a real two-process gloo group (uneven shards of
7 and 6 rows); the weight and every optimizer state tensor must agree after every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from workers.head import SampledSoftmaxHead
from workers.losses import build_loss

DIM, NUM_CLASSES, STEPS, BATCH = 5, 13, 4, 4
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.05),
    "sgd-dampened-nesterov": lambda params: torch.optim.SGD(
        params, lr=0.2, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.1),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=0.01,
                                                    amsgrad=True),
}


def train(policy: str, optimizer_name: str, group: dist.ProcessGroup | None, rank: int,
          world_size: int, accumulate: int = 1) -> list[dict[str, torch.Tensor]]:
    """Weight and optimizer state of this rank's shard after every step."""
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss("cosface", scale=8.0),
                              sample_ratio=0.3, process_group=group, chunk_size=2,
                              unsampled_rows=policy, dtype=torch.float64)
    optimizer = OPTIMIZERS[optimizer_name](head.parameters())
    head.attach_optimizer(optimizer)
    history = []
    for step in range(STEPS):
        for micro in range(accumulate):
            generator = torch.Generator().manual_seed(100 * step + micro)
            x = torch.randn(BATCH * world_size, DIM, generator=generator, dtype=torch.float64)
            labels = torch.randint(NUM_CLASSES, (BATCH * world_size,), generator=generator)
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            head(x[rows], labels[rows]).backward()
        if policy == "sparse":
            assert head.weight.grad.is_sparse
            assert head.weight.grad.coalesce().indices().shape[1] < head.shard.size
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"weight": head.weight.detach().clone(),
                        **{key: value.clone()
                           for key, value in optimizer.state[head.weight].items()}})
    return history


def assert_same_history(sparse: list[dict[str, torch.Tensor]],
                        frozen: list[dict[str, torch.Tensor]]) -> None:
    for step, (got, expected) in enumerate(zip(sparse, frozen, strict=True)):
        assert got.keys() == expected.keys(), step
        for key in expected:
            # equal up to the order in which a row's several gradient terms are summed
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-13,
                                       msg=f"step {step}, {key}")


@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_sparse_equals_frozen_one_process(optimizer_name: str) -> None:
    sparse = train("sparse", optimizer_name, None, 0, 1)
    frozen = train("frozen", optimizer_name, None, 0, 1)
    assert_same_history(sparse, frozen)
    # and it is not the dense policy: unsampled rows did not decay
    dense = train("dense", optimizer_name, None, 0, 1)
    assert not torch.allclose(sparse[-1]["weight"], dense[-1]["weight"])


def test_sparse_equals_frozen_with_gradient_accumulation() -> None:
    assert_same_history(train("sparse", "sgd", None, 0, 1, accumulate=2),
                        train("frozen", "sgd", None, 0, 1, accumulate=2))


def _distributed(rank: int, world_size: int, out: Path) -> None:
    results = {name: {policy: train(policy, name, dist.group.WORLD, rank, world_size)
                      for policy in ("sparse", "frozen")}
               for name in ("sgd", "adamw")}
    torch.save(results, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_sparse_equals_frozen_on_two_ranks(gloo_runner: Any, tmp_path: Path) -> None:
    gloo_runner(_distributed, 2, tmp_path)
    shard_rows = []
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name, by_policy in results.items():
            assert_same_history(by_policy["sparse"], by_policy["frozen"]), name
        shard_rows.append(len(results["sgd"]["sparse"][0]["weight"]))
    assert shard_rows == [7, 6]


def test_sparse_gradient_holds_only_the_sampled_rows() -> None:
    head = SampledSoftmaxHead(DIM, 1000, build_loss("arcface", scale=8.0), sample_ratio=0.05,
                              unsampled_rows="sparse", chunk_size=16)
    x, labels = torch.randn(8, DIM), torch.randint(1000, (8,))
    head(x, labels).backward()
    gradient = head.weight.grad.coalesce()
    assert torch.equal(gradient.indices()[0], head.last_sample)
    assert gradient.values().shape == (50, DIM)


def test_sparse_needs_a_supported_optimizer() -> None:
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss("cosface"), unsampled_rows="sparse")
    with pytest.raises(ValueError, match=r"^unsampled_rows = 'sparse' needs torch.optim.SGD"):
        head.attach_optimizer(torch.optim.RMSprop(head.parameters()))
