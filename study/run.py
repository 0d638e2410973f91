"""Run a study: ``python study/run.py [flags]`` locally, or on a cluster with
``ray job submit --working-dir . -- python study/run.py [flags]``.

Every flag, space file, the data (``check_data_config``, the check ``python -m workers.train``
runs too), the tracking store, the storage and output paths, the study name and every trial's
resources are checked before Ray starts; a bad one is one line naming the flag or file and
what is allowed. Defaults give a small, complete study on a fresh machine: embedded local Ray,
synthetic identities, a local MLflow store (sqlite) and Tune storage under ``~/.marginlab``.

Ctrl-C stops the trials, keeps Tune's state and exits with code 130 and the command that
resumes the study; nothing is finalised or told to Optuna that the resume would contradict.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shlex
import sqlite3
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python study/run.py``: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_spaces import SearchSpace, SpaceError, load_spaces, shipped_space_files, study_grid
from study.options import SAMPLERS, SCHEDULERS, StudyOptions, redact_uri, split_credentials
from workers.cli import OneLineParser
from workers.config import FARS, ConfigError, parse_trial_config, parse_yaml

HOME = Path(os.environ.get("MARGINLAB_HOME", Path.home() / ".marginlab")).expanduser()
DEFAULT_SPACES = ("normface", "arcface")
DATA_SOURCES = ("synthetic", "image_folder", "recordio", "omniglot", "parquet", "shards")
#: the trial-config fields a flag sets (``--set`` refuses them: one way to give each)
FLAG_FIELDS = {"epochs": "--epochs", "batch_size": "--batch-size", "seed": "--seed",
               "resources.num_workers": "--workers",
               "resources.cpus_per_worker": "--cpus-per-worker",
               "resources.gpus_per_worker": "--gpus-per-worker", "data.source": "--data",
               "data.path": "--data-path"}
#: the longest ``--name``: it names folders, an MLflow experiment and an Optuna study
NAME_LIMIT = 128


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
    add("--scheduler", default="asha",
        help=f"early stopping: {', '.join(SCHEDULERS)} (asha: on accuracy alone; mo-asha: at "
             "each rung on accuracy and head FLOPs, never stopping a trial on that rung's "
             "front)")
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
    add("--warm-start", action="store_true",
        help="enqueue each space's published setting (its loss's defaults, full softmax; a "
             "space file's defaults: replace them) as the first trials")
    add("--target-far", type=float, default=1e-3,
        help="the recommendation's false-accept rate: the cheapest trial whose TAR at this FAR "
             "is within --epsilon of the best is exported as recommended.yaml; one of "
             + ", ".join(f"{far:g}" for far in FARS))
    add("--epsilon", type=float, default=None,
        help="how far below the best TAR the recommendation may be, in [0, 1] (default: the "
             "best trial's spread of TAR over the 10 verification folds)")
    add("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray cluster address: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, "
             "else an embedded local Ray)")
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
        ("--scheduler", args.scheduler, args.scheduler in SCHEDULERS,
         f"one of {list(SCHEDULERS)}"),
        ("--data", args.data, args.data in DATA_SOURCES, f"one of {list(DATA_SOURCES)}"),
        ("--budget-fraction", args.budget_fraction, 0 < args.budget_fraction <= 1,
         "a number in (0, 1]"),
        ("--target-far", args.target_far, args.target_far in FARS,
         f"one of the FARs evaluation reports: {', '.join(map(str, FARS))}"),
        ("--epsilon", args.epsilon, args.epsilon is None or 0 <= args.epsilon <= 1,
         "a number in [0, 1] (a difference of TAR)"),
    ]
    for flag, value, ok, allowed in checks:
        if not ok:
            errors.append(f"{flag} = {value!r} must be {allowed}")
    if args.name is not None and (problem := _check_name(args.name)) is not None:
        errors.append(problem)
    if (problem := _check_ray_address(args.ray_address)) is not None:
        errors.append(problem)
    if args.data in ("image_folder", "recordio", "parquet", "shards") and args.data_path is None:
        errors.append(f"--data-path is required by --data {args.data} (its file or folder)")
    elif args.data == "synthetic" and args.data_path is not None:
        errors.append("--data-path is not used by --data synthetic (drop it or pick a source)")
    if args.resume and args.name is None:
        errors.append("--resume needs --name (the study to resume)")
    return errors


def _check_name(name: str) -> str | None:
    if not name.replace("-", "_").isidentifier():
        return f"--name = {name!r} must use letters, digits, '-' and '_' only"
    if len(name) > NAME_LIMIT:
        return f"--name = {name[:20]!r}… has {len(name)} characters; at most {NAME_LIMIT}"
    return None


def _check_ray_address(address: str | None) -> str | None:
    """None or ``local`` (an embedded local Ray), ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``."""
    if address in (None, "local", "auto"):
        return None
    try:
        parts = urllib.parse.urlsplit(f"//{address.removeprefix('ray://')}")
        valid = bool(parts.hostname) and parts.port is not None and parts.port > 0 \
            and not parts.path and not parts.query
    except ValueError:
        valid = False
    if valid:
        return None
    return (f"--ray-address = {address!r} must be auto, HOST:PORT or ray://HOST:PORT (unset for "
            "an embedded local Ray)")


def _check_tracking_uri(uri: str) -> str | None:
    if uri.startswith(("http://", "https://")):
        return _check_server(uri)
    if uri.startswith("sqlite:///"):
        return _check_sqlite(uri)
    return (f"--tracking-uri = {redact_uri(uri)!r} must be sqlite:///ABSOLUTE/PATH.db or "
            "http(s)://HOST:PORT (MLflow's ./mlruns file store is refused by MLflow 3)")


def _check_sqlite(uri: str) -> str | None:
    """An absolute path to a sqlite MLflow store, or to a new file in a writable folder."""
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    if not path.is_absolute():
        return f"--tracking-uri = {uri!r} must name an absolute path (sqlite:////abs/x.db)"
    if path.is_dir():
        return f"--tracking-uri = {uri!r} names a folder, not a sqlite database file"
    if path.exists():
        try:
            with contextlib.closing(sqlite3.connect(
                    f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True,
                    timeout=5)) as connection:
                tables = {row[0] for row in connection.execute(
                    "select name from sqlite_master where type = 'table'")}
        except sqlite3.Error as error:
            return f"--tracking-uri: {path} is not a sqlite database ({error})"
        if tables and "experiments" not in tables:
            return (f"--tracking-uri: {path} is a sqlite database but not an MLflow store (no "
                    "'experiments' table)")
    return _check_writable(path.parent, "--tracking-uri")


def _check_server(uri: str, timeout: float = 5.0) -> str | None:
    """An MLflow server answers MLflow's REST API at ``uri``: one GET of
    ``experiments/get-by-name`` answers JSON (an experiment or an MLflow error code) within
    ``timeout`` s, with the URI's or the environment's credentials."""
    shown = redact_uri(uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
        clean, credentials = split_credentials(uri)
    except ValueError as error:
        return f"--tracking-uri = {shown!r} is not a valid URL ({error})"
    if not parts.hostname:
        return f"--tracking-uri = {shown!r} has no host (http(s)://HOST:PORT)"
    request = urllib.request.Request(
        f"{clean.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default")
    user = credentials.get("MLFLOW_TRACKING_USERNAME",
                           os.environ.get("MLFLOW_TRACKING_USERNAME"))
    if user is not None:
        password = credentials.get("MLFLOW_TRACKING_PASSWORD",
                                   os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error  # URLError wraps the socket error
        reason = getattr(reason, "strerror", None) or reason
        return (f"--tracking-uri = {shown!r} is unreachable ({reason}); start the MLflow "
                "server or fix the URI")
    if status in (401, 403):
        return (f"--tracking-uri = {shown!r}: the MLflow server refused access (HTTP {status}); "
                "give user:password@ in the URI or MLFLOW_TRACKING_USERNAME/PASSWORD")
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and ("experiment" in answer or "error_code" in answer):
        return None
    return (f"--tracking-uri = {shown!r} answers, but not as an MLflow server (GET "
            f"/api/2.0/mlflow/experiments/get-by-name: HTTP {status}); check the host and port")


def _check_study(storage: Path, name: str | None, resume: bool) -> str | None:
    """``--resume`` names a study that exists under ``storage``; a new one does not (a bad
    ``--name`` is reported by ``_check_name``)."""
    if name is None or _check_name(name) is not None:
        return None
    if resume and not (storage / name).is_dir():
        return (f"--resume --name {name}: there is no study {name!r} under --storage {storage} "
                "(drop --resume to start it)")
    if not resume and (storage / name).exists():
        return (f"--name {name}: a study of that name exists under --storage {storage}; add "
                "--resume to continue it, or pick another --name")
    return None


def _check_writable(directory: Path, flag: str) -> str | None:
    if directory.exists() and not directory.is_dir():
        return f"{flag}: {directory} is a file, not a folder"
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


def _check_warm_start(args: argparse.Namespace, spaces: tuple[SearchSpace, ...]) -> list[str]:
    """``--warm-start``: not with a grid, a trial for each space's published setting, and a
    setting inside each space's ranges (``SearchSpace.warm_start``)."""
    if args.sampler == "grid":
        return ["--warm-start cannot be combined with --sampler grid (the grid runs each of its "
                "points once; drop --warm-start)"]
    errors = []
    if args.trials < len(spaces):
        errors.append(f"--trials = {args.trials} must be ≥ {len(spaces)} with --warm-start (one "
                      "trial per space's published setting)")
    for space in spaces:
        try:
            space.warm_start()
        except SpaceError as error:
            errors += error.lines
    return errors


def _apply_overrides(base: dict[str, Any], assignments: list[str],
                     flags: dict[str, str]) -> list[str]:
    """``--set a.b=value`` into ``base`` (values read as YAML, as config files are), and into
    ``flags`` the label errors about ``a.b`` use; a field a flag sets is refused."""
    errors = []
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key or key.split(".")[0] in ("loss", "version"):
            errors.append(f"--set {assignment!r} must be KEY=VALUE with a dotted trial-config "
                          "key outside loss.* (losses come from the space files)")
            continue
        owned = [flag for field, flag in FLAG_FIELDS.items()
                 if field == key or field.startswith(f"{key}.")]
        if owned:
            errors.append(f"--set {assignment!r}: {key} is set by {', '.join(owned)}; use "
                          f"{'that flag' if len(owned) == 1 else 'those flags'}")
            continue
        try:
            value = parse_yaml(text, f"--set {assignment!r}")
        except ConfigError as error:
            errors += error.lines
            continue
        flags[key] = f"--set {key}"
        node = base
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                errors.append(f"--set {assignment!r}: {part} is not a section")
                break
        else:
            node[leaf] = value
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
    elif (problem := _check_writable(storage, "--storage")
          or _check_study(storage, args.name, args.resume)) is not None:
        errors.append(problem)
    if args.output is not None and (problem := _check_writable(
            Path(args.output).expanduser().resolve(), "--output")) is not None:
        errors.append(problem)
    if (problem := _check_tracking_uri(args.tracking_uri)) is not None:
        errors.append(problem)
    spaces: tuple = ()
    try:
        spaces = tuple(load_spaces(_space_paths(args.space)))
        if args.sampler == "grid":
            errors += _check_grid(args.trials, spaces)
        if args.warm_start:
            errors += _check_warm_start(args, spaces)
    except SpaceError as error:
        errors += error.lines
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
            "data": _data_config(args),
            "resources": {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                          "gpus_per_worker": args.gpus_per_worker}}
    flags = dict(FLAG_FIELDS)
    errors += _apply_overrides(base, args.set, flags)
    if not errors:
        try:
            parse_trial_config(base, "command line", flags)
        except ConfigError as error:
            errors += error.lines
    if errors:
        raise UsageError("\n".join(errors))
    name = args.name or time.strftime("study-%Y%m%d-%H%M%S")
    tracking_uri, credentials = split_credentials(args.tracking_uri)
    output = Path(args.output).expanduser().resolve() if args.output else storage / name / \
        "artifacts"
    options = StudyOptions(
        name=name, spaces=spaces, base=base, num_trials=args.trials,
        max_concurrent=args.concurrent, sampler=args.sampler, seed=args.seed,
        scheduler=args.scheduler, tracking_uri=tracking_uri, storage_path=storage,
        output=output, budget_fraction=args.budget_fraction, resume=args.resume,
        ray_address=args.ray_address, warm_start=args.warm_start, target_far=args.target_far,
        epsilon=args.epsilon, flags=flags,
        cli_args={**{k: v for k, v in vars(args).items() if k != "ray_address"},
                  "tracking_uri": tracking_uri},
        tracking_credentials=credentials)
    if problems := _check_trials(options):
        raise UsageError("\n".join(problems))
    return options


def _check_trials(options: StudyOptions) -> list[str]:
    """Every space's trials: valid with the study's flags, their data (``check_data_config``,
    once per distinct data section) and, on an embedded local Ray, their resources."""
    from workers.data import check_data_config

    try:
        trials = options.largest_trials
    except ConfigError as error:
        return error.lines
    errors: list[str] = []
    for data in {json.dumps(trial.data, sort_keys=True): trial.data for trial in trials}.values():
        try:
            check_data_config(data)
        except (ValueError, FileNotFoundError) as error:
            errors += [line for line in str(error).splitlines() if line not in errors]
    if options.ray_address in (None, "local"):
        import torch

        errors += options.resource_problems({"CPU": float(os.cpu_count() or 1),
                                             "GPU": float(torch.cuda.device_count())})
    return errors


def resume_command(argv: list[str], name: str) -> str:
    """The command line that resumes study ``name``: ``argv`` without ``--name`` and
    ``--resume``, then ``--resume --name NAME`` (a tracking URI's password as ``***``)."""
    kept: list[str] = []
    arguments = iter(argv)
    for arg in arguments:
        if arg == "--name":
            next(arguments, None)
        elif arg == "--tracking-uri":
            kept += [arg, redact_uri(next(arguments, ""))]
        elif arg.startswith("--tracking-uri="):
            kept.append(f"--tracking-uri={redact_uri(arg.partition('=')[2])}")
        elif arg != "--resume" and not arg.startswith("--name="):
            kept.append(arg)
    return shlex.join(["python", "study/run.py", *kept, "--resume", "--name", name])


def main(argv: list[str] | None = None) -> int:
    """Validate, run, summarise; the exit code is 2 for bad input and 130 for an interrupted
    study (the last line says how to resume it)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
    except UsageError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    from study.driver import StudyInterrupted, run_study
    from study.recommend import summary_lines

    print(f"study {options.name}: {options.num_trials} trials over "
          f"{', '.join(s.name for s in options.spaces)}; MLflow {options.tracking_uri}")
    if options.ray_address in (None, "local"):
        print("note: Ray may warn that more PYTHON worker processes started than this machine "
              "has CPUs: each trial runs a function (0.1 CPU), a Train controller and "
              "fractional-CPU workers, as the study asked; nothing to act on")
    try:
        result = run_study(options)
    except ConfigError as error:  # found once connected: the cluster, the MLflow store
        for line in error.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (StudyInterrupted, KeyboardInterrupt):
        hint = (f"resume it with: {resume_command(argv, options.name)}"
                if options.study_dir.is_dir() else "it had not started; nothing to resume")
        print(f"error: study {options.name} interrupted; {hint}", file=sys.stderr)
        return 130
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
    if result.recommendation is None:
        print(result.no_recommendation)
    else:
        print("\n".join(summary_lines(result.recommendation)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
