"""Sharded head checkpoints: exact re-sharding on real CPU gloo groups, bounded memory, errors.

The chain: train a float64 head for a few steps at 2 ranks and save; resume at 3 ranks and
save again, then at 1, then back at 2. At every stage the reassembled rows of the weight and of
every optimizer state tensor, the scalar state and ``step_count`` equal the first save exactly,
and the next two steps' losses equal those of the run that never stopped. 13 classes never
split evenly over 2 or 3 ranks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from workers.head import (
    SampledSoftmaxHead,
    export_head_weights,
    load_head_checkpoint,
    merge_head_checkpoint,
    partition_n_into_range,
    read_head_manifest,
    save_head_checkpoint,
)
from workers.head import _checkpoint as checkpoint_module
from workers.losses import build_loss

DIM, NUM_CLASSES, SEED, BATCH = 5, 13, 7, 12
#: steps before the first save, then steps compared after every resume
TRAIN_STEPS, NEXT_STEPS = 3, 2
CHAIN = [(2, None, "ckpt2"), (3, "ckpt2", "ckpt3"), (1, "ckpt3", "ckpt1"), (2, "ckpt1", "back2")]


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: str
    unsampled_rows: str = "dense"
    sampling: str = "uniform"


CASES = [Case("sgd", "sgd"), Case("adamw", "adamw"),
         Case("sgd-frozen", "sgd", "frozen", "batch"),
         Case("adamw-sparse", "adamw", "sparse", "batch")]


def _build(case: Case, group: dist.ProcessGroup | None,
           num_classes: int = NUM_CLASSES, dim: int = DIM,
           dtype: torch.dtype = torch.float64) -> tuple[SampledSoftmaxHead, torch.optim.Optimizer]:
    head = SampledSoftmaxHead(dim, num_classes, build_loss("arcface", scale=8.0),
                              sampling=case.sampling, process_group=group, chunk_size=4,
                              seed=SEED, unsampled_rows=case.unsampled_rows, dtype=dtype)
    if case.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            head.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=1e-2)
    head.attach_optimizer(optimizer)
    return head, optimizer


def _step(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One optimizer step on global batch ``step`` (this rank's even slice of it)."""
    generator = torch.Generator().manual_seed(1000 + step)
    embeddings = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
    start, stop = partition_n_into_range(BATCH, head.shard.world_size)[head.shard.rank]
    optimizer.zero_grad(set_to_none=True)
    loss = head(embeddings[start:stop], labels[start:stop])
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _snapshot(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state.get(head.weight, {})
    return {"shard": (head.shard.start, head.shard.stop), "weight": head.weight.detach().clone(),
            "state": {key: value.clone() if torch.is_tensor(value) else value
                      for key, value in state.items()},
            "step_count": head.step_count}


def _chain_stage(rank: int, world_size: int, out: Path, source: str | None,
                 target: str) -> None:
    group = dist.new_group(list(range(world_size)))
    records = {}
    for case in CASES:
        head, optimizer = _build(case, group)
        if source is None:
            for step in range(TRAIN_STEPS):
                _step(head, optimizer, step)
        else:
            load_head_checkpoint(head, optimizer, out / case.name / source)
        snapshot = _snapshot(head, optimizer)
        save_head_checkpoint(head, optimizer, out / case.name / target)
        losses = [_step(head, optimizer, TRAIN_STEPS + i) for i in range(NEXT_STEPS)]
        records[case.name] = {**snapshot, "losses": losses}
    torch.save(records, out / f"{target}-rank{rank}.pt")


@pytest.fixture(scope="module")
def chain(gloo_runner: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every stage's per-rank records, by stage name, and the output folder."""
    out = tmp_path_factory.mktemp("chain")
    stages = {}
    for world_size, source, target in CHAIN:
        gloo_runner(_chain_stage, world_size, out, source, target)
        stages[target] = [torch.load(out / f"{target}-rank{rank}.pt")
                          for rank in range(world_size)]
    return {"out": out, "stages": stages}


def _assembled(ranks: list[dict[str, Any]], case: str) -> dict[str, Any]:
    """The logical C × D tensors of one stage: rows concatenated in shard order."""
    records = [rank[case] for rank in ranks]
    assert [r["shard"] for r in records] == partition_n_into_range(NUM_CLASSES, len(records))
    rows = {"weight": torch.cat([r["weight"] for r in records])}
    for key, value in records[0]["state"].items():
        if torch.is_tensor(value) and value.dim() == 2:
            rows[key] = torch.cat([r["state"][key] for r in records])
        else:
            assert all(r["state"][key] == value for r in records), key
            rows[key] = value
    return {**rows, "step_count": records[0]["step_count"], "losses": records[0]["losses"]}


@pytest.mark.slow
@pytest.mark.parametrize("case", [case.name for case in CASES])
@pytest.mark.parametrize("stage", [target for _, source, target in CHAIN if source])
def test_resume_at_any_world_size_restores_exactly(chain: dict[str, Any], stage: str,
                                                   case: str) -> None:
    saved = _assembled(chain["stages"]["ckpt2"], case)
    restored = _assembled(chain["stages"][stage], case)
    assert set(restored) == set(saved)
    expected_state = {"momentum_buffer"} if case.startswith("sgd") else {"exp_avg", "exp_avg_sq",
                                                                         "step"}
    assert expected_state <= set(saved)
    for key, value in saved.items():
        if key == "losses":
            continue
        if torch.is_tensor(value):
            assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
        else:
            assert restored[key] == value, key
    assert saved["step_count"] == TRAIN_STEPS
    # the next steps' float64 losses: bit-equal at the saving world size; at another one the
    # log-sum-exp's all-reduce adds the shards in another grouping (last-bit differences)
    if len(chain["stages"][stage]) == 2:
        assert restored["losses"] == saved["losses"]
    else:
        torch.testing.assert_close(torch.tensor(restored["losses"]),
                                   torch.tensor(saved["losses"]), rtol=1e-13, atol=0)


@pytest.mark.slow
def test_manifest_records_the_writing_world_size(chain: dict[str, Any]) -> None:
    for world_size, _, target in CHAIN:
        directory = chain["out"] / "adamw" / target
        manifest = read_head_manifest(directory, NUM_CLASSES, DIM)
        assert manifest.world_size == world_size and manifest.dtype == "float64"
        assert [(s.start, s.stop) for s in manifest.shards] == \
            partition_n_into_range(NUM_CLASSES, world_size)
        assert manifest.row_state == ["exp_avg", "exp_avg_sq"]
        assert manifest.scalar_state == ["step"]
        assert sorted(path.name for path in directory.iterdir()) == sorted(
            [*(s.file for s in manifest.shards), "manifest.json", "shared.pt"])


# --- memory: no rank holds more than its shard plus one block --------------------------------

MEMORY_CLASSES, MEMORY_DIM = 400_000, 64
MEMORY_BUFFER = 2 << 20


def _memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth(action: Any) -> int:
    """Bytes by which the peak RSS of ``action()`` exceeds the RSS before it."""
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) := the current RSS
    before = _memory_kib("VmRSS")
    action()
    return (_memory_kib("VmHWM") - before) * 1024


def _memory_stage(rank: int, world_size: int, out: Path, phase: str) -> None:
    checkpoint_module.BUFFER_BYTES = MEMORY_BUFFER
    group = dist.new_group(list(range(world_size)))
    head, optimizer = _build(Case("sgd", "sgd"), group, MEMORY_CLASSES, MEMORY_DIM, torch.float32)
    if phase == "save":
        with torch.no_grad():
            optimizer.state[head.weight]["momentum_buffer"] = torch.ones_like(head.weight)
        growth = _peak_growth(lambda: save_head_checkpoint(head, optimizer, out / "big"))
    else:
        growth = _peak_growth(lambda: load_head_checkpoint(head, optimizer, out / "big"))
        assert torch.equal(optimizer.state[head.weight]["momentum_buffer"],
                           torch.ones_like(head.weight))
    shard = head.weight.numel() * head.weight.element_size()
    (out / f"{phase}-rank{rank}.json").write_text(json.dumps({"growth": growth, "shard": shard}))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_save_and_load_memory_is_one_shard_plus_a_block(gloo_runner: Any,
                                                        tmp_path: Path) -> None:
    """400k × 64 float32 = 102 MB: a full-matrix copy would show as ≥ 100 MB of growth."""
    full = MEMORY_CLASSES * MEMORY_DIM * 4
    slack = 12 << 20  # allocator and interpreter noise
    gloo_runner(_memory_stage, 2, tmp_path, "save")
    gloo_runner(_memory_stage, 3, tmp_path, "load")
    for phase, world_size in (("save", 2), ("load", 3)):
        for rank in range(world_size):
            record = json.loads((tmp_path / f"{phase}-rank{rank}.json").read_text())
            growth, shard = record["growth"], record["shard"]
            print(f"{phase} rank {rank}/{world_size}: peak growth {growth / 2**20:.1f} MiB, "
                  f"shard {shard / 2**20:.1f} MiB, full matrix {full / 2**20:.1f} MiB")
            # saving allocates nothing shard-sized; loading allocates the momentum rows it
            # restores into (the optimizer had not stepped) plus one mapped block
            allowed = MEMORY_BUFFER + slack + (shard if phase == "load" else 0)
            assert growth < allowed, (phase, rank, growth, shard)


# --- one process: round trip, export, merge, errors ------------------------------------------

class _StatefulLoss(nn.Module):
    """Stands in for a loss with buffers (CurricularFace's ``t``): only its state matters."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("t", torch.tensor(value))


def _saved(tmp_path: Path, case: Case = CASES[1]) -> tuple[SampledSoftmaxHead,
                                                           torch.optim.Optimizer, Path]:
    head, optimizer = _build(case, None)
    for step in range(2):
        _step(head, optimizer, step)
    save_head_checkpoint(head, optimizer, tmp_path / "head")
    return head, optimizer, tmp_path / "head"


def test_round_trip_into_an_optimizer_that_never_stepped(tmp_path: Path) -> None:
    head, optimizer, directory = _saved(tmp_path)
    fresh, fresh_optimizer = _build(CASES[1], None)
    assert not fresh_optimizer.state
    load_head_checkpoint(fresh, fresh_optimizer, directory)
    assert torch.equal(fresh.weight, head.weight) and fresh.step_count == head.step_count
    saved, restored = optimizer.state[head.weight], fresh_optimizer.state[fresh.weight]
    assert set(saved) == set(restored)
    for key, value in saved.items():
        assert torch.equal(restored[key], value) and restored[key].dtype == value.dtype, key
    assert _step(fresh, fresh_optimizer, 2) == _step(head, optimizer, 2)
    assert _step(fresh, fresh_optimizer, 3) == _step(head, optimizer, 3)


def test_loss_state_travels_with_the_head(tmp_path: Path) -> None:
    head, _ = _build(CASES[0], None)
    head.loss = _StatefulLoss(0.25)
    save_head_checkpoint(head, None, tmp_path)
    other, _ = _build(CASES[0], None)
    other.loss = _StatefulLoss(0.0)
    load_head_checkpoint(other, None, tmp_path)
    assert float(other.loss.t) == 0.25
    stateless, _ = _build(CASES[0], None)
    with pytest.raises(ValueError, match=r"manifest.json: loss_state = True, but the head's "
                                         r"loss ArcFace has no state$"):
        load_head_checkpoint(stateless, None, tmp_path)


def test_export_and_merge_hold_the_centres_only(tmp_path: Path) -> None:
    head, _, directory = _saved(tmp_path)
    exported = export_head_weights(directory, tmp_path / "centres")
    assert exported.row_state == [] and exported.scalar_state == []
    weights_only, optimizer = _build(CASES[1], None)
    load_head_checkpoint(weights_only, optimizer, tmp_path / "centres")
    assert torch.equal(weights_only.weight, head.weight) and not optimizer.state[head.weight]
    merge_head_checkpoint(tmp_path / "centres", tmp_path / "centres.pt")
    merged = torch.load(tmp_path / "centres.pt")
    assert merged.dtype == torch.float64 and torch.equal(merged, head.weight.detach())


def _rewrite_manifest(directory: Path, **changes: Any) -> None:
    path = directory / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])


SHARD = "rows-00000-of-00001.pt"
BAD_CHECKPOINTS = {
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(),
                         r"head/manifest.json: no head checkpoint manifest"),
    "manifest-not-json": (lambda d: (d / "manifest.json").write_text("{"),
                          r"head/manifest.json: manifest: Invalid JSON"),
    "version": (lambda d: _rewrite_manifest(d, version=2),
                r"head/manifest.json: version: Input should be 1 \(got 2\)"),
    "num-classes": (lambda d: _rewrite_manifest(d, num_classes=14),
                    r"head/manifest.json: num_classes = 14, but the head has num_classes = 13"),
    "embedding-dim": (lambda d: _rewrite_manifest(d, embedding_dim=4),
                      r"head/manifest.json: embedding_dim = 4, but the head has "
                      r"embedding_dim = 5"),
    "dtype": (lambda d: _rewrite_manifest(d, dtype="float99"),
              r"head/manifest.json: dtype = 'float99' is not a torch dtype"),
    "shards-gap": (lambda d: _rewrite_manifest(d, shards=[
        {"file": SHARD, "start": 1, "stop": 13}]),
                   r"head/manifest.json: shards\[0\] = 'rows-00000-of-00001.pt' \[1, 13\) does "
                   r"not continue the rows at 0"),
    "shard-outside": (lambda d: _rewrite_manifest(d, shards=[
        {"file": "../other.pt", "start": 0, "stop": 13}]),
                      r"head/manifest.json: shards\[0\].file = '../other.pt' is not a file name "
                      r"in this directory"),
    "shards-short": (lambda d: _rewrite_manifest(d, shards=[
        {"file": SHARD, "start": 0, "stop": 12}]),
                     r"head/manifest.json: shards cover rows \[0, 12\), not \[0, 13\)"),
    "shard-missing": (lambda d: (d / SHARD).unlink(),
                      rf"head/{SHARD}: missing \(listed by manifest.json\)"),
    "shard-truncated": (lambda d: _truncate(d / SHARD),
                        rf"head/{SHARD}: unreadable or truncated \("),
    "shared-missing": (lambda d: (d / "shared.pt").unlink(),
                       r"head/shared.pt: missing \(listed by manifest.json\)"),
    "row-state-unknown": (lambda d: _rewrite_manifest(d, row_state=["exp_avg", "velocity"]),
                          rf"head/{SHARD}: optimizer.velocity has shape None, manifest.json "
                          r"says \(13, 5\)"),
    "scalar-state-unknown": (lambda d: _rewrite_manifest(d, scalar_state=["step", "lr"]),
                             r"head/shared.pt: no optimizer.lr, but manifest.json lists it"),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_naming_file_and_field(tmp_path: Path, name: str) -> None:
    _, _, directory = _saved(tmp_path)
    corrupt, message = BAD_CHECKPOINTS[name]
    corrupt(directory)
    head, optimizer = _build(CASES[1], None)
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match=message) as error:
        load_head_checkpoint(head, optimizer, directory)
    assert "\n" not in str(error.value) and str(directory) in str(error.value)
    assert torch.equal(head.weight, before) and not optimizer.state  # nothing half-loaded


def test_optimizer_without_the_head_weight_and_unshardable_state(tmp_path: Path) -> None:
    head, _ = _build(CASES[0], None)
    stranger = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"^the optimizer does not hold this head's weight$"):
        save_head_checkpoint(head, stranger, tmp_path)
    head, optimizer = _build(CASES[0], None)
    optimizer.state[head.weight]["column_norms"] = torch.zeros(DIM)
    with pytest.raises(ValueError, match=r"^optimizer state 'column_norms' of shape \(5,\) is "
                                         r"neither per row"):
        save_head_checkpoint(head, optimizer, tmp_path)
