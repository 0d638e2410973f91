"""``python -m workers.losses``: every registered loss on one fixed batch.

For each loss with its default hyperparameters: the loss value, the gradient norms w.r.t. the
embeddings and the class centres, and the time of one forward + backward of the
single-process reference (median of a few repeats, one CPU thread), on a seeded float32 batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import build_loss, list_losses, reference_loss


def _batch(batch: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=gen)
    weights = torch.randn(classes, dim, generator=gen) / dim**0.5
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return embeddings, weights, labels


def run(batch: int = 64, dim: int = 128, classes: int = 1000, seed: int = 0,
        repeats: int = 5) -> list[dict[str, object]]:
    """One row per registered loss: name, description, loss, gradient norms, milliseconds."""
    embeddings, weights, labels = _batch(batch, dim, classes, seed)
    rows = []
    for name in list_losses():
        loss = build_loss(name)
        centres = weights
        if loss.subcenters > 1:  # K sub-centres per class: K·dim values per row
            gen = torch.Generator().manual_seed(seed + 1)
            centres = torch.randn(classes, dim * loss.subcenters, generator=gen) / dim**0.5
        times = []
        for _ in range(repeats + 1):  # the first pass is a warm-up
            e = embeddings.clone().requires_grad_()
            w = centres.clone().requires_grad_()
            start = time.perf_counter()
            value = reference_loss(loss, e, w, labels)
            grad_e, grad_w = torch.autograd.grad(value, (e, w))
            times.append(time.perf_counter() - start)
        rows.append({"name": name, "describe": loss.describe(), "loss": value.item(),
                     "grad_embeddings": float(grad_e.norm()), "grad_weights": float(grad_w.norm()),
                     "ms": 1e3 * statistics.median(times[1:])})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.losses", description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # timings on a shared machine: one thread is the stable choice
    rows = run(args.batch, args.dim, args.classes, args.seed, args.repeats)
    print(f"loss zoo, default hyperparameters: B={args.batch}, D={args.dim}, C={args.classes}, "
          f"float32, seed {args.seed}; ms = median forward+backward of reference_loss, 1 thread")
    print(f"{'loss':<13} {'value':>10} {'|dL/dx|':>10} {'|dL/dW|':>10} {'ms':>7}  hyperparameters")
    for row in rows:
        print(f"{row['name']:<13} {row['loss']:>10.4f} {row['grad_embeddings']:>10.4e} "
              f"{row['grad_weights']:>10.4e} {row['ms']:>7.2f}  {row['describe']}")


if __name__ == "__main__":
    main()
