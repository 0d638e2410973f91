"""World-size-agnostic, sharded checkpoints of a ``SampledSoftmaxHead`` and its optimizer rows.

A checkpoint is a directory:

* ``rows-<rank>-of-<world>.pt`` (one per rank that saved, written by that rank):
  ``{"start", "stop", "weight": W[start:stop], "optimizer": {key: rows}}`` — the rank's rows of
  the weight and of every optimizer state tensor shaped like the weight (momentum, Adam's
  moments);
* ``shared.pt`` (rank 0): what every row shares — the optimizer's other state for the weight
  (e.g. Adam's ``step``), the loss state's ``state_dict()`` (the head's ``loss_state``, or
  the loss itself when it is an ``nn.Module``; identical on every rank) and the optimizer's
  state of the loss state's parameters (``loss_optimizer``, e.g. momentum of UniFace's b);
* ``manifest.json`` (rank 0, written once every rank has written its rows): format and
  version, ``num_classes``, ``embedding_dim``, ``subcenters`` (K: each row holds K·D values),
  ``dtype``, the ``world_size`` that wrote it, the head's ``step_count``, each file's row range
  and the state keys.

Loading at any world size: each rank reads the manifest, checks every file's header, then
copies only the rows it owns, ``[shard.start, shard.stop)``, from the files that overlap them.

Engine: per-rank ``torch.save`` files read back with ``torch.load(mmap=True, weights_only=True)``
rather than ``torch.distributed.checkpoint`` (DCP). DCP re-shards only tensors that carry
``DTensor``/``ShardedTensor`` placement metadata, and its even-chunk placements do not describe
the head's uneven contiguous row ranges without a custom ``ShardedTensor`` spec on every save
and load. Per-rank files plus a JSON manifest are simple and bounded: saving writes each tensor
straight from its storage (an accelerator tensor is staged on the host one tensor at a time);
loading maps a file, copies at most ``BUFFER_BYTES`` of rows and unmaps it again, so no rank
ever holds more than its own shard plus one block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ._partition import partition_n_into_range
from .head import SampledSoftmaxHead

FORMAT = "marginlab-head-checkpoint"
VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARED_FILE = "shared.pt"
#: at most this many bytes of rows are mapped at once while loading or merging
BUFFER_BYTES = 64 << 20

Count = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ShardFile(_Strict):
    """One saving rank's file and the rows ``[start, stop)`` it holds."""

    file: str
    start: Count
    stop: Count


class HeadManifest(_Strict):
    """The validated ``manifest.json`` of a head checkpoint."""

    format: Literal["marginlab-head-checkpoint"]
    version: Literal[1]
    num_classes: Annotated[int, Field(ge=1)]
    embedding_dim: Annotated[int, Field(ge=1)]
    dtype: str
    world_size: Annotated[int, Field(ge=1)]
    step_count: Count
    shards: list[ShardFile]
    row_state: list[str]
    scalar_state: list[str]
    loss_state: bool
    #: centre rows per class (sub-centres); a row of every file holds ``subcenters·D`` values
    subcenters: Annotated[int, Field(ge=1)] = 1

    @property
    def row_width(self) -> int:
        """Values per saved row: ``subcenters · embedding_dim``."""
        return self.subcenters * self.embedding_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        """The saved weight's dtype."""
        return getattr(torch, self.dtype)


def shard_file_name(rank: int, world_size: int) -> str:
    """The file rank ``rank`` of ``world_size`` writes its rows to."""
    return f"rows-{rank:05d}-of-{world_size:05d}.pt"


# --- save ------------------------------------------------------------------------------------

@torch.no_grad()
def save_head_checkpoint(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer | None,
                         directory: str | Path) -> None:
    """Write this rank's rows of the head and its optimizer state under ``directory``.

    Collective over the head's group: every rank writes ``rows-<rank>-of-<world>.pt``; rank 0
    also writes ``shared.pt`` and, after every rank has written, ``manifest.json``. Ranks may
    write to different local directories (Ray Train merges them into one checkpoint).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shard = head.shard
    rows, scalars = _split_optimizer_state(head, optimizer)
    torch.save({"start": shard.start, "stop": shard.stop, "weight": head.weight.detach(),
                "optimizer": rows}, directory / shard_file_name(shard.rank, shard.world_size))
    state_module = _loss_state_module(head)
    loss_state = None if state_module is None else state_module.state_dict()
    if shard.rank == 0:
        torch.save({"optimizer": scalars, "loss": loss_state,
                    "loss_optimizer": _loss_optimizer_state(state_module, optimizer)},
                   directory / SHARED_FILE)
    _barrier(head)
    if shard.rank == 0:
        manifest = HeadManifest(
            format=FORMAT, version=VERSION, num_classes=head.num_classes,
            embedding_dim=head.embedding_dim, dtype=str(head.weight.dtype).removeprefix("torch."),
            world_size=shard.world_size, step_count=head.step_count,
            shards=[ShardFile(file=shard_file_name(rank, shard.world_size), start=start, stop=stop)
                    for rank, (start, stop) in enumerate(
                        partition_n_into_range(head.num_classes, shard.world_size))],
            row_state=sorted(rows), scalar_state=sorted(scalars),
            loss_state=loss_state is not None, subcenters=head.subcenters)
        temporary = directory / f"{MANIFEST_FILE}.tmp"
        temporary.write_text(manifest.model_dump_json(indent=1))
        os.replace(temporary, directory / MANIFEST_FILE)
    _barrier(head)


def _split_optimizer_state(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer | None
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer state of the head's weight: (tensors shaped like it, everything else)."""
    if optimizer is None:
        return {}, {}
    _check_holds_weight(head, optimizer)
    rows, scalars = {}, {}
    for key, value in optimizer.state.get(head.weight, {}).items():
        if torch.is_tensor(value) and value.shape == head.weight.shape:
            rows[key] = value
        elif torch.is_tensor(value) and value.numel() > 1:
            raise ValueError(f"optimizer state {key!r} of shape {tuple(value.shape)} is neither "
                             f"per row (shaped like the weight) nor a scalar; cannot re-shard it")
        else:
            scalars[key] = value
    return rows, scalars


def _loss_state_module(head: SampledSoftmaxHead) -> nn.Module | None:
    """What holds the loss's state: the loss itself when it is a module, else ``loss_state``."""
    return head.loss if isinstance(head.loss, nn.Module) else head.loss_state


def _loss_optimizer_state(module: nn.Module | None, optimizer: torch.optim.Optimizer | None
                          ) -> dict[str, dict[str, Any]]:
    """The optimizer's state of each parameter of the loss state, by parameter name."""
    if module is None or optimizer is None:
        return {}
    return {name: dict(optimizer.state[parameter])
            for name, parameter in module.named_parameters() if parameter in optimizer.state}


def _barrier(head: SampledSoftmaxHead) -> None:
    if head.shard.world_size > 1:
        dist.barrier(group=head.shard.group)


def _check_holds_weight(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer) -> None:
    if not any(p is head.weight for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer does not hold this head's weight")


# --- read and validate -----------------------------------------------------------------------

def read_head_manifest(directory: str | Path, num_classes: int | None = None,
                       embedding_dim: int | None = None,
                       subcenters: int | None = None) -> HeadManifest:
    """The manifest of the checkpoint in ``directory``, checked with every file it lists.

    Raises a one-line ``ValueError`` naming the file and the field: manifest missing or
    invalid, ``num_classes``/``embedding_dim``/``subcenters`` other than the given ones, a
    shard file missing, truncated or holding other rows or keys than the manifest says.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no head checkpoint manifest (save_head_checkpoint writes one)")
    try:
        manifest = HeadManifest.model_validate_json(path.read_text())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        got = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
        raise ValueError(f"{path}: {where}: {first['msg']}{got}") from None
    for field, expected in (("num_classes", num_classes), ("embedding_dim", embedding_dim),
                            ("subcenters", subcenters)):
        if expected is not None and getattr(manifest, field) != expected:
            raise ValueError(f"{path}: {field} = {getattr(manifest, field)}, but the head has "
                             f"{field} = {expected}")
    if not isinstance(getattr(torch, manifest.dtype, None), torch.dtype):
        raise ValueError(f"{path}: dtype = {manifest.dtype!r} is not a torch dtype")
    stop = 0
    for index, shard in enumerate(manifest.shards):
        if Path(shard.file).name != shard.file:
            raise ValueError(f"{path}: shards[{index}].file = {shard.file!r} is not a file name "
                             f"in this directory")
        if shard.start != stop or shard.stop < shard.start:
            raise ValueError(f"{path}: shards[{index}] = {shard.file!r} [{shard.start}, "
                             f"{shard.stop}) does not continue the rows at {stop}")
        stop = shard.stop
    if stop != manifest.num_classes:
        raise ValueError(f"{path}: shards cover rows [0, {stop}), not [0, {manifest.num_classes})")
    for shard in manifest.shards:
        _check_shard(Path(directory), manifest, shard)
    shared = _load(Path(directory) / SHARED_FILE)
    missing = sorted(set(manifest.scalar_state) - set(shared.get("optimizer") or {}))
    if missing or (manifest.loss_state and shared.get("loss") is None):
        field = f"optimizer.{missing[0]}" if missing else "loss"
        raise ValueError(f"{Path(directory) / SHARED_FILE}: no {field}, but {MANIFEST_FILE} "
                         f"lists it")
    return manifest


def _load(path: Path) -> dict[str, Any]:
    """``torch.load(path, mmap=True, weights_only=True)``; a missing or unreadable file is a
    one-line ``ValueError``. Tensors are views of the mapped file until released."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (listed by {MANIFEST_FILE})")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, pickle/zip errors, EOFError, ...
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: unreadable or truncated ({message})") from None


def _check_shard(directory: Path, manifest: HeadManifest, shard: ShardFile) -> None:
    """The file's rows and tensor shapes are what the manifest says (headers only)."""
    path = directory / shard.file
    content = _load(path)
    rows = (shard.stop - shard.start, manifest.row_width)
    if (content.get("start"), content.get("stop")) != (shard.start, shard.stop):
        raise ValueError(f"{path}: rows [{content.get('start')}, {content.get('stop')}), but "
                         f"{MANIFEST_FILE} lists [{shard.start}, {shard.stop})")
    tensors = {"weight": content.get("weight"), **{
        f"optimizer.{key}": content.get("optimizer", {}).get(key) for key in manifest.row_state}}
    for key, tensor in tensors.items():
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != rows:
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else None
            raise ValueError(f"{path}: {key} has shape {shape}, {MANIFEST_FILE} says {rows}")


def _copy_rows(directory: Path, manifest: HeadManifest, key: str | None,
               destination: torch.Tensor, start: int) -> None:
    """Fill ``destination`` with rows ``[start, start + len(destination))`` of the weight
    (``key=None``) or of optimizer state ``key``, at most ``BUFFER_BYTES`` mapped at a time."""
    stop = start + len(destination)
    row_bytes = max(1, manifest.row_width * manifest.torch_dtype.itemsize)
    block = max(1, BUFFER_BYTES // row_bytes)
    for shard in manifest.shards:
        for first in range(max(start, shard.start), min(stop, shard.stop), block):
            last = min(first + block, stop, shard.stop)
            content = _load(directory / shard.file)
            source = content["weight"] if key is None else content["optimizer"][key]
            destination[first - start : last - start].copy_(
                source[first - shard.start : last - shard.start])
            del content, source  # unmaps the file before the next block


# --- load ------------------------------------------------------------------------------------

@torch.no_grad()
def load_head_checkpoint(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer | None,
                         directory: str | Path) -> HeadManifest:
    """Restore this rank's rows of the weight and of the optimizer state, the optimizer's
    scalar state, the loss state and ``step_count``, from a checkpoint of any world size.

    Every rank reads only the rows it owns (and every file's header, so that every rank
    raises the same error for a bad checkpoint, before anything is changed). The optimizer
    may not have stepped yet: its state for the weight is replaced by the saved one (tensors
    cast to the weight's dtype and device as ``Optimizer.load_state_dict`` does);
    ``optimizer=None`` restores the head only. Returns the manifest.
    """
    directory = Path(directory)
    manifest = read_head_manifest(directory, head.num_classes, head.embedding_dim,
                                  head.subcenters)
    state_module = _loss_state_module(head)
    stateful = state_module is not None
    if manifest.loss_state != stateful:
        raise ValueError(f"{directory / MANIFEST_FILE}: loss_state = {manifest.loss_state}, but "
                         f"the head's loss {type(head.loss).__name__} "
                         f"{'has' if stateful else 'has no'} state")
    if optimizer is not None:
        _check_holds_weight(head, optimizer)
    start = head.shard.start
    _copy_rows(directory, manifest, None, head.weight, start)
    shared = _load(directory / SHARED_FILE)
    if optimizer is not None:
        current = optimizer.state.get(head.weight, {})
        state: dict[str, Any] = {}
        for key in manifest.row_state:
            reusable = current.get(key)
            if not (torch.is_tensor(reusable) and reusable.shape == head.weight.shape
                    and reusable.dtype == head.weight.dtype
                    and reusable.device == head.weight.device):
                reusable = torch.empty_like(head.weight, requires_grad=False)
            _copy_rows(directory, manifest, key, reusable, start)
            state[key] = reusable
        for key in manifest.scalar_state:
            state[key] = _placed(optimizer, head.weight, key, shared["optimizer"][key])
        optimizer.state[head.weight] = state
    if state_module is not None:
        state_module.load_state_dict(shared["loss"])
        saved = shared.get("loss_optimizer") or {}
        if optimizer is not None:
            for name, parameter in state_module.named_parameters():
                if name in saved and _holds(optimizer, parameter):
                    optimizer.state[parameter] = {
                        key: _placed(optimizer, parameter, key, value)
                        for key, value in saved[name].items()}
    head.step_count = manifest.step_count
    return manifest


def _holds(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> bool:
    return any(p is parameter for group in optimizer.param_groups for p in group["params"])


def _placed(optimizer: torch.optim.Optimizer, weight: torch.Tensor, key: str, value: Any) -> Any:
    """A copy of ``value`` where ``Optimizer.load_state_dict`` would put it: ``step`` stays on
    the host unless the group is fused or capturable; other tensors follow the weight."""
    if not torch.is_tensor(value):
        return value
    group = next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))
    if key == "step":
        on_device = group.get("fused") or group.get("capturable")
        return (value.to(dtype=torch.float32, device=weight.device) if on_device
                else value).clone()
    dtype = weight.dtype if weight.is_floating_point() else value.dtype
    return value.to(dtype=dtype, device=weight.device).clone()


# --- export and merge ------------------------------------------------------------------------

@torch.no_grad()
def export_head_weights(source: str | Path, destination: str | Path) -> HeadManifest:
    """Copy a head checkpoint without its optimizer state (the class centres only), shard by
    shard; ``load_head_checkpoint(head, None, destination)`` and ``merge_head_checkpoint`` read
    it. Holds at most one shard's weight at a time."""
    source, destination = Path(source), Path(destination)
    manifest = read_head_manifest(source)
    destination.mkdir(parents=True, exist_ok=True)
    for shard in manifest.shards:
        content = _load(source / shard.file)
        torch.save({"start": shard.start, "stop": shard.stop, "weight": content["weight"],
                    "optimizer": {}}, destination / shard.file)
        del content
    shared = _load(source / SHARED_FILE)
    torch.save({"optimizer": {}, "loss": shared.get("loss")}, destination / SHARED_FILE)
    exported = manifest.model_copy(update={"row_state": [], "scalar_state": []})
    (destination / MANIFEST_FILE).write_text(exported.model_dump_json(indent=1))
    return exported


@torch.no_grad()
def merge_head_checkpoint(directory: str | Path, out_file: str | Path) -> torch.Size:
    """Write the full ``num_classes × embedding_dim`` centre matrix of a head checkpoint to one
    ``torch.save`` file (``torch.load(out_file)`` is the tensor; with K sub-centres it is
    ``num_classes × K·embedding_dim``, class c's K rows side by side). Holds the output plus
    one block of rows. Returns the matrix's shape."""
    directory = Path(directory)
    manifest = read_head_manifest(directory)
    weight = torch.empty(manifest.num_classes, manifest.row_width, dtype=manifest.torch_dtype)
    _copy_rows(directory, manifest, None, weight, 0)
    out_file = Path(out_file)
    temporary = out_file.with_name(f"{out_file.name}.tmp")
    torch.save(weight, temporary)
    os.replace(temporary, out_file)
    return weight.shape

