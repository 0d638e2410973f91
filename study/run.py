"""Run a study: ``python study/run.py [flags]`` locally, or on a cluster with
``ray job submit --working-dir . -- python study/run.py [flags]``.

Every flag, space file, the data source, the tracking URI and the storage path are checked
before Ray starts; a bad one is one line naming it and what is allowed. Defaults give a small,
complete study on a fresh machine: embedded local Ray, synthetic identities, a local MLflow
store (sqlite) and Tune storage under ``~/.marginlab``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):  # ``python study/run.py``: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_spaces import SearchSpace, SpaceError, load_spaces, shipped_space_files, study_grid
from study.options import SAMPLERS, TRIAL_CPUS, StudyOptions, redact_uri, split_credentials
from workers.cli import OneLineParser
from workers.config import ConfigError, parse_trial_config

HOME = Path(os.environ.get("MARGINLAB_HOME", Path.home() / ".marginlab")).expanduser()
DEFAULT_SPACES = ("normface", "arcface")
DATA_SOURCES = ("synthetic", "image_folder", "recordio", "omniglot", "parquet", "shards")


class UsageError(ValueError):
    """A bad flag or input, one line each."""


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = OneLineParser(prog="study/run.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--space", nargs="+", default=list(DEFAULT_SPACES),
        help="space files or shipped family names (several: a multi-loss study); shipped: "
             + ", ".join(p.stem for p in shipped_space_files()))
    add("--trials", type=int, default=4,
        help="number of trials (≥ 1); with --sampler grid at most the number of grid points, "
             "and equal to it runs every point exactly once")
    add("--concurrent", type=int, default=2, help="trials running at once (≥ 1)")
    add("--workers", type=int, default=2, help="Ray Train workers per trial (≥ 1)")
    add("--cpus-per-worker", type=float, default=0.45, help="CPUs per worker (> 0)")
    add("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (≥ 0)")
    add("--data", default="synthetic", help=f"data source: {', '.join(DATA_SOURCES)}")
    add("--data-path", default=None,
        help="data file or folder (not for synthetic; shards: the folder python -m "
             "workers.data.pack wrote)")
    add("--epochs", type=int, default=2, help="epochs per trial (≥ 1)")
    add("--batch-size", type=int, default=128, help="per-worker batch size (≥ 2)")
    add("--sampler", default="tpe",
        help=f"Optuna sampler: {', '.join(SAMPLERS)} (grid: every combination of the spaces' "
             "categorical params, concatenated over --space; other params are refused)")
    add("--scheduler", default="asha", help="early stopping on accuracy: asha or none")
    add("--seed", type=int, default=0, help="seed of the sampler and of every trial (≥ 0)")
    add("--tracking-uri", default=f"sqlite:///{HOME / 'mlflow.db'}",
        help="MLflow tracking URI: sqlite:///ABSOLUTE/PATH.db or http(s)://HOST:PORT")
    add("--storage", default=str(HOME / "studies"),
        help="Tune/Train/Optuna storage directory (absolute; created if missing)")
    add("--output", default=None, help="artifact directory (default: STORAGE/NAME/artifacts)")
    add("--name", default=None, help="study name (default: study-<date>-<time>)")
    add("--budget-fraction", type=float, default=0.5,
        help="best-at-budget export: most accurate trial using ≤ this fraction of the "
             "largest head FLOPs (0, 1]")
    add("--ray-address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    add("--set", action="append", default=[], metavar="KEY=VALUE",
        help="any trial-config field every trial shares, dotted (repeatable), e.g. "
             "--set model.width=16 --set data.num_identities=200 --set optim.optimizer=adamw")
    add("--resume", action="store_true", help="resume the study --name after an interruption")
    return parser


def _space_paths(names: list[str]) -> list[Path]:
    shipped = {p.stem: p for p in shipped_space_files()}
    return [shipped[name] if name in shipped and not Path(name).exists() else Path(name)
            for name in names]


def _check_ranges(args: argparse.Namespace) -> list[str]:
    errors = []
    checks: list[tuple[str, Any, bool, str]] = [
        ("--trials", args.trials, args.trials >= 1, "an integer ≥ 1"),
        ("--concurrent", args.concurrent, args.concurrent >= 1, "an integer ≥ 1"),
        ("--workers", args.workers, args.workers >= 1, "an integer ≥ 1"),
        ("--cpus-per-worker", args.cpus_per_worker, args.cpus_per_worker > 0, "a number > 0"),
        ("--gpus-per-worker", args.gpus_per_worker, args.gpus_per_worker >= 0, "a number ≥ 0"),
        ("--epochs", args.epochs, args.epochs >= 1, "an integer ≥ 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 2, "an integer ≥ 2"),
        ("--seed", args.seed, args.seed >= 0, "an integer ≥ 0"),
        ("--sampler", args.sampler, args.sampler in SAMPLERS, f"one of {list(SAMPLERS)}"),
        ("--scheduler", args.scheduler, args.scheduler in ("asha", "none"),
         "one of ['asha', 'none']"),
        ("--data", args.data, args.data in DATA_SOURCES, f"one of {list(DATA_SOURCES)}"),
        ("--budget-fraction", args.budget_fraction, 0 < args.budget_fraction <= 1,
         "a number in (0, 1]"),
    ]
    for flag, value, ok, allowed in checks:
        if not ok:
            errors.append(f"{flag} = {value!r} must be {allowed}")
    if args.name is not None and not args.name.replace("-", "_").isidentifier():
        errors.append(f"--name = {args.name!r} must use letters, digits, '-' and '_' only")
    if args.data in ("image_folder", "recordio", "parquet", "shards") and args.data_path is None:
        errors.append(f"--data-path is required by --data {args.data} (its file or folder)")
    elif args.data == "synthetic" and args.data_path is not None:
        errors.append("--data-path is not used by --data synthetic (drop it or pick a source)")
    if args.resume and args.name is None:
        errors.append("--resume needs --name (the study to resume)")
    return errors


def _check_fits(args: argparse.Namespace, data_cpus: float) -> list[str]:
    """One trial fits on this machine (no ``--ray-address``): its function, its workers and
    ``data_cpus`` for its Ray Data ingest (source shards)."""
    if args.ray_address is not None or args.concurrent < 1 or args.workers < 1:
        return []
    cpus = os.cpu_count() or 1
    needed = TRIAL_CPUS + args.workers * args.cpus_per_worker + data_cpus
    if needed <= cpus + 1e-9:
        return []
    data = f" + data.ray_data_cpus = {data_cpus:g}" if data_cpus else ""
    return [f"--workers = {args.workers} × --cpus-per-worker = {args.cpus_per_worker} "
            f"(+ {TRIAL_CPUS} per trial{data}) needs {needed:g} CPUs; this machine has {cpus}"]


def _check_tracking_uri(uri: str) -> str | None:
    if uri.startswith(("http://", "https://")):
        return _check_reachable(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            return f"--tracking-uri = {uri!r} must name an absolute path (sqlite:////abs/x.db)"
        return _check_writable(path.parent, "--tracking-uri")
    return (f"--tracking-uri = {uri!r} must be sqlite:///ABSOLUTE/PATH.db or "
            "http(s)://HOST:PORT (MLflow's ./mlruns file store is refused by MLflow 3)")


def _check_reachable(uri: str, timeout: float = 5.0) -> str | None:
    """An MLflow server answers at ``uri`` (any HTTP status counts: auth may be on)."""
    url = urllib.parse.urlsplit(uri)
    if not url.hostname:
        return f"--tracking-uri = {redact_uri(uri)!r} has no host (http(s)://HOST:PORT)"
    try:
        port = url.port or {"http": 80, "https": 443}[url.scheme]
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        return (f"--tracking-uri = {redact_uri(uri)!r} is unreachable ({reason}); start the "
                "MLflow server or fix the URI")


def _check_writable(directory: Path, flag: str) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".marginlab-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        return f"{flag}: {directory} is not writable ({error.strerror})"
    return None


def _check_grid(trials: int, spaces: tuple[SearchSpace, ...]) -> list[str]:
    """``--trials`` ≤ the grid size (``SpaceError`` for a non-categorical parameter)."""
    size = len(study_grid(spaces))
    if trials <= size:
        return []
    names = ", ".join(space.name for space in spaces)
    return [f"--trials = {trials} must be ≤ {size}, the number of grid points of --sampler grid "
            f"over {names} (--trials {size} runs every point once)"]


def _apply_overrides(base: dict[str, Any], assignments: list[str]) -> list[str]:
    """``--set a.b=value`` into ``base`` (values parsed as YAML scalars)."""
    errors = []
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key or key.split(".")[0] in ("loss", "version"):
            errors.append(f"--set {assignment!r} must be KEY=VALUE with a dotted trial-config "
                          "key outside loss.* (losses come from the space files)")
            continue
        node = base
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"--set {assignment!r}: {part} is not a section")
                break
        else:
            node[leaf] = yaml.safe_load(text)
    return errors


def _data_config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {"source": args.data}
    if args.data_path is not None:
        config["path"] = str(Path(args.data_path).expanduser().resolve())
    return config


def options_from_args(args: argparse.Namespace) -> StudyOptions:
    """Validate every input; raise ``UsageError`` with one line per problem."""
    errors = _check_ranges(args)
    storage = Path(args.storage).expanduser()
    if not storage.is_absolute():
        errors.append(f"--storage = {args.storage!r} must be an absolute path")
    elif (problem := _check_writable(storage, "--storage")) is not None:
        errors.append(problem)
    if (problem := _check_tracking_uri(args.tracking_uri)) is not None:
        errors.append(problem)
    spaces: tuple = ()
    try:
        spaces = tuple(load_spaces(_space_paths(args.space)))
        if args.sampler == "grid":
            errors += _check_grid(args.trials, spaces)
    except SpaceError as error:
        errors += error.lines
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
            "data": _data_config(args),
            "resources": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                          "gpus_per_worker": args.gpus_per_worker}}
    errors += _apply_overrides(base, args.set)
    data_cpus = 0.0
    if not errors:
        try:
            parse_trial_config(base, "flags")
            from workers.data import check_data_config, ingest_cpus

            check_data_config(base["data"])
            data_cpus = ingest_cpus(base["data"])
        except (ConfigError, ValueError, FileNotFoundError) as error:
            errors += str(error).splitlines()
    errors += _check_fits(args, data_cpus)
    if errors:
        raise UsageError("\n".join(errors))
    name = args.name or time.strftime("study-%Y%m%d-%H%M%S")
    tracking_uri, credentials = split_credentials(args.tracking_uri)
    output = Path(args.output).expanduser().resolve() if args.output else storage / name / \
        "artifacts"
    return StudyOptions(
        name=name, spaces=spaces, base=base, num_trials=args.trials,
        max_concurrent=args.concurrent, epochs=args.epochs, num_workers=args.workers,
        cpus_per_worker=args.cpus_per_worker, sampler=args.sampler, seed=args.seed,
        scheduler=args.scheduler, tracking_uri=tracking_uri, storage_path=storage,
        output=output, budget_fraction=args.budget_fraction, resume=args.resume,
        ray_address=args.ray_address,
        cli_args={**{k: v for k, v in vars(args).items() if k != "ray_address"},
                  "tracking_uri": tracking_uri},
        tracking_credentials=credentials)


def main(argv: list[str] | None = None) -> int:
    """Validate, run, summarise; the exit code is 2 for bad input."""
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
    except UsageError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    from study.driver import run_study

    print(f"study {options.name}: {options.num_trials} trials over "
          f"{', '.join(s.name for s in options.spaces)}; MLflow {options.tracking_uri}")
    result = run_study(options)
    print(f"\nstudy {options.name} finished in {result.wall_seconds:.0f} s, "
          f"{result.trials} trials; MLflow parent run {result.parent_run_id}")
    print("Pareto front (accuracy ↑, head FLOPs/sample ↓):")
    for point in result.front:
        print(f"  {point['space']:<13} acc {point['verification_accuracy']:.4f}  "
              f"{point['flops'] / 1e9:.4f} GFLOP/sample  run {point['run_id']}")
    if result.best_at_budget:
        best = result.best_at_budget
        print(f"best at {options.budget_fraction:g} of the largest head FLOPs: {best['space']} "
              f"acc {best['verification_accuracy']:.4f} (run {best['run_id']})")
    print("exported configs (python -m workers.train --config FILE):")
    for path in result.exported:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
