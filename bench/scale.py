"""Partial-FC scale (issue 14): identity split, head checkpoints and the head's optimizer step.

Three sections, each selectable with ``--sections``; every case runs in a fresh subprocess:

* ``split``: wall time and peak extra RSS of ``workers.data.split_identities(groups, 0.1, 0)``
  at K identities, ungrouped (``groups = arange(K)``) and grouped (``arange(K) // g``). Each
  case has its own timeout (``--split-timeout``): a case that runs past it is killed and
  reported as ``timeout``.
* ``checkpoint``: ``save_head_checkpoint`` and ``load_head_checkpoint`` (collective, gloo, one
  fresh process per rank) of a C × D head on CPU, after one SGD-with-momentum step so that the
  momentum rows exist. Saved and loaded at each world size, and a save resumed at other world
  sizes (``--ckpt-resume 2:3 2:1``). Per rank: wall time of the call (from a barrier to its
  return) and its peak extra RSS, against the shard bytes (the rank's rows of the weight and of
  every optimizer state tensor shaped like it). Each load is checked against the saved rows
  (row sums of the weight and the momentum, per global row).
* ``step``: one training step of ``SampledSoftmaxHead`` (ArcFace s = 64, m = 0.5) with
  ``optimizer.step()`` (SGD, momentum 0.9) for each ``unsampled_rows`` policy — ``dense``,
  ``frozen``, ``sparse`` (reported ``unavailable`` where the head does not accept it) — beside
  ``fwd+bwd`` (the head's forward and backward alone) and ``floor`` (the three products at the
  sampled size), both measured by ``bench/head.py``'s ``measure``.

Every record has a ``status``: ``ok``; ``timeout`` or ``failed`` (with the last line of the
case's error as ``reason``); ``unavailable`` (a policy the head lacks); ``skipped`` (a load whose
save did not succeed). The run goes on past any of them.

Memory is the peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) minus the RSS before the
measured call, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows the live tensors; a
step's figure is taken after a warm-up step, so the weight and the optimizer state are excluded
(``state`` column) while the gradient and every temporary are included. Step time is the best of
three steps after a warm-up, in a separate process with the default allocator; on CPU, compare
process CPU time (robust to shared cores). CPU runs use ``--threads`` threads per process.

The ``@29M/8`` columns extrapolate each figure linearly to Partial FC's 29M classes on 8 GPUs
(3,625,000 rows per shard, D = 512, fp32): split figures scale with identities (K log K work:
slightly optimistic), checkpoint and step figures with the shard's elements (rows × D) at the
same batch and ratio. They are linear extrapolations of measured per-row costs, not
measurements; CPU times say nothing absolute about a GPU.

Usage: ``python bench/scale.py [--quick] [--sections split checkpoint step] ...``; the sections
run replace theirs in ``bench/results/scale.json`` (``scale-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python bench/scale.py``
    sys.path.insert(0, str(ROOT))

from bench.head import GIB, Config, measure, peak_rss, reset_peak  # noqa: E402
from workers.head import (  # noqa: E402
    SampledSoftmaxHead,
    load_head_checkpoint,
    save_head_checkpoint,
)
from workers.losses import build_loss  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
SECTIONS = ("split", "checkpoint", "step")
STEPS = ("floor", "fwd+bwd", "dense", "frozen", "sparse")
POLICIES = ("dense", "frozen", "sparse")
#: the extrapolation target: Partial FC's 29M classes on 8 GPUs, D = 512, fp32
TARGET_CLASSES, TARGET_GPUS, TARGET_DIM = 29_000_000, 8, 512
TARGET_ROWS = -(-TARGET_CLASSES // TARGET_GPUS)
LR, MOMENTUM, RATIO = 0.1, 0.9, 0.1
MIB = 2**20


# --- shared with bench/gpu_check.py --------------------------------------------------------
def make_head(classes: int, dim: int, ratio: float, policy: str = "dense",
              group: dist.ProcessGroup | None = None,
              device: torch.device | str | None = None) -> SampledSoftmaxHead:
    """The benchmarked head: ArcFace (s = 64, m = 0.5), uniform sampling at ``ratio``."""
    return SampledSoftmaxHead(dim, classes, build_loss("arcface", scale=64.0, margin=0.5),
                              sample_ratio=ratio, process_group=group, unsampled_rows=policy,
                              device=device)


def policy_unavailable(policy: str) -> str | None:
    """Why the head rejects ``unsampled_rows=policy`` (its one-line error), or ``None``."""
    try:
        make_head(4, 2, 1.0, policy)
    except ValueError as error:
        return str(error)
    return None


def policy_step(policy: str, classes: int, dim: int, batch: int, ratio: float,
                device: torch.device | str) -> tuple[Callable[[], None], SampledSoftmaxHead,
                                                     torch.optim.Optimizer]:
    """One training step of the head (forward, backward, SGD-momentum step, zero grad)."""
    head = make_head(classes, dim, ratio, policy, device=device)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM)
    head.attach_optimizer(optimizer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    labels = torch.randint(0, classes, (batch,), generator=generator).to(device)

    def step() -> None:
        head(x, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x.grad = None

    return step, head, optimizer


def state_bytes(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the head's weight and of every optimizer state tensor shaped like it."""
    state = optimizer.state.get(head.weight, {})
    tensors = [head.weight, *(value for value in state.values()
                              if torch.is_tensor(value) and value.shape == head.weight.shape)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def measure_step(step: Callable[[], None], mode: str, cuda: bool, repeats: int = 3,
                 held_bytes: Callable[[], int] = lambda: 0) -> dict[str, float]:
    """After a warm-up step: ``time`` → best wall and CPU ms of ``repeats`` steps;
    ``memory`` → the peak bytes of one step above what was allocated before it, plus
    ``held_bytes()``: what the step keeps between steps (the head's reused CPU gradient)."""
    step()
    if mode == "memory":
        baseline = reset_peak(cuda)
        step()
        if cuda:
            torch.cuda.synchronize()
        return {"extra_bytes": (torch.cuda.max_memory_allocated() if cuda else peak_rss())
                - baseline + held_bytes()}
    walls, cpus = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"ms": 1e3 * min(walls), "cpu_ms": 1e3 * min(cpus)}


# --- workers (one fresh process per case) ----------------------------------------------------
def split_worker(case: dict[str, Any]) -> dict[str, Any]:
    """After a small warm-up split: best wall and CPU seconds of three splits and their peak
    extra RSS (three alike splits: the peak of one)."""
    # imported here: workers.data needs the data readers' packages, which gpu_check.py (this
    # module's other user) does not
    from workers.data import split_identities

    torch.set_num_threads(case["threads"])
    identities, group_size = case["identities"], case["group_size"]
    groups = torch.arange(identities) // group_size
    split_identities(torch.arange(4 * group_size) // group_size, case["heldout_fraction"], 0)
    baseline = reset_peak(False)
    walls, cpus = [], []
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        train, heldout = split_identities(groups, case["heldout_fraction"], 0)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    extra = peak_rss() - baseline
    together = torch.cat([train, heldout]).sort().values
    return {"seconds": min(walls), "cpu_seconds": min(cpus), "extra_bytes": extra,
            "heldout": len(heldout),
            "partition_ok": bool(torch.equal(together, torch.arange(identities)))}


def row_sums(head: SampledSoftmaxHead, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """(rows, 2): per row, the sum of the weight and of the momentum (NaN without momentum)."""
    momentum = optimizer.state.get(head.weight, {}).get("momentum_buffer")
    weight_sums = head.weight.detach().sum(dim=1)
    return torch.stack([weight_sums, weight_sums.new_full(weight_sums.shape, float("nan"))
                        if momentum is None else momentum.sum(dim=1)], dim=1)


def checkpoint_rank(case: dict[str, Any], group: dist.ProcessGroup) -> dict[str, Any]:
    """Save or load on this rank; the load is checked against the saver's row sums."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    head = make_head(case["classes"], case["dim"], RATIO, group=group)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM)
    directory = Path(case["directory"])
    if case["op"] == "save":
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(case["batch"] // world, case["dim"], generator=generator)
        labels = torch.randint(0, case["classes"], (len(x),), generator=generator)
        head(x, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    before = state_bytes(head, optimizer)
    baseline = reset_peak(False)
    dist.barrier(group)
    start = time.perf_counter()
    call = save_head_checkpoint if case["op"] == "save" else load_head_checkpoint
    call(head, optimizer, directory / "checkpoint")
    seconds = time.perf_counter() - start
    shard_bytes = state_bytes(head, optimizer)
    result: dict[str, Any] = {"seconds": seconds, "extra_bytes": peak_rss() - baseline,
                              "created_bytes": shard_bytes - before, "rows": head.shard.size,
                              "shard_bytes": shard_bytes}
    sums = row_sums(head, optimizer)
    if case["op"] == "save":
        torch.save({"start": head.shard.start, "sums": sums}, directory / f"sums-{rank}.pt")
    else:
        saved = sorted((torch.load(path) for path in directory.glob("sums-*.pt")),
                       key=lambda part: part["start"])
        expected = torch.cat([part["sums"] for part in saved])[head.shard.start:head.shard.stop]
        result["verified"] = bool(torch.equal(sums, expected))
    return result


def _checkpoint_rank_main(rank: int, case: dict[str, Any], port: int, out_dir: str) -> None:
    torch.set_num_threads(case["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=case["world_size"],
                            timeout=datetime.timedelta(minutes=20))
    try:
        result = checkpoint_rank(case, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def checkpoint_worker(case: dict[str, Any]) -> dict[str, Any]:
    """Run every rank of the case (rank 0 in this process when alone); gather their results."""
    with socket.socket() as sock, tempfile.TemporaryDirectory() as out_dir:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        if case["world_size"] == 1:
            _checkpoint_rank_main(0, case, port, out_dir)
        else:
            mp.spawn(_checkpoint_rank_main, args=(case, port, out_dir),
                     nprocs=case["world_size"])
        ranks = [json.loads(Path(out_dir, f"{rank}.json").read_text())
                 for rank in range(case["world_size"])]
    merged = {key: max(rank[key] for rank in ranks)
              for key in ("seconds", "extra_bytes", "created_bytes", "rows", "shard_bytes")}
    if "verified" in ranks[0]:
        merged["verified"] = all(rank["verified"] for rank in ranks)
    return {**merged, "per_rank": ranks}


def step_worker(case: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(case["threads"])
    name, device = case["step"], case["device"]
    if name in ("floor", "fwd+bwd"):
        config = Config("floor" if name == "floor" else "head", 1, case["batch"], case["dim"],
                        case["classes"], case["ratio"], device, case["threads"])
        result = measure(config, case["mode"], 0, None)
        if "param_bytes" in result:
            result["state_bytes"] = result.pop("param_bytes")
        return result
    step, head, optimizer = policy_step(name, case["classes"], case["dim"], case["batch"],
                                        case["ratio"], device)
    result = measure_step(step, case["mode"], device.startswith("cuda"),
                          held_bytes=lambda: head.held_gradient_bytes)
    return {**result, "state_bytes": state_bytes(head, optimizer)}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "split": split_worker, "checkpoint": checkpoint_worker, "step": step_worker}


def run_worker(case: dict[str, Any], timeout: float, memory: bool = True) -> dict[str, Any]:
    """Run ``case`` in a fresh process (its own session, killed whole past ``timeout`` s).

    Returns the worker's figures with ``status='ok'``, or ``status`` ``'timeout'`` or
    ``'failed'`` and a one-line ``reason``.
    """
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if memory else {})}
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"status": "timeout", "reason": f"timeout after {timeout:g} s"}
    if process.returncode != 0:
        lines = stderr.strip().splitlines()
        return {"status": "failed", "reason": lines[-1] if lines else f"exit {process.returncode}"}
    return {"status": "ok", **json.loads(stdout.strip().splitlines()[-1])}


# --- sections --------------------------------------------------------------------------------
def run_split(args: argparse.Namespace) -> list[dict[str, Any]]:
    cases = [(size, 1) for size in args.split_sizes]
    if args.split_group_size > 1:
        cases.append((max(args.split_sizes), args.split_group_size))
    records = []
    for identities, group_size in cases:
        case = {"section": "split", "identities": identities, "group_size": group_size,
                "groups": -(-identities // group_size), "heldout_fraction": 0.1,
                "threads": args.threads}
        record = {**case, **run_worker(case, args.split_timeout)}
        if record["status"] == "ok":
            factor = TARGET_CLASSES / identities
            record["at_target"] = {key: record[key] * factor
                                   for key in ("seconds", "cpu_seconds", "extra_bytes")}
        records.append(record)
        progress(record, f"split K={identities} groups={case['groups']}")
    return records


def parse_resume(values: list[str]) -> list[tuple[int, int]]:
    pairs = []
    for value in values:
        saved, _, loaded = value.partition(":")
        pairs.append((int(saved), int(loaded)))
    return pairs


def run_checkpoint(args: argparse.Namespace) -> list[dict[str, Any]]:
    resume = parse_resume(args.ckpt_resume)
    records = []
    for saved_world in sorted(set(args.ckpt_world_sizes) | {saved for saved, _ in resume}):
        loads = [saved_world] * (saved_world in args.ckpt_world_sizes) + [
            loaded for saved, loaded in resume if saved == saved_world]
        with tempfile.TemporaryDirectory(dir=args.tmp_dir) as directory:
            reason = None  # why the loads cannot run: the save did not
            for op, world in [("save", saved_world)] + [("load", world) for world in loads]:
                case = {"section": "checkpoint", "op": op, "saved_world_size": saved_world,
                        "world_size": world, "classes": args.ckpt_classes,
                        "dim": args.ckpt_dim, "batch": args.batch, "threads": args.threads,
                        "directory": directory}
                result = ({"status": "skipped", "reason": reason} if reason is not None
                          else run_worker(case, args.timeout))
                record = {key: value for key, value in case.items() if key != "directory"}
                record.update(result)
                if record["status"] == "ok":
                    if op == "save":
                        record["disk_bytes"] = sum(path.stat().st_size for path in
                                                   Path(directory, "checkpoint").rglob("*")
                                                   if path.is_file())
                    factor = TARGET_ROWS * TARGET_DIM / (record["rows"] * args.ckpt_dim)
                    record["at_target"] = {"seconds": record["seconds"] * factor,
                                           "extra_bytes": record["extra_bytes"] * factor}
                elif op == "save":
                    reason = f"the save at {saved_world} {record['status']}"
                records.append(record)
                progress(record, f"checkpoint {op} saved at {saved_world}, world {world}")
    return records


def run_step(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for name in args.steps:
        case = {"section": "step", "step": name, "classes": args.step_classes,
                "dim": args.step_dim, "batch": args.batch, "ratio": RATIO, "device": device,
                "threads": args.threads}
        reason = policy_unavailable(name) if name in POLICIES else None
        record: dict[str, Any] = {**case, "status": "ok"}
        if reason is not None:
            record.update(status="unavailable", reason=reason)
        for mode in ("time", "memory"):
            if record["status"] != "ok":
                break
            result = run_worker({**case, "mode": mode}, args.timeout, memory=mode == "memory")
            record.update(result)
        if record["status"] == "ok":
            factor = TARGET_ROWS * TARGET_DIM / (args.step_classes * args.step_dim)
            record["at_target"] = {key: record[key] * factor
                                   for key in ("ms", "cpu_ms", "extra_bytes", "state_bytes")}
        records.append(record)
        progress(record, f"step {name}")
    return records


RUNNERS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {
    "split": run_split, "checkpoint": run_checkpoint, "step": run_step}


# --- output ----------------------------------------------------------------------------------
def progress(record: dict[str, Any], what: str) -> None:
    detail = "" if record["status"] == "ok" else f": {record['reason']}"
    print(f"{record['status']:<11} {what}{detail}", flush=True)


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def print_split(records: list[dict[str, Any]]) -> None:
    print(f"\nsplit_identities (heldout 0.1)\n{'K':>9} {'groups':>9} {'s':>9} {'cpu s':>9} "
          f"{'extra MiB':>10} {'heldout':>8} {'ok':>3} | {'cpu s @29M':>10} {'GiB @29M':>9}")
    for r in records:
        if r["status"] != "ok":
            print(f"{r['identities']:>9} {r['groups']:>9} {r['status']:>9}  {r['reason']}")
            continue
        partition = "y" if r["partition_ok"] else "N"
        print(f"{r['identities']:>9} {r['groups']:>9} {r['seconds']:>9.3f} "
              f"{r['cpu_seconds']:>9.3f} {mib(r['extra_bytes']):>10} {r['heldout']:>8} "
              f"{partition:>3} | {r['at_target']['cpu_seconds']:>10.1f} "
              f"{r['at_target']['extra_bytes'] / GIB:>9.2f}")
    print("@29M: linear in identities from each row (the O(K log K) sort makes it slightly "
          "optimistic); extra = peak RSS above the RSS before the call.")


def print_checkpoint(records: list[dict[str, Any]]) -> None:
    if not records:
        return
    first = records[0]
    print(f"\nhead checkpoint, C={first['classes']} D={first['dim']}, SGD momentum, gloo, "
          f"per-rank maxima\n{'op':<4} {'saved':>5} {'W':>2} {'s':>7} {'extra MiB':>10} "
          f"{'created MiB':>11} {'shard MiB':>10} {'transient/shard':>15} {'disk MiB':>9} "
          f"{'ok':>3} | {'s @29M/8':>9} {'extra GiB @29M/8':>16}")
    for r in records:
        head = f"{r['op']:<4} {r['saved_world_size']:>5} {r['world_size']:>2}"
        if r["status"] != "ok":
            print(f"{head} {r['status']:>11}  {r['reason']}")
            continue
        verified = {True: "y", False: "N"}.get(r.get("verified"), "")
        disk = mib(r["disk_bytes"]) if "disk_bytes" in r else ""
        transient = (r["extra_bytes"] - r["created_bytes"]) / r["shard_bytes"]
        print(f"{head} {r['seconds']:>7.2f} {mib(r['extra_bytes']):>10} "
              f"{mib(r['created_bytes']):>11} {mib(r['shard_bytes']):>10} {transient:>15.2f} "
              f"{disk:>9} {verified:>3} | {r['at_target']['seconds']:>9.1f} "
              f"{r['at_target']['extra_bytes'] / GIB:>16.2f}")
    print(f"shard = the rank's rows of weight + momentum; created = optimizer state the call "
          f"allocated (a load into a fresh optimizer makes its momentum); transient = extra − "
          f"created; ok: every loaded row equals the saved one. @29M/8: per-rank figure × "
          f"({TARGET_ROWS:,} rows × {TARGET_DIM}) / (rank's rows × D), linear extrapolation "
          f"(fixed-size read buffers make the memory an overestimate; time assumes the same "
          f"storage bandwidth per rank).")


def print_step(records: list[dict[str, Any]]) -> None:
    if not records:
        return
    first = records[0]
    floor = next((r for r in records if r["step"] == "floor" and r["status"] == "ok"), None)
    key = "cpu_ms" if first["device"] == "cpu" else "ms"
    print(f"\nhead step with optimizer.step() (SGD momentum), C={first['classes']} "
          f"D={first['dim']} B={first['batch']} r={first['ratio']} on {first['device']}\n"
          f"{'step':<8} {'ms':>9} {'cpu ms':>9} {'t/floor':>8} {'extra MiB':>10} "
          f"{'state MiB':>10} | {key + ' @29M/8':>13} {'extra GiB @29M/8':>17} "
          f"{'state GiB @29M/8':>17}")
    for r in records:
        if r["status"] != "ok":
            print(f"{r['step']:<8} {r['status']:>11}  {r['reason']}")
            continue
        ratio = f"{r[key] / floor[key]:.2f}" if floor else ""
        target = r["at_target"]
        print(f"{r['step']:<8} {r['ms']:>9.1f} {r['cpu_ms']:>9.1f} {ratio:>8} "
              f"{mib(r['extra_bytes']):>10} {mib(r['state_bytes']):>10} | "
              f"{target[key]:>13.0f} {target['extra_bytes'] / GIB:>17.2f} "
              f"{target['state_bytes'] / GIB:>17.2f}")
    print(f"fwd+bwd: no optimizer; floor: x@Wᵀ, dz@W, dzᵀ@x at the sampled size. extra = peak "
          f"above the weight and optimizer state (state column). @29M/8: × ({TARGET_ROWS:,} "
          f"rows × {TARGET_DIM}) / (C × D) at the same B and r, linear extrapolation; "
          f"{key} there is this machine's, not a GPU estimate.")


PRINTERS: dict[str, Callable[[list[dict[str, Any]]], None]] = {
    "split": print_split, "checkpoint": print_checkpoint, "step": print_step}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="K=20k, C=100k, D=64: a small version of every section")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--split-sizes", type=int, nargs="+",
                        default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--split-group-size", type=int, default=20,
                        help="identities per group of the grouped case at the largest K "
                             "(1: no grouped case)")
    parser.add_argument("--split-timeout", type=float, default=120.0, help="seconds per case")
    parser.add_argument("--ckpt-classes", type=int, default=1_000_000)
    parser.add_argument("--ckpt-dim", type=int, default=128)
    parser.add_argument("--ckpt-world-sizes", type=int, nargs="*", default=[1, 2, 3],
                        help="save and load at each")
    parser.add_argument("--ckpt-resume", nargs="*", default=["2:3", "2:1"],
                        help="SAVED:LOADED world sizes to resume at")
    parser.add_argument("--step-classes", type=int, default=1_000_000)
    parser.add_argument("--step-dim", type=int, default=128)
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per checkpoint or step case (guards against a hang)")
    parser.add_argument("--tmp-dir", help="where checkpoints are written (default: $TMPDIR)")
    parser.add_argument("--out", type=Path,
                        help="JSON file (default: bench/results/scale.json, scale-quick.json "
                             "with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.split_sizes, args.split_timeout = [20_000], 60.0
        args.ckpt_classes = args.step_classes = 100_000
        args.ckpt_dim = args.step_dim = 64
    args.out = args.out or RESULTS.with_stem("scale-quick" if args.quick else "scale")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        case = json.loads(args.worker)
        print(json.dumps(WORKERS[case["section"]](case)))
        return
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    results = {**previous, "meta": {"torch": torch.__version__, "cpus": os.cpu_count(),
                                    "date": datetime.date.today().isoformat()}}
    for section in args.sections:
        results[section] = RUNNERS[section](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    for section in args.sections:
        PRINTERS[section](results[section])
    print(f"\nwrote {args.out} (sections: {', '.join(args.sections)})")


if __name__ == "__main__":
    main()
