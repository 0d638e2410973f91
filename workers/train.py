"""Production training from a trial config: the same worker loop under ``TorchTrainer``, no Tune.

    python -m workers.train --config CONFIG.yaml [--workers N] [--gpus-per-worker G]
                            [--epochs E] [--output DIR]

Writes ``DIR/backbone.pt`` (the backbone's state dict), ``DIR/class_centres.pt`` (the full
``C × D`` class-centre matrix, however many workers trained it), ``DIR/trial.yaml`` (the config
that ran) and ``DIR/metrics.json`` (the last epoch's metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from workers.cli import OneLineParser
from workers.config import ConfigError, TrialConfig, load_trial_config, parse_trial_config
from workers.train_loop import CHECKPOINT_FILE, train_loop_per_worker

#: Ray Train checks worker health this often; the default (2 s) adds ~1.3 s to every report
HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def check_resources(trial: TrialConfig, available: dict[str, float], source: str = "") -> None:
    """Fail with one line naming the field (after ``source: ``, when given) when the trial
    cannot be scheduled at all."""
    resources, where = trial.resources, f"{source}: " if source else ""
    cpus = resources.num_workers * resources.cpus_per_worker
    if cpus > available.get("CPU", 0.0) + 1e-9:
        raise ConfigError([
            f"{where}resources.num_workers = {resources.num_workers} × "
            f"resources.cpus_per_worker = {resources.cpus_per_worker} needs {cpus:g} CPUs; "
            f"the cluster has {available.get('CPU', 0.0):g}"])
    gpus = resources.num_workers * resources.gpus_per_worker
    if gpus > available.get("GPU", 0.0) + 1e-9:
        raise ConfigError([
            f"{where}resources.gpus_per_worker = {resources.gpus_per_worker} × "
            f"{resources.num_workers} workers needs {gpus:g} GPUs; the cluster has "
            f"{available.get('GPU', 0.0):g}"])
    if resources.precision == "fp16" and resources.gpus_per_worker == 0:
        raise ConfigError([f"{where}resources.precision = 'fp16' needs GPUs "
                           "(gpus_per_worker > 0); use 'bf16' or 'fp32' on CPU"])


def build_trainer(trial: TrialConfig, storage_path: Path, name: str,
                  callbacks: list[Any] | None = None, resume_from: str | None = None,
                  max_failures: int = 0) -> Any:
    """A ``TorchTrainer`` running ``train_loop_per_worker`` for ``trial``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = trial.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": trial.model_dump(mode="json"), "resume_from": resume_from},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if resources.gpus_per_worker else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path.resolve()), callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    )


def export_final(checkpoint_dir: Path, trial: TrialConfig, metrics: dict[str, Any],
                 output: Path) -> None:
    """Write the backbone, the class-centre matrix, the config and the metrics."""
    state = torch.load(checkpoint_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    output.mkdir(parents=True, exist_ok=True)
    torch.save(state["backbone"], output / "backbone.pt")
    torch.save(state["head_weight"], output / "class_centres.pt")
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
    return parser.parse_args(argv)


def _with_overrides(trial: TrialConfig, args: argparse.Namespace, source: str) -> TrialConfig:
    data = trial.model_dump(mode="json")
    if args.workers is not None:
        data["resources"]["num_workers"] = args.workers
    if args.gpus_per_worker is not None:
        data["resources"]["gpus_per_worker"] = args.gpus_per_worker
    if args.epochs is not None:
        data["epochs"] = args.epochs
    return parse_trial_config(data, source)


def main(argv: list[str] | None = None) -> int:
    """Validate everything, then train; returns the process exit code."""
    args = _parse_args(argv)
    output = Path(args.output).resolve()
    try:
        trial = _with_overrides(load_trial_config(args.config), args, args.config)
        from workers.data import load_dataset, parse_data_config

        load_dataset(parse_data_config(trial.data))  # data errors surface before Ray starts
        if not os.environ.get("RAY_ADDRESS"):  # the local Ray gets this machine's CPUs/GPUs
            check_resources(trial, {"CPU": float(os.cpu_count() or 1),
                                    "GPU": float(torch.cuda.device_count())}, args.config)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2

    os.environ.update(HEALTH_CHECK_ENV)
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False,
                 runtime_env={"env_vars": HEALTH_CHECK_ENV})
    try:
        check_resources(trial, ray.cluster_resources(), args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    storage = Path(args.storage).resolve() if args.storage else output / "ray_storage"
    result = build_trainer(trial, storage, name="train").fit()
    metrics = dict(result.metrics or {})
    if result.checkpoint is None or metrics.get("diverged"):
        print(f"error: training diverged at step {metrics.get('diverged_step')} "
              f"(loss {metrics.get('loss')}); nothing exported", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as directory:
        export_final(Path(directory), trial, metrics, output)
    print(f"wrote {output}/backbone.pt, class_centres.pt, trial.yaml, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
