"""Production training from a trial config: the same worker loop under ``TorchTrainer``, no Tune.

    python -m workers.train --config CONFIG.yaml [--workers N] [--gpus-per-worker G]
                            [--epochs E] [--output DIR] [--resume-from CHECKPOINT]

Writes ``DIR/backbone.pt`` (the backbone's state dict), ``DIR/class_centres/`` (the ``C × D``
class centres, sharded as the workers held them, with a manifest; ``python -m
workers.head.merge DIR/class_centres OUT.pt`` joins them into one file),
``DIR/trial.yaml`` (the config that ran) and ``DIR/metrics.json`` (the last epoch's metrics).
``--resume-from`` continues from a checkpoint directory a trial or an earlier run wrote, at
any worker count; its epoch counter counts towards ``--epochs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from workers.cli import OneLineParser
from workers.config import ConfigError, TrialConfig, load_trial_config, parse_trial_config
from workers.data import ingest_cpus, train_ingest
from workers.head import export_head_weights
from workers.train_loop import CHECKPOINT_FILE, HEAD_DIR, check_checkpoint, train_loop_per_worker

#: the export's sharded class centres (a head checkpoint without optimizer state)
CENTRES_DIR = "class_centres"

#: Ray Train's settings for every run (the driver's environment and the job's runtime env):
#: worker health polled every 0.2 s (the 2 s default adds ~1.3 s to every report), and a
#: worker group given 300 s to start (the 60 s default fails trials on a busy node — several
#: trials' workers importing torch at once — that would have started; a group no node can
#: hold is refused before it is asked for: ``check_resources``)
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}
#: controller failures (worker-group start-up timeouts) a run retries before it fails
CONTROLLER_RETRIES = 3


def workers_that_fit(worker: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many workers each needing ``worker`` (``CPU``, ``GPU``) the ``nodes`` hold at once:
    Σ_node min over the worker's resources r of ⌊node[r] / worker[r]⌋ (a worker's bundle lives
    on one node)."""
    needs = {name: amount for name, amount in worker.items() if amount > 0}
    return sum(min((math.floor(node.get(name, 0.0) / amount + 1e-9)
                    for name, amount in needs.items()), default=0) for node in nodes)


def alive_nodes() -> list[dict[str, float]]:
    """The resources of each live node of the connected Ray cluster (``ray.nodes()``)."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def check_resources(trial: TrialConfig, available: Mapping[str, float], source: str = "",
                    names: Mapping[str, str] | None = None, trial_cpus: float = 0.0,
                    nodes: Sequence[Mapping[str, float]] = ()) -> None:
    """Fail with one line when ``trial`` cannot be scheduled on ``available`` (Ray's resource
    names: ``CPU``, ``GPU``) at all: its workers, its Ray Data ingest (source shards) and
    ``trial_cpus`` of its own; with ``nodes`` (each live node's resources), also when its
    workers do not fit on them one bundle per node slot (``workers_that_fit``). The line starts
    with ``source: `` when given and names each field as ``names`` spells it (the flag that set
    it), else by its dotted name."""
    resources, where = trial.resources, f"{source}: " if source else ""
    label = {key: (names or {}).get(key, key) for key in (
        "resources.num_workers", "resources.cpus_per_worker", "resources.gpus_per_worker",
        "resources.precision", "data.ray_data_cpus")}
    workers = f"{label['resources.num_workers']} = {resources.num_workers}"
    ingest = ingest_cpus(trial.data)  # Ray Data's decoding CPUs (source shards)
    cpus = resources.num_workers * resources.cpus_per_worker + ingest + trial_cpus
    if cpus > available.get("CPU", 0.0) + 1e-9:
        plus = f" + {label['data.ray_data_cpus']} = {ingest:g}" if ingest else ""
        plus += f" + {trial_cpus:g} per trial" if trial_cpus else ""
        raise ConfigError([
            f"{where}{workers} × {label['resources.cpus_per_worker']} = "
            f"{resources.cpus_per_worker}{plus} needs {cpus:g} CPUs; the cluster has "
            f"{available.get('CPU', 0.0):g}"])
    gpus = resources.num_workers * resources.gpus_per_worker
    if gpus > available.get("GPU", 0.0) + 1e-9:
        raise ConfigError([
            f"{where}{label['resources.gpus_per_worker']} = {resources.gpus_per_worker} × "
            f"{workers} needs {gpus:g} GPUs; the cluster has {available.get('GPU', 0.0):g}"])
    worker = {"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker}
    if nodes and (fit := workers_that_fit(worker, nodes)) < resources.num_workers:
        largest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)))
        raise ConfigError([
            f"{where}{workers} workers of {label['resources.cpus_per_worker']} = "
            f"{resources.cpus_per_worker} and {label['resources.gpus_per_worker']} = "
            f"{resources.gpus_per_worker} each: only {fit} fit on the cluster's "
            f"{len(nodes)} node(s) (a worker lives on one node; the largest has "
            f"{largest.get('CPU', 0.0):g} CPUs, {largest.get('GPU', 0.0):g} GPUs)"])
    if resources.precision == "fp16" and resources.gpus_per_worker == 0:
        raise ConfigError([f"{where}{label['resources.precision']} = 'fp16' needs GPUs "
                           f"({label['resources.gpus_per_worker']} > 0); use 'bf16' or 'fp32' "
                           "on CPU"])


def build_trainer(trial: TrialConfig, storage_path: Path, name: str,
                  callbacks: list[Any] | None = None, resume_from: str | None = None,
                  max_failures: int = 0, dataset: Any = None) -> Any:
    """A ``TorchTrainer`` running ``train_loop_per_worker`` for ``trial``; storage keeps the
    ``trial.checkpoint.keep`` most recent checkpoints. ``dataset``: an object ref to
    ``trial.data``'s split, loaded once by a study (else every worker loads it)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = trial.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    # source shards: the Ray Data train dataset, built here (before the workers take their
    # CPUs) and split equally over the workers, and its CPU budget; else (None, None)
    datasets, dataset_config = train_ingest(trial.data, trial.seed)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": trial.model_dump(mode="json"), "resume_from": resume_from,
                           "dataset": dataset},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if resources.gpus_per_worker else "gloo"),
        datasets=datasets, dataset_config=dataset_config,
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path.resolve()), callbacks=callbacks or [],
            # Ray 2.60 retries a failed controller (e.g. a worker group that never fits and
            # times out starting) forever by default (controller_failure_limit = -1)
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=CONTROLLER_RETRIES),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=trial.checkpoint.keep)),
    )


def export_final(checkpoint_dir: Path, trial: TrialConfig, metrics: dict[str, Any],
                 output: Path) -> None:
    """Write the backbone, the sharded class centres (one shard at a time), the config and the
    metrics."""
    state = torch.load(checkpoint_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(state["backbone"], output / "backbone.pt")
    export_head_weights(checkpoint_dir / HEAD_DIR, output / CENTRES_DIR)
    (output / "trial.yaml").write_text(trial.to_yaml())
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m workers.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="trial config YAML (a study exports it)")
    parser.add_argument("--workers", type=int, help="override resources.num_workers")
    parser.add_argument("--gpus-per-worker", type=float, help="override resources.gpus_per_worker")
    parser.add_argument("--epochs", type=int, help="override epochs")
    parser.add_argument("--output", default="marginlab-train", help="output directory")
    parser.add_argument("--storage", default=None,
                        help="Ray Train storage (default: OUTPUT/ray_storage)")
    parser.add_argument("--resume-from", default=None,
                        help="a checkpoint directory (state.pt + head/) a trial or run wrote")
    return parser.parse_args(argv)


def _with_overrides(trial: TrialConfig, args: argparse.Namespace,
                    source: str) -> tuple[TrialConfig, dict[str, str]]:
    """``trial`` with the flags' overrides, and the flag that set each overridden field (an
    error about it names the flag)."""
    data, flags = trial.model_dump(mode="json"), {}
    if args.workers is not None:
        data["resources"]["num_workers"] = args.workers
        flags["resources.num_workers"] = "--workers"
    if args.gpus_per_worker is not None:
        data["resources"]["gpus_per_worker"] = args.gpus_per_worker
        flags["resources.gpus_per_worker"] = "--gpus-per-worker"
    if args.epochs is not None:
        data["epochs"] = args.epochs
        flags["epochs"] = "--epochs"
    return parse_trial_config(data, source, flags), flags


def main(argv: list[str] | None = None) -> int:
    """Validate everything, then train; returns the process exit code."""
    args = _parse_args(argv)
    output = Path(args.output).resolve()
    try:
        trial, flags = _with_overrides(load_trial_config(args.config), args, args.config)
        from workers.data import check_data_config, load_dataset

        config = check_data_config(trial.data)  # the study's pre-flight check, before Ray
        if not os.environ.get("RAY_ADDRESS"):  # the local Ray gets this machine's CPUs/GPUs
            check_resources(trial, {"CPU": float(os.cpu_count() or 1),
                                    "GPU": float(torch.cuda.device_count())}, args.config,
                            flags)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    resume_from = Path(args.resume_from).resolve() if args.resume_from else None
    if resume_from is not None:
        try:  # the checkpoint's head must match the data's classes (the index is loaded)
            check_checkpoint(resume_from, load_dataset(config).num_classes,
                             trial.model.embedding_dim)
        except ValueError as error:
            print(f"error: --resume-from: {error}", file=sys.stderr)
            return 2

    os.environ.update(TRAIN_ENV)
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                 runtime_env={"env_vars": TRAIN_ENV})
    try:
        check_resources(trial, ray.cluster_resources(), args.config, flags,
                        nodes=alive_nodes())
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage = Path(args.storage).resolve() if args.storage else output / "ray_storage"
    result = build_trainer(trial, storage, name="train",
                           resume_from=str(resume_from) if resume_from else None).fit()
    metrics = dict(result.metrics or {})
    if result.checkpoint is None or metrics.get("diverged"):
        print(f"error: training diverged at step {metrics.get('diverged_step')} "
              f"(loss {metrics.get('loss')}); nothing exported", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as directory:
        export_final(Path(directory), trial, metrics, output)
    print(f"wrote {output}/backbone.pt, {CENTRES_DIR}/, trial.yaml, metrics.json (one centre "
          f"file: python -m workers.head.merge {output / CENTRES_DIR} centres.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
