"""Head checkpoints of the modern zoo: the loss state (CurricularFace t, AdaFace μ and σ,
UniFace b with its momentum) and sub-centre rows survive a resume at another world size.

The chain of ``test_checkpoint.py``: train a float64 head 3 steps at 2 ranks and save; resume at
3 ranks and save, then at 1, then back at 2. Every stage restores the state exactly and its
next two steps' losses (and states) equal those of the run that never stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from workers.head import (
    SampledSoftmaxHead,
    load_head_checkpoint,
    partition_n_into_range,
    read_head_manifest,
    save_head_checkpoint,
)
from workers.losses import build_loss

pytestmark = pytest.mark.slow

DIM, NUM_CLASSES, SEED, BATCH = 5, 13, 7, 12
TRAIN_STEPS, NEXT_STEPS = 3, 2
CHAIN = [(2, None, "ckpt2"), (3, "ckpt2", "ckpt3"), (1, "ckpt3", "ckpt1"), (2, "ckpt1", "back2")]
LOSSES = {
    "curricularface": {"scale": 8.0, "t_alpha": 0.3},
    "adaface": {"scale": 8.0, "t_alpha": 0.3},
    "uniface": {"scale": 8.0},
    "subcenter_arcface": {"scale": 8.0},
    "elasticface_arc": {"scale": 8.0, "sigma": 0.1, "plus": True},
}


def _build(name: str, group: dist.ProcessGroup | None
           ) -> tuple[SampledSoftmaxHead, torch.optim.Optimizer]:
    # batch sampling: the same negatives at any world size, so resumed runs can be compared
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss(name, **LOSSES[name]),
                              sampling="batch", process_group=group, chunk_size=4, seed=SEED,
                              dtype=torch.float64)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    return head, optimizer


def _step(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer, step: int) -> float:
    generator = torch.Generator().manual_seed(1000 + step)
    embeddings = 2.0 * torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    start, stop = partition_n_into_range(BATCH, head.shard.world_size)[head.shard.rank]
    optimizer.zero_grad(set_to_none=True)
    loss = head(embeddings[start:stop], labels[start:stop])
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _snapshot(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    loss_momentum = {name: optimizer.state[p]["momentum_buffer"].clone()
                     for name, p in head.loss_state.named_parameters()
                     } if head.loss_state is not None else {}
    return {"weight": head.weight.detach().clone(), "state": head.loss_state_values(),
            "momentum": optimizer.state[head.weight]["momentum_buffer"].clone(),
            "loss_momentum": loss_momentum, "step_count": head.step_count}


def _chain_stage(rank: int, world_size: int, out: Path, source: str | None,
                 target: str) -> None:
    group = dist.new_group(list(range(world_size)))
    records = {}
    for name in LOSSES:
        head, optimizer = _build(name, group)
        if source is None:
            for step in range(TRAIN_STEPS):
                _step(head, optimizer, step)
        else:
            load_head_checkpoint(head, optimizer, out / name / source)
        snapshot = _snapshot(head, optimizer)
        save_head_checkpoint(head, optimizer, out / name / target)
        losses = [_step(head, optimizer, TRAIN_STEPS + i) for i in range(NEXT_STEPS)]
        records[name] = {**snapshot, "losses": losses, "next_state": head.loss_state_values()}
    torch.save(records, out / f"{target}-rank{rank}.pt")


def _uninterrupted(rank: int, world_size: int, out: Path) -> None:
    """The same 5 steps at 2 ranks without a checkpoint in between."""
    group = dist.new_group(list(range(world_size)))
    records = {}
    for name in LOSSES:
        head, optimizer = _build(name, group)
        losses = [_step(head, optimizer, step) for step in range(TRAIN_STEPS + NEXT_STEPS)]
        records[name] = {"losses": losses[TRAIN_STEPS:], "state": head.loss_state_values()}
    torch.save(records, out / f"straight-rank{rank}.pt")


@pytest.fixture(scope="module")
def chain(gloo_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("zoo-chain")
    stages = {}
    for world_size, source, target in CHAIN:
        gloo_runner(_chain_stage, world_size, out, source, target)
        stages[target] = [torch.load(out / f"{target}-rank{r}.pt") for r in range(world_size)]
    gloo_runner(_uninterrupted, 2, out)
    stages["straight"] = [torch.load(out / f"straight-rank{r}.pt") for r in range(2)]
    return {"out": out, "stages": stages}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("stage", [target for _, source, target in CHAIN if source])
def test_resume_restores_the_loss_state_exactly(chain: dict[str, Any], stage: str,
                                                name: str) -> None:
    saved = [rank[name] for rank in chain["stages"]["ckpt2"]]
    restored = [rank[name] for rank in chain["stages"][stage]]
    assert saved[0]["state"] == saved[1]["state"]
    for record in restored:
        assert record["state"] == saved[0]["state"] and record["step_count"] == TRAIN_STEPS
        for key, value in saved[0]["loss_momentum"].items():
            assert torch.equal(record["loss_momentum"][key], value), key
    for key in ("weight", "momentum"):
        assert torch.equal(torch.cat([r[key] for r in restored]),
                           torch.cat([r[key] for r in saved])), key
    straight = chain["stages"]["straight"][0][name]
    torch.testing.assert_close(torch.tensor(restored[0]["losses"]),
                               torch.tensor(straight["losses"]), rtol=1e-12, atol=0)
    assert restored[0]["next_state"] == pytest.approx(straight["state"], rel=1e-12)


def test_manifest_and_shared_file_hold_the_state(chain: dict[str, Any]) -> None:
    expected = {"curricularface": {"t"}, "adaface": {"mu", "sigma"}, "uniface": {"bias"},
                "subcenter_arcface": set(), "elasticface_arc": set()}
    for name, keys in expected.items():
        directory = chain["out"] / name / "ckpt3"
        manifest = read_head_manifest(directory, NUM_CLASSES, DIM)
        assert manifest.loss_state == bool(keys) and manifest.world_size == 3
        assert manifest.subcenters == (3 if name == "subcenter_arcface" else 1)
        shared = torch.load(directory / "shared.pt")
        assert set(shared["loss"] or {}) == keys
        assert set(shared["loss_optimizer"]) == ({"bias"} if name == "uniface" else set())
    rows = torch.load(chain["out"] / "subcenter_arcface" / "ckpt3" / "rows-00000-of-00003.pt")
    assert rows["weight"].shape == (5, 3 * DIM)


def test_wrong_subcenter_count_is_one_line(chain: dict[str, Any]) -> None:
    directory = chain["out"] / "subcenter_arcface" / "ckpt1"
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss("subcenter_arcface", subcenters=2),
                              dtype=torch.float64)
    with pytest.raises(ValueError, match=r"manifest.json: subcenters = 3, but the head has "
                                         r"subcenters = 2$"):
        load_head_checkpoint(head, None, directory)
