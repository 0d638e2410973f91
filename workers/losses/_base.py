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

The modern losses need a little more, and get it through one idea, *per-row context*: once
per step ``prepare(batch, state)`` sees the whole global batch (every row's target logit and
embedding norm, detached, the same on every rank), updates the loss's state (``LossState``:
EMA buffers, learnable scalars) and returns a ``(B, k)`` tensor of per-row values that
reaches ``psi`` (``Target.context``, this rank's rows) and ``phi`` (``phi(z, context)``,
every row). Three class attributes complete it: ``reduction`` (``'lse'`` or ``'sum'`` of the
per-class negative terms), ``subcenters`` (K centre rows per class, max over K) and
``regularizer`` (a per-row term added to the loss).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

MarginGrad = Literal["true", "detached"]
MARGIN_GRAD_CHOICES: tuple[str, ...] = ("true", "detached")
Reduction = Literal["lse", "sum"]


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
    #: ``(B, k)`` per-row context from ``MarginLoss.prepare`` (these rows), or None: the loss
    #: then prepares these rows as a batch of their own, from its initial state, no seed
    context: torch.Tensor | None = None


@dataclass(frozen=True)
class Batch:
    """The whole global batch as ``MarginLoss.prepare`` sees it (identical on every rank).

    ``target``: every row's raw target logit (detached); ``embedding_norm``: every row's ‖x‖
    (detached); ``step``: the optimisation step; ``seed``: the run's seed — per-row random
    draws come from ``(seed, step, global row)`` — or None for no randomness; ``update``:
    whether this step updates the loss's state (training) or only reads it.
    """

    target: torch.Tensor
    embedding_norm: torch.Tensor
    step: int = 0
    seed: int | None = None
    update: bool = True

    @classmethod
    def of(cls, target: Target) -> Batch:
        """``target``'s rows as a batch of their own, without randomness or state update."""
        return cls(target.logit.detach(), target.embedding_norm.detach(), target.step, None,
                   update=False)


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
    #: how the negatives' terms N_j are reduced: ``'lse'`` (log-sum-exp, the softmax family)
    #: or ``'sum'`` (a sum of per-class terms, UniFace's UCE)
    reduction: ClassVar[Reduction] = "lse"
    #: centre rows per class (Sub-center ArcFace: cos θ_j = max over the class's K rows)
    subcenters: ClassVar[int] = 1
    #: names in ``initial_state`` that are learnable (parameters, not buffers)
    learnable_state: ClassVar[tuple[str, ...]] = ()
    #: whether ``phi`` takes the per-row context: ``phi(z, context)`` (else ``phi(z)``)
    context_in_phi: ClassVar[bool] = False
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
        """Negative logits ``N_j``, elementwise over raw logits (default ``s·z``).

        A loss with ``context_in_phi`` defines ``phi(logits, context)``: ``context`` is the
        ``(B, k)`` per-row context of ``prepare`` for the rows of ``logits`` (B × classes), so
        row i's logits may depend on ``context[i]``; with ``reduction = 'sum'`` φ returns the
        per-class terms that are summed.
        """
        return self.scale_value() * logits

    def negatives(self, logits: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """``phi(logits, context)`` or ``phi(logits)``, as the loss declares."""
        if self.context_in_phi:
            return self.phi(logits, context)  # type: ignore[call-arg]
        return self.phi(logits)

    def combine(self, positive: torch.Tensor, lse_negative: torch.Tensor) -> torch.Tensor:
        """Per-sample loss from ``P`` and ``LSE(N)``: ``softplus(LSE(N) − P)`` (cross-entropy)."""
        return softplus(lse_negative - positive)

    def virtual_logit(self, target: Target) -> torch.Tensor | None:
        """An extra negative logit per row (only Virtual Softmax has one)."""
        return None

    # --- per-row context and state (only the losses that need them override these) ---------
    def initial_state(self, num_classes: int, sample_ratio: float) -> dict[str, float]:
        """The loss's state before the first step, by name (empty: stateless)."""
        return {}

    def prepare(self, batch: Batch, state: Any) -> torch.Tensor | None:
        """Once per step, from the global ``batch``: update ``state`` (a ``LossState``) in
        place when ``batch.update`` and return the ``(B, k)`` per-row context (or None)."""
        return None

    def regularizer(self, target: Target) -> torch.Tensor | None:
        """A per-row term added to the per-sample loss (MagFace's λ_g·g(‖x‖)), or None."""
        return None

    @property
    def needs_batch(self) -> bool:
        """Whether ``prepare`` must see the global batch each step."""
        return type(self).prepare is not MarginLoss.prepare

    @property
    def cosine_logits(self) -> bool:
        """Whether the raw logits are cosines (both x and W normalised)."""
        return self.normalize_embeddings and self.normalize_weights

    def context_for(self, target: Target) -> torch.Tensor | None:
        """``target.context``, or the context of ``target``'s rows as a batch of their own (a
        fresh initial state, no randomness) when the loss needs one and none was given."""
        if target.context is not None or not self.needs_batch:
            return target.context
        from ._state import LossState  # the state module imports this one

        state = LossState(self, 1, 1.0, device=target.logit.device,
                          dtype=torch.promote_types(target.logit.dtype, torch.float32))
        context = self.prepare(Batch.of(target), state)
        return None if context is None else context.detach()

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
