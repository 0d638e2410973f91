"""The optimizer step of ``unsampled_rows='sparse'``: the optimizer's own rule on sampled rows.

With a row-sparse gradient ``G`` (rows ``S``, values ``G_S``), one step gathers ``w_S`` and the
optimizer's per-row state at ``S``, applies the optimizer's functional update to them and writes
them back; rows outside ``S`` and their state are not touched. Per row ``i ∈ S``:

* SGD (momentum ``μ``, dampening ``τ``, weight decay ``λ``, lr ``η``):
  ``g ← G_i + λ·w_i``, ``b_i ← μ·b_i + (1 − τ)·g`` (``b_i ← g`` when the buffer is created),
  ``w_i ← w_i − η·b_i`` (Nesterov: ``w_i ← w_i − η·(g + μ·b_i)``);
* Adam / AdamW (shared step ``t``): ``m_i ← β₁m_i + (1 − β₁)g``, ``v_i ← β₂v_i + (1 − β₂)g²``,
  ``w_i ← w_i − η·m̂_i / (√v̂_i + ε)`` with decoupled (AdamW) or L2 (Adam) weight decay.

That is exactly the ``frozen`` policy's step (the full update, then the unsampled rows and
their state restored), but its work and memory traffic are O(|S|·D) instead of O(C_shard·D).
The state lives in ``optimizer.state[weight]`` under the optimizer's own keys and full shard
shape, so checkpoints see the same state whichever policy trained the head.
"""

from __future__ import annotations

import torch
from torch.optim.adam import adam
from torch.optim.sgd import sgd

SPARSE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam)


def check_sparse_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """One-line ``ValueError`` when ``optimizer`` has no row-sparse step here."""
    if not isinstance(optimizer, SPARSE_OPTIMIZERS):
        raise ValueError(f"unsampled_rows = 'sparse' needs torch.optim.SGD, Adam or AdamW; got "
                         f"{type(optimizer).__name__}")


@torch.no_grad()
def sparse_row_step(optimizer: torch.optim.Optimizer, weight: torch.Tensor,
                    gradient: torch.Tensor) -> None:
    """Update the rows of ``weight`` (and their state) that the sparse ``gradient`` holds."""
    gradient = gradient.coalesce()
    rows, values = gradient.indices()[0], gradient.values()
    group = next(group for group in optimizer.param_groups
                 if any(param is weight for param in group["params"]))
    state = optimizer.state[weight]
    params = [weight[rows]]
    if isinstance(optimizer, torch.optim.SGD):
        buffer = state.get("momentum_buffer")
        buffers = [None if buffer is None else buffer[rows]]
        sgd(
            params, [values], buffers, foreach=False, weight_decay=group["weight_decay"],
            momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"] != 0:
            if buffer is None:  # created by this step: zero where no row has been sampled
                buffer = state["momentum_buffer"] = torch.zeros_like(weight)
            buffer[rows] = buffers[0]
    else:
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(weight)
            state["exp_avg_sq"] = torch.zeros_like(weight)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(weight)
        moments = [state[key][rows] for key in ("exp_avg", "exp_avg_sq")]
        maxima = [state["max_exp_avg_sq"][rows]] if group["amsgrad"] else []
        beta1, beta2 = group["betas"]
        adam(
            params, [values], moments[:1], moments[1:], maxima, [state["step"]], foreach=False,
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=group["amsgrad"],
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=group["maximize"])
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = moments
        if group["amsgrad"]:
            state["max_exp_avg_sq"][rows] = maxima[0]
    weight[rows] = params[0]
