"""The loss zoo: every margin-softmax loss as ψ, φ, normalisation and combination.

``build_loss(name, **hyperparameters)`` constructs a validated loss; ``list_losses()`` names
them; ``reference_loss`` is the single-process ground truth with materialised logits.
"""

from __future__ import annotations

from typing import Any

from ._base import (
    Batch,
    Choice,
    HyperparameterSpec,
    Interval,
    MarginLoss,
    Target,
)
from ._reference import check_filter_threshold, filter_negatives, raw_logits, reference_loss
from ._state import LossState
from .adaface import AdaFace
from .arcface import ArcFace
from .combined import CombinedMargin
from .cosface import CosFace
from .curricularface import CurricularFace
from .dsoftmax import DSoftmax
from .elasticface import ElasticFaceArc, ElasticFaceCos
from .magface import MagFace
from .normface import NormFace
from .softmax import Softmax
from .sosoftmax import SOSoftmax
from .sphereface import SphereFace
from .sphereface_r import SphereFaceR
from .subcenter_arcface import SubcenterArcFace
from .uniface import UniFace
from .virtual import VirtualSoftmax

__all__ = [
    "AdaFace",
    "ArcFace",
    "Batch",
    "Choice",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DSoftmax",
    "ElasticFaceArc",
    "ElasticFaceCos",
    "HyperparameterSpec",
    "Interval",
    "LossState",
    "MagFace",
    "MarginLoss",
    "NormFace",
    "SOSoftmax",
    "Softmax",
    "SphereFace",
    "SphereFaceR",
    "SubcenterArcFace",
    "Target",
    "UniFace",
    "VirtualSoftmax",
    "build_loss",
    "check_filter_threshold",
    "filter_negatives",
    "get_loss_class",
    "list_losses",
    "raw_logits",
    "reference_loss",
    "register_loss",
]

_REGISTRY: dict[str, type[MarginLoss]] = {}


def register_loss(cls: type[MarginLoss]) -> type[MarginLoss]:
    """Register a loss class under ``cls.name``; a duplicate name is an error."""
    if cls.name in _REGISTRY:
        raise ValueError(f"a loss named {cls.name!r} is already registered "
                         f"({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def list_losses() -> list[str]:
    """Names of every registered loss, sorted."""
    return sorted(_REGISTRY)


def get_loss_class(name: str) -> type[MarginLoss]:
    """The class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known: {list_losses()}") from None


def build_loss(name: str, /, **hyperparameters: Any) -> MarginLoss:
    """Construct the loss ``name``; unknown or out-of-range hyperparameters (``name`` among
    them) raise one line."""
    cls = get_loss_class(name)
    known = {spec.name for spec in cls.hyperparameters()}
    unknown = sorted(set(hyperparameters) - known)
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; allowed: {sorted(known)}")
    return cls(**hyperparameters)


for _cls in (Softmax, NormFace, SphereFace, SphereFaceR, CosFace, ArcFace, CombinedMargin,
             DSoftmax, SOSoftmax, VirtualSoftmax, CurricularFace, MagFace, AdaFace, ElasticFaceArc,
             ElasticFaceCos, SubcenterArcFace, UniFace):
    register_loss(_cls)
