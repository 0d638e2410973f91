"""Benchmark one training step (forward + backward) of the sampled softmax head.

Beside ``SampledSoftmaxHead`` (ArcFace, s = 64, m = 0.5) — at each logit budget of
``--budgets`` (MiB of chunk logits kept for backward; 0 recomputes every chunk, the default is
the head's default) and each ``unsampled_rows`` policy of ``--policies`` — it times, on the same
shapes:

* ``naive``: the materialised softmax — normalise, linear, ArcFace margin on the target
  column, ``F.cross_entropy`` — over all C classes (one process);
* ``floor``: the three matrix products a step needs at least, ``x @ Wᵀ``, ``dz @ W`` and
  ``dzᵀ @ x``, with W of the sampled size ``int(r·C)``;
* ``pml``: pytorch-metric-learning's ``ArcFaceLoss`` over all C classes (if installed).

Each configuration is timed in a fresh subprocess and measured for memory in another (world
size 2: that subprocess spawns a gloo group, figures are per-process maxima). Memory is the peak
RSS of one step after a warm-up step (VmHWM — what ``ru_maxrss`` reports — reset through
``/proc/self/clear_refs``) minus the RSS before that step, so the parameter itself and one-time
library workspaces are excluded while its gradient and every temporary are included; on CUDA,
``max_memory_allocated`` minus the allocation before the step. Time is the best of up to three
steps after a warm-up, wall clock (CUDA-synchronised) and, on CPU, process CPU time.
Configurations estimated above ``--max-gib`` (or 70 % of the available memory) are skipped
with the reason printed.

CPU runs use ``--threads`` threads per process (default 1): on a machine whose cores are shared,
more threads than idle cores make every parallel op wait at its barrier. CPU time includes the
kernel's page faults on every fresh large tensor (glibc maps and unmaps each one): with
``unsampled_rows='dense'`` at r < 1 the zeroed ``C_shard × D`` gradient alone costs about 0.2×
the floor in them at N = 1024, D = 512, C = 100k. ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's CPU
allocator then asks for transparent huge pages) cuts that ~7×, for every method alike; each
record notes it as ``thp``.

Usage: ``python bench/head.py [--quick] [--batch 1024] [--classes 100000] [--ratios 0.1] ...``;
results are merged into ``bench/results/head.json``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from workers.head import SampledSoftmaxHead
from workers.head.head import DEFAULT_LOGIT_BUDGET_MB
from workers.losses import Target, build_loss

RESULTS = Path(__file__).resolve().parent / "results" / "head.json"
GIB = 2**30
FLOAT = 4
#: a step whose products exceed this many FLOPs is timed once after the warm-up
SLOW_FLOPS = 2e12


@dataclass(frozen=True)
class Config:
    method: str
    world_size: int
    batch: int
    dim: int
    classes: int
    ratio: float
    device: str
    threads: int
    #: the head's ``logit_budget_mb`` and ``unsampled_rows`` (other methods: the defaults)
    logit_budget_mb: float = DEFAULT_LOGIT_BUDGET_MB
    unsampled_rows: str = "dense"

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Config:
        """The configuration of a result record (fields added later take their defaults)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__ if name in record})

    @property
    def sampled(self) -> int:
        return self.classes if self.method in ("naive", "pml") else max(1, int(self.ratio
                                                                                * self.classes))

    def key(self) -> tuple[Any, ...]:
        return (self.method, self.world_size, self.batch, self.dim, self.classes, self.ratio,
                self.device, self.logit_budget_mb, self.unsampled_rows)


def estimated_bytes(cfg: Config) -> int:
    """Rough peak of one process: the parameter, its gradient, the kept logits and the step's
    temporaries."""
    n, d, c, k = cfg.batch, cfg.dim, cfg.classes, cfg.sampled
    if cfg.method == "head":
        shard = -(-c // cfg.world_size)
        gradient = -(-k // cfg.world_size) if cfg.unsampled_rows == "sparse" else shard
        kept = min(int(cfg.logit_budget_mb * 2**20), FLOAT * n * -(-k // cfg.world_size))
        return FLOAT * ((shard + gradient) * d + 8 * n * d) + 6 * 2**21 * FLOAT + kept
    if cfg.method == "floor":
        return FLOAT * (2 * k * d + n * k + 2 * n * d)
    if cfg.method == "naive":
        return FLOAT * (3 * c * d + 5 * n * c)
    return FLOAT * (3 * c * d + 8 * n * c)  # pml


def available_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2**63


# --- the steps -------------------------------------------------------------------------------
def make_step(cfg: Config, rank: int, group: dist.ProcessGroup | None
              ) -> tuple[Callable[[], None], int, Callable[[], int]]:
    """The step function, the bytes of its parameter (excluded from the extra memory) and a
    function giving the bytes it holds between steps beyond the parameter (included)."""
    device = torch.device(cfg.device)
    generator = torch.Generator().manual_seed(rank)
    local = cfg.batch // cfg.world_size
    x = torch.randn(local, cfg.dim, generator=generator).to(device).requires_grad_()
    labels = torch.randint(0, cfg.classes, (local,), generator=generator).to(device)
    loss = build_loss("arcface")
    if cfg.method == "head":
        head = SampledSoftmaxHead(cfg.dim, cfg.classes, loss, cfg.ratio, process_group=group,
                                  unsampled_rows=cfg.unsampled_rows,
                                  logit_budget_mb=cfg.logit_budget_mb, device=device)

        def step() -> None:
            head(x, labels).backward()
            head.weight.grad = x.grad = None

        return step, head.weight.numel() * FLOAT, lambda: head.held_gradient_bytes
    if cfg.method == "floor":
        weight = torch.empty(cfg.sampled, cfg.dim, device=device).normal_(0, 0.01)
        xd = x.detach()

        def step() -> None:
            z = xd @ weight.T
            _ = z @ weight, z.T @ xd

        return step, weight.numel() * FLOAT, lambda: 0
    if cfg.method == "naive":
        weight = torch.nn.Parameter(torch.empty(cfg.classes, cfg.dim, device=device)
                                    .normal_(0, 0.01))

        def step() -> None:
            cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T
            cos_y = cos.gather(1, labels[:, None]).squeeze(1)
            positive = loss.positive_logit(Target(cos_y, cos_y, cos_y))
            logits = (loss.scale * cos).scatter(1, labels[:, None], positive[:, None])
            F.cross_entropy(logits, labels).backward()
            weight.grad = x.grad = None

        return step, weight.numel() * FLOAT, lambda: 0
    from pytorch_metric_learning.losses import ArcFaceLoss

    pml = ArcFaceLoss(num_classes=cfg.classes, embedding_size=cfg.dim, margin=28.6,
                      scale=64).to(device)

    def step() -> None:
        pml(x, labels).backward()
        pml.W.grad = x.grad = None

    return step, pml.W.numel() * FLOAT, lambda: 0


# --- measurement -----------------------------------------------------------------------------
def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """VmHWM: the peak RSS (what ``ru_maxrss`` reports), resettable through ``clear_refs``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(cuda: bool) -> int:
    """Reset the peak after the warm-up step; return the baseline (parameter and caches)."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return current_rss()


def measure(cfg: Config, mode: str, rank: int, group: dist.ProcessGroup | None) -> dict[str, Any]:
    """``mode='time'``: best wall / CPU ms of the timed steps after a warm-up step.

    ``mode='memory'``: peak extra bytes of one step after a warm-up step (one-time allocations
    of the first step, e.g. library workspaces, are not counted), plus what the method holds
    between steps (the head's reused CPU gradient buffer, allocated by the warm-up step).
    """
    torch.set_num_threads(cfg.threads)
    cuda = cfg.device.startswith("cuda")
    step, param_bytes, held_bytes = make_step(cfg, rank, group)
    flops = 6 * cfg.batch * cfg.dim * cfg.sampled / cfg.world_size
    repeats = 1 if mode == "memory" or flops > SLOW_FLOPS else 3
    walls, cpus, baseline = [], [], 0
    for index in range(1 + repeats):
        if index == 1 and mode == "memory":
            baseline = reset_peak(cuda)
        if group is not None:
            dist.barrier(group)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    if mode == "memory":
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
        return {"extra_bytes": peak - baseline + held_bytes(), "param_bytes": param_bytes}
    return {"ms": 1e3 * min(walls[1:]), "cpu_ms": 1e3 * min(cpus[1:]), "repeats": repeats}


def _rank_main(rank: int, cfg: Config, mode: str, port: int, out_dir: str) -> None:
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        cfg = Config(**{**asdict(cfg), "device": f"cuda:{rank}"})
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=cfg.world_size, timeout=datetime.timedelta(minutes=20))
    try:
        result = measure(cfg, mode, rank, dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def worker(cfg: Config, mode: str) -> dict[str, Any]:
    """Run one configuration in this (fresh) process; world size 2 spawns its ranks."""
    if cfg.world_size == 1:
        return measure(cfg, mode, 0, None)
    with socket.socket() as sock, tempfile.TemporaryDirectory() as out_dir:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        mp.spawn(_rank_main, args=(cfg, mode, port, out_dir), nprocs=cfg.world_size)
        ranks = [json.loads(Path(out_dir, f"{r}.json").read_text())
                 for r in range(cfg.world_size)]
    return {key: max(rank[key] for rank in ranks) for key in ranks[0]}


# --- driver ----------------------------------------------------------------------------------
def skip_reason(cfg: Config, max_bytes: int) -> str | None:
    if cfg.method == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "pytorch-metric-learning is not installed"
    if cfg.world_size > 1 and cfg.device.startswith("cuda") and (
            torch.cuda.device_count() < cfg.world_size):
        return f"needs {cfg.world_size} GPUs for NCCL, found {torch.cuda.device_count()}"
    need = estimated_bytes(cfg)
    limit = min(max_bytes, int(0.7 * available_bytes()))
    if need > limit:
        return f"needs ~{need / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB"
    return None


def plan(args: argparse.Namespace, device: str) -> list[Config]:
    configs = []
    for batch in args.batch:
        for classes in args.classes:
            for ratio in args.ratios:
                for world_size in args.world_sizes:
                    for budget in args.budgets:
                        for policy in args.policies:
                            configs.append(Config("head", world_size, batch, args.dim, classes,
                                                  ratio, device, args.threads, budget, policy))
                configs.append(Config("floor", 1, batch, args.dim, classes, ratio, device,
                                      args.threads))
            for method in ("naive", "pml"):
                configs.append(Config(method, 1, batch, args.dim, classes, 1.0, device,
                                      args.threads))
    return configs


def run(cfg: Config, max_bytes: int) -> dict[str, Any]:
    """Time the configuration in one fresh process and measure its memory in another.

    The memory run sets ``MALLOC_MMAP_THRESHOLD_`` (CPU) so that every tensor above 64 KiB is
    mapped and unmapped on its own and RSS follows the live tensors; the timing run keeps the
    default allocator.
    """
    record: dict[str, Any] = {**asdict(cfg),
                              "thp": os.environ.get("THP_MEM_ALLOC_ENABLE", "") == "1"}
    reason = skip_reason(cfg, max_bytes)
    for mode in ("time", "memory"):
        if reason is not None:
            break
        env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if mode == "memory"
                                and cfg.device == "cpu" else {})}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(asdict(cfg)), "--mode", mode],
            capture_output=True, text=True, check=False, env=env)
        if done.returncode == 0:
            record.update(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            reason = f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}"
    if reason is None:
        return record
    print(f"skip {describe(cfg)}: {reason}", flush=True)
    record["skipped"] = reason
    return record


def describe(cfg: Config) -> str:
    head = (f" budget={cfg.logit_budget_mb:g}MiB rows={cfg.unsampled_rows}"
            if cfg.method == "head" else "")
    return (f"{cfg.method} world={cfg.world_size} N={cfg.batch} C={cfg.classes} "
            f"r={cfg.ratio}{head}")


def table(records: list[dict[str, Any]]) -> None:
    """Print every measured configuration and the head's ratios to naive and floor."""
    measured = [r for r in records if "ms" in r]
    index = {(r["method"], r["world_size"], r["batch"], r["classes"], r["ratio"]): r
             for r in measured if r["method"] != "head"}
    print(f"{'method':<6} {'W':>2} {'N':>5} {'C':>8} {'r':>4} {'budget':>6} {'rows':>6} "
          f"{'ms':>9} {'cpu ms':>9} {'extra MiB':>10} {'param MiB':>10} {'t/naive':>8} "
          f"{'t/floor':>8} {'m/naive':>8}")
    for r in sorted(measured, key=lambda r: (r["batch"], r["classes"], -r["ratio"],
                                             r["method"], r["world_size"],
                                             r.get("logit_budget_mb", 0),
                                             r.get("unsampled_rows", ""))):
        naive = index.get(("naive", 1, r["batch"], r["classes"], 1.0))
        floor = index.get(("floor", 1, r["batch"], r["classes"], r["ratio"]))
        time_key = "cpu_ms" if r["device"] == "cpu" else "ms"
        cfg = Config.from_record(r)
        budget, rows = ((f"{cfg.logit_budget_mb:g}", cfg.unsampled_rows)
                        if cfg.method == "head" else ("", ""))

        def ratio(other: dict[str, Any] | None, key: str, row: dict[str, Any] = r) -> str:
            return f"{row[key] / other[key]:.2f}" if other and row["method"] == "head" else ""

        print(f"{r['method']:<6} {r['world_size']:>2} {r['batch']:>5} {r['classes']:>8} "
              f"{r['ratio']:>4} {budget:>6} {rows:>6} {r['ms']:>9.1f} {r['cpu_ms']:>9.1f} "
              f"{r['extra_bytes'] / 2**20:>10.1f} {r['param_bytes'] / 2**20:>10.1f} "
              f"{ratio(naive, time_key):>8} {ratio(floor, time_key):>8} "
              f"{ratio(naive, 'extra_bytes'):>8}")
    print("budget: the head's logit_budget_mb (MiB of chunk logits kept for backward); rows: "
          "its unsampled_rows. t/*: ratio of CPU time per step on CPU (robust to shared "
          "cores), of wall time on CUDA; m/naive: ratio of peak extra memory. World size 2: "
          "per-process maxima.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="N=256, C=10k only")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0, DEFAULT_LOGIT_BUDGET_MB],
                        help="the head's logit_budget_mb values (MiB)")
    parser.add_argument("--policies", nargs="+", choices=("dense", "sparse"),
                        default=["dense", "sparse"], help="the head's unsampled_rows values")
    parser.add_argument("--methods", nargs="+", default=["head", "floor", "naive", "pml"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--max-gib", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Config(**json.loads(args.worker)), args.mode)))
        return
    if args.quick:
        args.batch, args.classes = [256], [10_000]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = [cfg for cfg in plan(args, device) if cfg.method in args.methods]
    records = []
    print(f"{len(configs)} configurations on {device}", flush=True)
    for cfg in configs:
        records.append(run(cfg, int(args.max_gib * GIB)))
        if "ms" in records[-1]:
            print(f"done {describe(cfg)}: {records[-1]['ms']:.1f} ms", flush=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    fresh = {Config.from_record(r).key() for r in records}
    merged = [r for r in previous if Config.from_record(r).key() not in fresh]
    merged += records
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=1))
    table([r for r in merged if r["device"] == device])
    print(f"wrote {args.out} ({len(merged)} records)")


if __name__ == "__main__":
    main()
