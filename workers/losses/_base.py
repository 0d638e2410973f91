"""The dissected-softmax interface every loss of the zoo implements.

A loss never sees a class-centre matrix. The head (or the single-process reference) computes
the raw logits ``z_j = x̃ · W̃_j`` — ``x̃``/``W̃`` normalised where the loss says so — and asks
the loss for three small pieces:

* ``psi(target)``: the positive logit ``P`` from the target's raw logit (the margin lives here);
* ``phi(z)``: the negative logits ``N_j``, an elementwise map (it runs inside the chunked
  log-sum-exp, so it must be pointwise and differentiable);
* ``combine(P, LSE(N))``: the per-sample loss; the cross-entropy family is
  ``softplus(LSE(N) − P)``.

A loss may add one extra negative per row (``virtual_logit``, Virtual Softmax). Every loss is a
frozen dataclass whose fields are its hyperparameters; each field declares its allowed range,
and construction validates every field with a one-line ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

MarginGrad = Literal["true", "detached"]
MARGIN_GRAD_CHOICES: tuple[str, ...] = ("true", "detached")


@dataclass(frozen=True)
class Interval:
    """A closed (or half-open) real interval an hyperparameter must lie in."""

    low: float
    high: float
    low_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        if self.integer:
            return f"{{{self.low:g}, …, {self.high:g}}}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Choice:
    """A finite set of allowed values."""

    options: tuple[Any, ...]

    def contains(self, value: Any) -> bool:
        # same type as well as equal: 1 == True, but 1 is not a valid bool option
        return any(type(value) is type(o) and value == o for o in self.options)

    def __str__(self) -> str:
        return "{" + ", ".join(repr(o) for o in self.options) + "}"


Domain = Interval | Choice


def softplus(z: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^z)`` to full precision (``F.softplus`` turns linear past 20: error 2e-9)."""
    return torch.logaddexp(z, torch.zeros_like(z))


def hyperparameter(default: Any, domain: Domain, unit: str = "", doc: str = "") -> Any:
    """Declare a loss hyperparameter: its default, allowed domain, unit and meaning."""
    return dataclasses.field(default=default, metadata={"domain": domain, "unit": unit, "doc": doc})


def margin_grad_field() -> Any:
    """The ``margin_grad`` switch every margin loss carries."""
    return hyperparameter(
        "true",
        Choice(MARGIN_GRAD_CHOICES),
        doc="'true': the margin's own gradient; 'detached': forward has the margin, "
        "backward is NormFace's (insightface / opensphere style)",
    )


@dataclass(frozen=True)
class Target:
    """What a loss knows about each sample's own class.

    ``logit`` is the raw target logit ``x̃ · W̃_y`` (``cos θ_y`` when the loss normalises both),
    ``embedding_norm`` is ``‖x‖`` and ``weight_norm`` is ``‖W_y‖`` (both before any
    normalisation), ``step`` is the optimisation step the caller passes (for schedules).
    """

    logit: torch.Tensor
    embedding_norm: torch.Tensor
    weight_norm: torch.Tensor
    step: int = 0


@dataclass(frozen=True)
class HyperparameterSpec:
    """Machine-readable description of one hyperparameter (used by the search-space validator)."""

    name: str
    default: Any
    domain: Domain
    unit: str
    doc: str


class MarginLoss:
    """Base of every loss: validation, the margin-gradient policy and the CE combination.

    Subclasses are frozen dataclasses; they override ``psi`` and, where they differ from the
    defaults, ``phi``, ``virtual_logit`` and ``combine``.
    """

    name: ClassVar[str]
    normalize_embeddings: ClassVar[bool] = True
    normalize_weights: ClassVar[bool] = True
    #: the cosine-space clamp used wherever a gradient flows through √(1 − c²) or arccos
    eps: ClassVar[float] = 1e-7

    def __post_init__(self) -> None:
        for spec in self.hyperparameters():
            _check_value(self.name, spec, getattr(self, spec.name))
        self._check_consistency()

    def _check_consistency(self) -> None:
        """Cross-field constraints; raise a one-line ``ValueError``."""

    @classmethod
    def hyperparameters(cls) -> tuple[HyperparameterSpec, ...]:
        """Every hyperparameter with its default, domain, unit and meaning."""
        return tuple(
            HyperparameterSpec(f.name, f.default, f.metadata["domain"], f.metadata["unit"],
                               f.metadata["doc"])
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if "domain" in f.metadata
        )

    def hyperparameter_values(self) -> dict[str, Any]:
        """The hyperparameters of this instance, by name."""
        return {spec.name: getattr(self, spec.name) for spec in self.hyperparameters()}

    # --- the three hooks -----------------------------------------------------------------
    def psi(self, target: Target) -> torch.Tensor:
        """Positive logit ``P`` (with margin and scale)."""
        raise NotImplementedError

    def phi(self, logits: torch.Tensor) -> torch.Tensor:
        """Negative logits ``N_j``, elementwise over raw logits (default ``s·z``)."""
        return self.scale_value() * logits

    def combine(self, positive: torch.Tensor, lse_negative: torch.Tensor) -> torch.Tensor:
        """Per-sample loss from ``P`` and ``LSE(N)``: ``softplus(LSE(N) − P)`` (cross-entropy)."""
        return softplus(lse_negative - positive)

    def virtual_logit(self, target: Target) -> torch.Tensor | None:
        """An extra negative logit per row (only Virtual Softmax has one)."""
        return None

    # --- helpers the head and the reference share ---------------------------------------
    def scale_value(self) -> float:
        """The constant logit scale ``s`` (1 for losses that keep raw norms)."""
        return float(getattr(self, "scale", 1.0))

    def margin_free_positive(self, target: Target) -> torch.Tensor:
        """NormFace's positive logit ``s·c_y``: what ``margin_grad='detached'`` differentiates."""
        return self.scale_value() * target.logit

    def positive_logit(self, target: Target) -> torch.Tensor:
        """``psi`` under the loss's ``margin_grad`` policy.

        ``detached``: ``P = s·c + stopgrad(ψ(c) − s·c)`` — the forward value of the margin with
        the gradient of the margin-free logit.
        """
        positive = self.psi(target)
        if getattr(self, "margin_grad", "true") == "detached":
            plain = self.margin_free_positive(target)
            return plain + (positive - plain).detach()
        return positive

    def clamp_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """Clamp a cosine to ``[−1 + ε, 1 − ε]`` (finite √(1 − c²) and arccos gradients).

        ε is at least the dtype's resolution: 1 − 1e-7 rounds to 1 in bfloat16 and float16.
        """
        eps = max(self.eps, torch.finfo(cos.dtype).eps)
        return cos.clamp(-1.0 + eps, 1.0 - eps)

    def describe(self) -> str:
        """``name(field=value, ...)`` for logs."""
        values = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameter_values().items())
        return f"{self.name}({values})"


def _check_value(loss_name: str, spec: HyperparameterSpec, value: Any) -> None:
    where = f"{loss_name}.{spec.name}"
    domain = spec.domain
    if isinstance(domain, Choice):
        if not domain.contains(value):
            raise ValueError(f"{where} = {value!r} is not one of {domain}")
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"{where} = {value!r} must be {'an integer' if domain.integer else 'a number'} "
            f"in {domain}"
        )
    if domain.integer and not float(value).is_integer():
        raise ValueError(f"{where} = {value!r} must be an integer in {domain}")
    unit = f" {spec.unit}" if spec.unit else ""
    if not math.isfinite(value) or not domain.contains(value):
        raise ValueError(f"{where} = {value!r}{unit} is outside {domain}")
