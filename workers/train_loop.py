"""One trial inside Ray Train: ``train_loop_per_worker(config)`` for ``TorchTrainer``.

Shape: ``setup`` (data shard, backbone under DDP, the shared head on the Train process group,
optimizer, schedule, resume) → per epoch ``train_epoch`` → ``evaluate`` → ``report`` (metrics +
checkpoint). Every worker runs the same code; only rank 0's metrics reach Tune, so per-rank
figures (peak memory) are reduced before reporting.

Checkpoint directory (``save_checkpoint``): ``head/`` — every rank's rows of the class centres
and of their optimizer state, with a manifest (``workers.head.save_head_checkpoint``; any
worker count resumes from it, each rank reading only its rows); rank 0 also writes
``state.pt`` (backbone, the rest of the optimizer, scheduler, scaler, step/epoch/restarts),
``trial.yaml`` and ``metrics.json``.

Gradient accumulation: ``optim.grad_accumulation`` micro-batches per optimizer step, each loss
scaled by 1/accumulation, DDP gradient sync only on the last one. Each micro-batch samples its
own negatives (the head is seeded per (seed, micro-step, rank)); the "frozen" unsampled-row
policy then spares every row no micro-batch of the step sampled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from workers.accounting import (
    data_parallel_bytes_per_step,
    head_bytes_per_step,
    head_flops_per_sample,
)
from workers.backbones import build_backbone
from workers.config import TrialConfig
from workers.data import (
    DatasetSplit,
    EpochBatches,
    batch_loader,
    epoch_batches,
    load_dataset,
    loader_workers,
    parse_data_config,
    shard_batches,
    shard_steps,
    to_device,
)
from workers.evaluation import class_centre_statistics, evaluate_open_set, heldout_subset
from workers.head import (
    SampledSoftmaxHead,
    load_head_checkpoint,
    read_head_manifest,
    save_head_checkpoint,
)
from workers.seeding import derive_seed

#: rank 0's part of a checkpoint: everything but the head's rows and their optimizer state
CHECKPOINT_FILE = "state.pt"
#: the sharded head checkpoint inside a checkpoint directory
HEAD_DIR = "head"
CONFIG_FILE = "trial.yaml"
DIVERGED_FILE = "diverged.json"
METRICS_FILE = "metrics.json"


@dataclass
class Runtime:
    """Everything a worker holds between epochs."""

    config: TrialConfig
    rank: int
    world_size: int
    device: torch.device
    data: DatasetSplit
    model: nn.Module
    head: SampledSoftmaxHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    backbone_parameters: int
    step: int = 0
    epoch: int = 0
    #: times Ray Train restarted this run from a checkpoint (a worker died, the run resumed)
    restarts: int = 0
    last_metrics: dict[str, float] | None = None
    #: Unix time this worker's loop began, and the seconds ``setup`` took (data, model,
    #: restore): reported with every epoch so a study can tell start-up from training
    started_at: float = 0.0
    setup_seconds: float = 0.0
    #: the split came from the study (loaded once for all trials), not from this worker
    dataset_shared: bool = False

    @property
    def backbone(self) -> nn.Module:
        """The backbone without its DDP wrapper."""
        return getattr(self.model, "module", self.model)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config = {"trial": <TrialConfig dict>, "resume_from": path?}``."""

    started_at = time.time()
    runtime = setup(config)
    runtime.started_at, runtime.setup_seconds = started_at, time.time() - started_at
    if runtime.epoch >= runtime.config.epochs and runtime.last_metrics:
        # resumed after the last epoch had been checkpointed: report its result again, so a
        # restarted trial still ends with its final metrics
        report(runtime, {**runtime.last_metrics, "restarts": float(runtime.restarts)})
        return
    for epoch in range(runtime.epoch, runtime.config.epochs):
        metrics = train_epoch(runtime, epoch)
        if metrics["diverged"]:
            _report_divergence(runtime, metrics)
            return
        runtime.epoch = epoch + 1
        metrics.update(evaluate(runtime))
        report(runtime, metrics)


def setup(config: dict[str, Any]) -> Runtime:
    """Build the runtime on the Train context; resume from Train's or the given checkpoint.
    ``config["dataset"]``, when set, is an object ref to the split the study loaded once."""
    import ray
    import ray.train
    import ray.train.torch

    trial = TrialConfig.model_validate(config["trial"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    group = dist.group.WORLD if dist.is_initialized() and world_size > 1 else None
    shared = config.get("dataset")
    runtime = build_runtime(trial, rank, world_size, ray.train.torch.get_device(), group,
                            data=None if shared is None else ray.get(shared))
    runtime.dataset_shared = shared is not None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_checkpoint(runtime, Path(directory))
        runtime.restarts += 1
    elif config.get("resume_from"):
        load_checkpoint(runtime, Path(config["resume_from"]))
    return runtime


def build_runtime(trial: TrialConfig, rank: int, world_size: int, device: torch.device,
                  group: dist.ProcessGroup | None, data: DatasetSplit | None = None) -> Runtime:
    """Data (``data``: the split of ``trial.data`` already loaded, else loaded here), backbone
    (DDP when distributed), head on ``group``, optimizer and schedule."""
    torch.manual_seed(trial.seed)
    if data is None:
        data = load_dataset(parse_data_config(trial.data))
    evaluation = trial.evaluation
    # the capped, seeded held-out sample is chosen once per run (identical on every rank)
    data = dataclasses.replace(data, heldout=heldout_subset(
        data.heldout, evaluation.max_identities, evaluation.images_per_identity, trial.seed))
    backbone = build_backbone(trial.model.backbone, trial.model.embedding_dim, data.input_shape,
                              dropout=trial.model.dropout, width=trial.model.width).to(device)
    model: nn.Module = backbone
    if group is not None:
        model = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None)
    head = SampledSoftmaxHead(
        trial.model.embedding_dim, data.num_classes, trial.loss.build(),
        sample_ratio=trial.head.sample_ratio, sampling=trial.head.sampling,
        process_group=group, chunk_size=trial.head.chunk_size, seed=trial.seed,
        unsampled_rows=trial.head.unsampled_rows, filter_threshold=trial.head.filter_threshold,
        logit_budget_mb=trial.head.logit_budget_mb,
    ).to(device)
    optimizer = _build_optimizer(trial, backbone, head)
    head.attach_optimizer(optimizer)
    if data.shards is not None:  # Ray Data's equal splits of the packed train shards
        steps_per_epoch = shard_steps(data.shards.manifest.train.rows, world_size,
                                      trial.batch_size)
    else:
        steps_per_epoch = len(epoch_batches(len(data.train), trial.batch_size, rank,
                                            world_size, 0, trial.seed))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(trial, steps_per_epoch * trial.epochs, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=trial.resources.precision == "fp16")
    return Runtime(trial, rank, world_size, device, data, model, head, optimizer, scheduler,
                   scaler, steps_per_epoch, sum(p.numel() for p in backbone.parameters()))


def _build_optimizer(trial: TrialConfig, backbone: nn.Module,
                     head: SampledSoftmaxHead) -> torch.optim.Optimizer:
    """Two parameter groups: backbone (lr) and head (head_lr, default lr)."""
    optim = trial.optim
    groups = [
        {"params": list(backbone.parameters()), "lr": optim.lr, "name": "backbone"},
        {"params": list(head.parameters()), "lr": optim.head_lr or optim.lr, "name": "head"},
    ]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def _schedule(trial: TrialConfig, total_steps: int, steps_per_epoch: int) -> Any:
    """Learning-rate factor per optimizer step: linear warm-up, then cosine or polynomial decay.

    factor(t) = (t + 1)/T_w for t < T_w; then with p = (t − T_w)/(T − T_w):
    cosine ½(1 + cos πp), polynomial (1 − p)^power.
    """
    warmup = min(round(trial.optim.warmup_epochs * steps_per_epoch), total_steps - 1)
    schedule, power = trial.optim.schedule, trial.optim.poly_power

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (1.0 - progress) ** power

    return factor


class HeadClock:
    """Seconds this rank spends in the head per epoch: from the embeddings entering the head
    to their gradient leaving it (forward, the head's backward and its collectives, which
    autograd runs before the backbone's backward). CUDA: events, read once per epoch;
    elsewhere the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: list[list[Any]] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def watch(self, embeddings: torch.Tensor) -> None:
        """Start a span now; it ends when autograd has the gradient of ``embeddings``."""
        span = [self._now(), None]
        self.spans.append(span)

        def stop(_: torch.Tensor) -> None:
            span[1] = self._now()

        embeddings.register_hook(stop)

    def seconds(self) -> float:
        """Total seconds of the finished spans."""
        done = [(start, end) for start, end in self.spans if end is not None]
        if self.cuda and done:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in done) / 1e3
        return sum(end - start for start, end in done)


def _autocast(runtime: Runtime) -> contextlib.AbstractContextManager[Any]:
    precision = runtime.config.resources.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(runtime.device.type, dtype=dtype)


def train_epoch(runtime: Runtime, epoch: int) -> dict[str, float]:
    """One pass over this worker's shard of the epoch; stops at the first non-finite loss."""
    trial, head = runtime.config, runtime.head
    runtime.model.train()
    head.train()
    loader = epoch_source(runtime, epoch)
    accumulation = trial.optim.grad_accumulation
    # per epoch, on the device: Σ loss·n, Σ P, Σ LSE(N), samples, sampled classes, Σ ‖g‖;
    # on the host: seconds spent waiting for the next batch
    sums = torch.zeros(6, dtype=torch.float64, device=runtime.device)
    data_wait = 0.0
    head_clock = HeadClock(runtime.device)
    started = time.perf_counter()
    for _ in range(runtime.steps_per_epoch):
        waiting = time.perf_counter()
        batch = next(loader)
        data_wait += time.perf_counter() - waiting
        images, labels = to_device(batch, runtime.device)
        runtime.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        micro_batches = zip(images.chunk(accumulation), labels.chunk(accumulation), strict=True)
        for micro, (micro_images, micro_labels) in enumerate(micro_batches):
            sync = micro == accumulation - 1 or not hasattr(runtime.model, "no_sync")
            with (contextlib.nullcontext() if sync else runtime.model.no_sync()), \
                    _autocast(runtime):
                embeddings = runtime.model(micro_images)
                head_clock.watch(embeddings)
                # the head's products follow the autocast dtype; its LSE and loss stay float32
                loss = head(embeddings, micro_labels, step=runtime.step * accumulation + micro)
            runtime.scaler.scale(loss / accumulation).backward()
            step_loss += float(loss.detach()) / accumulation  # one host sync per micro-batch
            sums[0] += loss.detach().double() * len(micro_labels)
            sums[1:3] += head.last_statistics[:2]
            sums[3] += len(micro_labels)
            sums[4] += head.last_statistics[2]
        runtime.scaler.unscale_(runtime.optimizer)
        grad_norm = _clip_gradients(runtime, trial.optim.grad_clip_norm)
        # fp16: non-finite gradients are the GradScaler's business (it skips the step)
        finite_gradients = math.isfinite(grad_norm) or runtime.scaler.is_enabled()
        if not (math.isfinite(step_loss) and finite_gradients):
            return {"diverged": 1.0, "diverged_step": float(runtime.step), "epoch": float(epoch),
                    "loss": step_loss if math.isfinite(step_loss) else float("inf")}
        sums[5] += grad_norm
        runtime.scaler.step(runtime.optimizer)
        runtime.scaler.update()
        runtime.scheduler.step()
        runtime.step += 1
    elapsed = time.perf_counter() - started
    return _epoch_metrics(runtime, epoch, sums, runtime.steps_per_epoch, elapsed, data_wait,
                          head_clock.seconds())


def epoch_source(runtime: Runtime, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``runtime.steps_per_epoch`` raw ``(inputs, labels)`` batches of ``epoch``:
    its Ray Data split of the packed train shards (source ``shards``), else ``EpochBatches``
    decoded by ``batch_loader`` (loader processes or this one)."""
    trial = runtime.config
    if runtime.data.shards is not None:
        import ray.train

        return shard_batches(ray.train.get_dataset_shard("train"), runtime.data.shards,
                             trial.batch_size, runtime.steps_per_epoch, trial.seed, epoch,
                             runtime.rank, runtime.device)
    batches = EpochBatches(runtime.data.train, trial.batch_size, runtime.rank,
                           runtime.world_size, epoch, trial.seed)
    workers = loader_workers(trial.data.get("loader_workers"), trial.resources.cpus_per_worker)
    return iter(batch_loader(batches, workers, runtime.device))


def _clip_gradients(runtime: Runtime, max_norm: float | None) -> float:
    """Clip the global gradient norm over the backbone and every shard of the head.

    ‖g‖² = ‖g_backbone‖² (already identical on every rank after DDP) + Σ_ranks ‖g_shard‖²:
    float32 norms per tensor (torch's foreach norm, no copy of any gradient), squared in one
    float64 scalar, one all-reduce of it. A sparse head gradient is coalesced in place and
    its values count. Returns ‖g‖ before clipping (inf/nan when diverging).
    """
    # the loss state's parameters are replicated like the backbone's: counted once
    replicated = [*runtime.model.parameters(), *runtime.head.replicated_parameters()]
    backbone = [p.grad for p in replicated if p.grad is not None]
    shard = []
    for parameter in [runtime.head.weight]:
        if parameter.grad is not None and parameter.grad.is_sparse:
            parameter.grad = parameter.grad.coalesce()
        if parameter.grad is not None:
            shard.append(parameter.grad)
    shard_values = [g.values() if g.is_sparse else g for g in shard]
    shard_square = torch.nn.utils.get_total_norm(shard_values).to(runtime.device).double().square()
    if runtime.world_size > 1:
        dist.all_reduce(shard_square)
    backbone_norm = torch.nn.utils.get_total_norm(backbone).double()
    total = float((backbone_norm.square() + shard_square.to(backbone_norm.device)).sqrt())
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        for gradient in backbone + shard_values:
            gradient.mul_(max_norm / (total + 1e-6))
    return total


def _epoch_metrics(runtime: Runtime, epoch: int, sums: torch.Tensor, steps: int,
                   elapsed: float, data_wait: float, head_seconds: float) -> dict[str, float]:
    """Reduce per-rank sums once per epoch and add the analytic compute and communication.

    ``data_wait_fraction``: the share of the epoch's step time the training loop spent blocked
    on its next batch, averaged over the ranks. ``head_seconds_per_step`` (``HeadClock``) and
    ``head_time_fraction`` (its share of the step time): measured, averaged over the ranks.
    """
    trial = runtime.config
    totals = torch.cat([sums, sums.new_tensor([data_wait / max(elapsed, 1e-9), head_seconds])])
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    totals = totals.cpu()
    samples = float(totals[3])
    micro_steps = steps * trial.optim.grad_accumulation
    sampled_classes = float(totals[4]) / max(1, micro_steps)  # summed over the shards
    global_micro_batch = samples / max(1, micro_steps)
    element_bytes = 2 if trial.resources.precision != "fp32" else 4
    return {
        "diverged": 0.0,
        "epoch": float(epoch),
        "step": float(runtime.step),
        "restarts": float(runtime.restarts),
        "loss": float(totals[0]) / samples,
        "intra_positive_logit": float(totals[1]) / samples,
        "inter_negative_lse": float(totals[2]) / samples,
        "sampled_classes": sampled_classes,
        "head_flops_per_sample": head_flops_per_sample(  # K sub-centres: K·D per class
            trial.model.embedding_dim * runtime.head.subcenters, sampled_classes),
        "head_bytes_per_step": head_bytes_per_step(
            runtime.world_size, round(global_micro_batch), trial.model.embedding_dim,
            element_bytes) * trial.optim.grad_accumulation,
        "ddp_bytes_per_step": data_parallel_bytes_per_step(runtime.world_size,
                                                           runtime.backbone_parameters),
        "samples_per_second": samples / max(elapsed, 1e-9),
        "data_wait_fraction": float(totals[6]) / runtime.world_size,
        "head_seconds_per_step": float(totals[7]) / runtime.world_size / max(1, steps),
        "head_time_fraction": float(totals[7]) / runtime.world_size / max(elapsed, 1e-9),
        "epoch_train_seconds": elapsed,
        "grad_norm": float(totals[5]) / runtime.world_size / max(1, steps),
        "lr": float(runtime.optimizer.param_groups[0]["lr"]),
        # the loss's state (CurricularFace t, AdaFace mu/sigma, UniFace bias): same on every rank
        **{f"loss_state_{k}": v for k, v in runtime.head.loss_state_values().items()},
    }


def evaluate(runtime: Runtime) -> dict[str, float]:
    """Open-set verification (held-out identities, pair files) and class-centre statistics,
    split over the ranks: each embeds a slice of the images and the centre statistics use
    this rank's head shard (``workers.evaluation``). Collective; every rank gets the same."""
    started = time.perf_counter()
    trial, shard = runtime.config, runtime.head.shard
    metrics: dict[str, float] = {"peak_memory_bytes": _peak_memory(runtime)}
    if shard.world_size > 1:
        # DDP leaves each rank's BatchNorm statistics updated by its own last batch: every rank
        # evaluates rank 0's backbone (DDP broadcasts them before the next forward anyway)
        for buffer in runtime.backbone.buffers():
            dist.broadcast(buffer, src=0, group=shard.group)
    evaluation = trial.evaluation
    metrics.update(evaluate_open_set(
        runtime.backbone, runtime.data.heldout, runtime.data.pairs, shard,
        num_pairs=evaluation.num_pairs, batch_size=evaluation.batch_size,
        device=runtime.device, flip=evaluation.flip, seed=trial.seed))
    centres = class_centre_statistics(runtime.head.class_centres(),
                                      seed=derive_seed("centre-pairs", trial.seed), shard=shard)
    metrics.update({f"centre_{k}": v for k, v in centres.items()})
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics


def _peak_memory(runtime: Runtime) -> float:
    """Peak memory of this process (CUDA max allocated, else peak RSS), max over ranks."""
    if runtime.device.type == "cuda":
        value = float(torch.cuda.max_memory_allocated(runtime.device))
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        value = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
    if runtime.world_size > 1:
        tensor = torch.tensor([value], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        value = float(tensor)
    return value


def report(runtime: Runtime, metrics: dict[str, float]) -> None:
    """``ray.train.report`` the epoch's metrics with a checkpoint every rank writes part of,
    plus where the worker's time went outside the epoch: ``worker_started_at`` (Unix time),
    ``setup_seconds``, ``dataset_shared`` (1: the study's split, not loaded here),
    ``checkpoint_seconds`` (writing this checkpoint) and ``reported_at`` (Unix time of this
    report).

    Verified in Ray 2.60 (``ray/train/v2/_internal/execution/context.py`` ``report`` and
    ``storage.py`` ``persist_current_checkpoint``; documented in ``ray.train.report``): the
    checkpoint directory name is broadcast from rank 0, and every rank that reports a
    checkpoint copies its local files into that one storage directory. The file names
    therefore differ per rank (``head/rows-<rank>-of-<world>.pt``; only rank 0 writes the rest).
    """
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        writing = time.perf_counter()
        save_checkpoint(runtime, Path(directory), metrics)
        timings = {"worker_started_at": runtime.started_at,
                   "setup_seconds": runtime.setup_seconds,
                   "dataset_shared": float(runtime.dataset_shared),
                   "checkpoint_seconds": time.perf_counter() - writing,
                   "reported_at": time.time()}
        ray.train.report({**metrics, **timings},
                         checkpoint=ray.train.Checkpoint.from_directory(directory))


def _report_divergence(runtime: Runtime, metrics: dict[str, float]) -> None:
    """Report the diverged step with a marker checkpoint (``diverged.json``, no weights).

    Ray Train V2 exposes a run's final metrics only with a checkpoint, so the marker makes
    ``Result.metrics`` carry ``diverged = 1``; there is nothing to resume from it.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if runtime.rank == 0:
            Path(directory, DIVERGED_FILE).write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def save_checkpoint(runtime: Runtime, directory: Path,
                    metrics: dict[str, float] | None = None) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (collective).

    Every rank writes its head rows under ``head/``; rank 0 also writes ``state.pt``
    (``checkpoint_state``), ``trial.yaml`` and, when given, ``metrics.json``.
    """
    save_head_checkpoint(runtime.head, runtime.optimizer, directory / HEAD_DIR)
    if runtime.rank == 0:
        torch.save(checkpoint_state(runtime), directory / CHECKPOINT_FILE)
        (directory / CONFIG_FILE).write_text(runtime.config.to_yaml())
        if metrics is not None:
            (directory / METRICS_FILE).write_text(json.dumps(metrics))


def checkpoint_state(runtime: Runtime) -> dict[str, Any]:
    """Everything but the head's rows: backbone, the optimizer's state dict without the head
    weight's state (``head/`` holds it, sharded), scheduler, scaler, step, epoch, restarts."""
    optimizer_state = runtime.optimizer.state_dict()
    optimizer_state["state"].pop(_parameter_index(runtime.optimizer, runtime.head.weight), None)
    return {
        "backbone": runtime.backbone.state_dict(),
        "optimizer": optimizer_state,
        "scheduler": runtime.scheduler.state_dict(),
        "scaler": runtime.scaler.state_dict(),
        "step": runtime.step,
        "epoch": runtime.epoch,
        "restarts": runtime.restarts,
        "world_size": runtime.world_size,
    }


def load_checkpoint(runtime: Runtime, directory: Path) -> None:
    """Restore a checkpoint written with any number of workers; each rank reads only its own
    rows of the class centres and of their optimizer state."""
    state = torch.load(directory / CHECKPOINT_FILE, map_location=runtime.device,
                       weights_only=False)
    runtime.backbone.load_state_dict(state["backbone"])
    # first the optimizer (it replaces every parameter's state), then the head's rows
    runtime.optimizer.load_state_dict(state["optimizer"])
    load_head_checkpoint(runtime.head, runtime.optimizer, directory / HEAD_DIR)
    runtime.scheduler.load_state_dict(state["scheduler"])
    runtime.scaler.load_state_dict(state["scaler"])
    runtime.step, runtime.epoch = int(state["step"]), int(state["epoch"])
    runtime.restarts = int(state.get("restarts", 0))
    if (directory / METRICS_FILE).is_file():
        runtime.last_metrics = json.loads((directory / METRICS_FILE).read_text())


def _parameter_index(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> int:
    """Position of ``parameter`` in ``optimizer.state_dict()`` numbering."""
    index = 0
    for group in optimizer.param_groups:
        for candidate in group["params"]:
            if candidate is parameter:
                return index
            index += 1
    raise ValueError("the head's weight is not in the optimizer")


def check_checkpoint(directory: Path, num_classes: int, embedding_dim: int) -> None:
    """One-line ``ValueError`` naming the file and field unless ``directory`` is a training
    checkpoint for ``num_classes`` classes of width ``embedding_dim`` (reads headers only)."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: no such checkpoint directory")
    if not (directory / CHECKPOINT_FILE).is_file():
        raise ValueError(f"{directory / CHECKPOINT_FILE}: missing; not a training checkpoint")
    read_head_manifest(directory / HEAD_DIR, num_classes, embedding_dim)
