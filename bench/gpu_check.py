"""GPU check of the sampled softmax head (issue 14); run it through ``bench/gpu_check.sh``.

On one device, in one process (never part of CI):

* parity: ``SampledSoftmaxHead`` in float64 on the device against
  ``workers.losses.reference_loss`` (float64, materialised logits, same device) — the loss and
  the gradients of the embeddings and the weight — for several losses at ``sample_ratio`` 1 and
  0.3 (the reference then restricted to the head's sampled classes), several chunks per shard.
  Passes when every error is within 1e-9 of the reference's largest magnitude (at least 1).
* mixed precision, on a linear backbone + the head (float32 parameters, SGD momentum):
  one bf16 autocast step (float32 loss within 5 % of the float32 loss, finite gradients, the
  parameters move); two fp16 steps with ``torch.amp.GradScaler``: the first is applied (the
  parameters move, the scale stays), in the second an inf is written into one weight gradient
  after backward and the scaler must skip the step (parameters and momentum unchanged, the
  scale halved).
* memory and time of one training step (forward, backward, SGD-momentum ``optimizer.step()``,
  zero grad) at Partial FC's shard size — 3,625,000 rows (29M classes over 8 GPUs), D = 512,
  B = 1024, r = 0.1 — for each ``unsampled_rows`` policy: the peak of
  ``torch.cuda.max_memory_allocated`` above what was allocated before the step (the weight and
  the momentum, reported as ``state``) and the best of three synchronised steps after a warm-up;
  beside the head's forward + backward alone and the floor of three products (``x @ Wᵀ``,
  ``dz @ W``, ``dzᵀ @ x`` at the sampled size), both timed by ``bench/head.py``'s ``measure``.

Prints the tables, writes JSON (``bench/results/gpu_check.json``; ``gpu_check-cpu.json`` with
``--device cpu``) and exits 1 when a parity or mixed-precision check fails. ``--device cpu
--quick`` runs every part small on CPU, one thread, to check this script without a GPU (memory
is then peak RSS, as in ``bench/scale.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python bench/gpu_check.py``
    sys.path.insert(0, str(ROOT))

from bench.head import GIB, Config, measure  # noqa: E402
from bench.scale import (  # noqa: E402
    LR,
    MOMENTUM,
    POLICIES,
    RATIO,
    TARGET_DIM,
    TARGET_ROWS,
    make_head,
    measure_step,
    policy_step,
    policy_unavailable,
    state_bytes,
)
from workers.head import SampledSoftmaxHead  # noqa: E402
from workers.losses import build_loss, reference_loss  # noqa: E402

PARITY_LOSSES = ("arcface", "cosface", "sphereface", "virtual", "dsoftmax", "combined")
PARITY_RATIOS = (1.0, 0.3)
#: parity shapes: B rows, D, C classes, chunk (C = 500 at r = 0.3 walks 3 chunks)
PARITY_B, PARITY_D, PARITY_C, PARITY_CHUNK = 48, 32, 500, 64
PARITY_TOLERANCE = 1e-9
BF16_TOLERANCE = 5e-2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- parity ----------------------------------------------------------------------------------
def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |value − expected| / max(1, max |expected|)``."""
    return float((value - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def parity_case(loss_name: str, ratio: float, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PARITY_B, PARITY_D, generator=generator, dtype=torch.float64).to(device)
    labels = torch.randint(0, PARITY_C, (PARITY_B,), generator=generator).to(device)
    weight = torch.randn(PARITY_C, PARITY_D, generator=generator, dtype=torch.float64)
    head = SampledSoftmaxHead(PARITY_D, PARITY_C, build_loss(loss_name), sample_ratio=ratio,
                              chunk_size=PARITY_CHUNK, device=device, dtype=torch.float64)
    with torch.no_grad():  # one process: the shard is the whole matrix
        head.weight.copy_(weight)
    x_head = x.clone().requires_grad_()
    value = head(x_head, labels, step=3)
    value.backward()
    x_ref, w_ref = x.clone().requires_grad_(), weight.to(device).requires_grad_()
    expected = reference_loss(head.loss, x_ref, w_ref, labels, step=3,
                              classes=None if ratio == 1.0 else head.last_sample)
    expected.backward()
    errors = {"loss_err": relative_error(value.detach(), expected.detach()),
              "x_grad_err": relative_error(x_head.grad, x_ref.grad),
              "w_grad_err": relative_error(head.weight.grad, w_ref.grad)}
    return {"loss": loss_name, "ratio": ratio, "sampled": len(head.last_sample), **errors,
            "ok": all(error <= PARITY_TOLERANCE for error in errors.values())}


# --- mixed precision -------------------------------------------------------------------------
class AmpRun:
    """A linear backbone and the head (float32), SGD momentum, one fixed batch."""

    def __init__(self, classes: int, dim: int, batch: int, device: torch.device) -> None:
        torch.manual_seed(0)
        self.backbone = nn.Linear(dim, dim, device=device)
        self.head = make_head(classes, dim, RATIO, device=device)
        self.params = [*self.backbone.parameters(), *self.head.parameters()]
        self.optimizer = torch.optim.SGD(self.params, lr=LR, momentum=MOMENTUM)
        generator = torch.Generator().manual_seed(1)
        self.inputs = torch.randn(batch, dim, generator=generator).to(device)
        self.labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
        self.device = device

    def loss(self, dtype: torch.dtype | None, step: int = 0) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.head(self.backbone(self.inputs), self.labels, step=step)

    def snapshot(self) -> list[torch.Tensor]:
        """The parameters and their momentum buffers."""
        buffers = [self.optimizer.state[p]["momentum_buffer"] for p in self.params
                   if "momentum_buffer" in self.optimizer.state[p]]
        return [tensor.detach().clone() for tensor in [*self.params, *buffers]]

    def unchanged(self, before: list[torch.Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(before, self.snapshot(), strict=True))

    def moved(self, before: list[torch.Tensor]) -> bool:
        """Whether every parameter changed since ``before``."""
        count = len(self.params)
        return not any(torch.equal(a, b) for a, b in
                       zip(before[:count], self.snapshot()[:count], strict=True))


def amp_checks(classes: int, dim: int, batch: int, device: torch.device) -> list[dict[str, Any]]:
    run = AmpRun(classes, dim, batch, device)
    with torch.no_grad():
        reference = run.loss(None)
    loss = run.loss(torch.bfloat16)
    loss.backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in run.params)
    before = run.snapshot()
    run.optimizer.step()
    difference = float((loss.detach() - reference).abs() / reference.abs())
    moved = run.moved(before)
    bf16 = {"check": "bf16 step", "loss": loss.item(), "loss_fp32": reference.item(),
            "rel_diff": difference, "finite_grads": finite, "moved": moved,
            "ok": loss.dtype == torch.float32 and difference <= BF16_TOLERANCE and finite
            and moved}
    del run
    release(device)

    run = AmpRun(classes, dim, batch, device)
    scaler = torch.amp.GradScaler(device.type)
    with torch.no_grad():
        reference = run.loss(None)
    records = [bf16]
    for step, inject in ((0, False), (1, True)):
        loss = run.loss(torch.float16, step)
        scaler.scale(loss).backward()
        if inject:
            run.head.weight.grad[0, 0] = float("inf")
        before, scale = run.snapshot(), scaler.get_scale()
        scaler.step(run.optimizer)
        scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        record: dict[str, Any] = {
            "check": "fp16 skipped step (inf grad)" if inject else "fp16 step (GradScaler)",
            "loss": loss.item(), "scale_before": scale, "scale_after": scaler.get_scale()}
        if inject:
            record["ok"] = run.unchanged(before) and scaler.get_scale() == 0.5 * scale
        else:
            record["loss_fp32"] = reference.item()
            record["rel_diff"] = float((loss.detach() - reference).abs() / reference.abs())
            record["ok"] = (loss.dtype == torch.float32 and run.moved(before)
                            and scaler.get_scale() == scale)
        records.append(record)
    return records


# --- memory and time at shard size -----------------------------------------------------------
def step_records(rows: int, dim: int, batch: int, device: torch.device) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    records: list[dict[str, Any]] = []
    for policy in POLICIES:
        reason = policy_unavailable(policy)
        if reason is not None:
            records.append({"step": policy, "status": "unavailable", "reason": reason})
            continue
        step, head, optimizer = policy_step(policy, rows, dim, batch, RATIO, device)
        memory = measure_step(step, "memory", cuda,
                              held_bytes=lambda head=head: head.held_gradient_bytes)
        figures = {**memory, **measure_step(step, "time", cuda)}
        records.append({"step": policy, "status": "ok", **figures,
                        "state_bytes": state_bytes(head, optimizer)})
        del step, head, optimizer
        release(device)
    for name, method in (("fwd+bwd", "head"), ("floor", "floor")):
        config = Config(method, 1, batch, dim, rows, RATIO, str(device), torch.get_num_threads())
        records.append({"step": name, "status": "ok", **measure(config, "time", 0, None)})
        release(device)
    return records


# --- output ----------------------------------------------------------------------------------
def print_tables(results: dict[str, Any]) -> None:
    print(f"\nparity: float64 head vs reference_loss on {results['device']} "
          f"(B={PARITY_B} D={PARITY_D} C={PARITY_C} chunk={PARITY_CHUNK}; relative errors, "
          f"pass ≤ {PARITY_TOLERANCE:g})")
    print(f"{'loss':<11} {'r':>4} {'K':>4} {'loss err':>9} {'x-grad err':>10} "
          f"{'w-grad err':>10} {'ok':>3}")
    for r in results["parity"]:
        print(f"{r['loss']:<11} {r['ratio']:>4} {r['sampled']:>4} {r['loss_err']:>9.1e} "
              f"{r['x_grad_err']:>10.1e} {r['w_grad_err']:>10.1e} {'y' if r['ok'] else 'N':>3}")
    print("\nmixed precision (linear backbone + head, SGD momentum)")
    print(f"{'check':<30} {'loss':>9} {'fp32 loss':>9} {'rel diff':>9} {'scale':>17} {'ok':>3}")
    for r in results["amp"]:
        scale = (f"{r['scale_before']:g}→{r['scale_after']:g}" if "scale_before" in r else "")
        fp32 = f"{r['loss_fp32']:.4f}" if "loss_fp32" in r else ""
        diff = f"{r['rel_diff']:.1e}" if "rel_diff" in r else ""
        print(f"{r['check']:<30} {r['loss']:>9.4f} {fp32:>9} {diff:>9} {scale:>17} "
              f"{'y' if r['ok'] else 'N':>3}")
    shape = results["shape"]
    floor = next(r for r in results["steps"] if r["step"] == "floor")
    key = "ms" if results["device"].startswith("cuda") else "cpu_ms"
    print(f"\none step at {shape['rows']:,} rows × D={shape['dim']}, B={shape['batch']}, "
          f"r={RATIO} on {results['device']} (policies include optimizer.step(), SGD momentum)")
    print(f"{'step':<8} {'ms':>9} {'t/floor':>8} {'extra GiB':>10} {'state GiB':>10}")
    for r in results["steps"]:
        if r["status"] != "ok":
            print(f"{r['step']:<8} {r['status']:>11}  {r['reason']}")
            continue
        extra = f"{r['extra_bytes'] / GIB:.2f}" if "extra_bytes" in r else ""
        state = f"{r['state_bytes'] / GIB:.2f}" if "state_bytes" in r else ""
        print(f"{r['step']:<8} {r['ms']:>9.2f} {r[key] / floor[key]:>8.2f} {extra:>10} "
              f"{state:>10}")
    print(f"extra: peak above what was allocated before the step (weight + momentum = state); "
          f"t/floor: {'wall' if key == 'ms' else 'CPU'} time over the three products' floor.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small shard (50,000 rows × 64, B=64): a check of the script")
    parser.add_argument("--out", type=Path, help="JSON file (default: under bench/results)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch; --device cpu --quick checks the script on CPU",
              file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # as bench/head.py: shared cores make parallel ops wait
    rows, dim, batch, amp_classes = ((50_000, 64, 64, 2_000) if args.quick
                                     else (TARGET_ROWS, TARGET_DIM, 1024, 100_000))
    results: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "quick": args.quick,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {"rows": rows, "dim": dim, "batch": batch, "ratio": RATIO}}
    results["parity"] = [parity_case(name, ratio, device) for name in PARITY_LOSSES
                         for ratio in PARITY_RATIOS]
    print("parity done", flush=True)
    results["amp"] = amp_checks(amp_classes, dim, batch, device)
    print("mixed precision done", flush=True)
    results["steps"] = step_records(rows, dim, batch, device)
    results["ok"] = all(r["ok"] for r in results["parity"] + results["amp"])
    out = args.out or ROOT / "bench" / "results" / (
        "gpu_check.json" if device.type == "cuda" else "gpu_check-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\n{'PASS' if results['ok'] else 'FAIL'}: parity and mixed precision; wrote {out}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
