"""The state of a stateful loss: scalar buffers (EMA statistics) and learnable scalars.

A loss is a frozen dataclass of hyperparameters; what changes while it trains lives here, in a
small ``nn.Module`` that its owner (the head, or whoever calls ``reference_loss``) holds:

* buffers — CurricularFace's ``t``, AdaFace's ``mu`` and ``sigma`` — updated under no grad
  from the *global* batch in ``MarginLoss.prepare``, so every rank computes the same value;
* parameters — UniFace's bias ``b`` — trained like any other parameter (the head all-reduces
  their gradient, so every rank holds the same value and the same gradient).

Being an ``nn.Module`` it moves with ``.to()``, appears in ``state_dict()`` and travels in the
head's checkpoint (``save_head_checkpoint`` stores ``state_dict()`` once, in ``shared.pt``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LossState(nn.Module):
    """``loss.initial_state(num_classes, sample_ratio)`` as 0-d tensors: parameters for the
    names in ``loss.learnable_state``, buffers for the others (``dtype``: float32 default)."""

    def __init__(self, loss: Any, num_classes: int, sample_ratio: float,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in loss.initial_state(num_classes, sample_ratio).items():
            tensor = torch.tensor(float(value), device=device, dtype=dtype or torch.float32)
            if name in loss.learnable_state:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def __len__(self) -> int:
        return len(self.state_dict())

    def values(self) -> dict[str, float]:
        """Every entry as a Python float, by name (one host sync per entry)."""
        return {name: float(tensor.detach()) for name, tensor in self.state_dict().items()}
