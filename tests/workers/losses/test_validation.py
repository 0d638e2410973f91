"""Construction-time validation (STYLE items 2 and 15), generated from every declared domain.

For every registered loss and every hyperparameter: values just outside the range, far
outside, of the wrong type (strings, bools for numbers, numbers for bools, None, lists),
non-integers for integer domains, NaN and ±inf must raise a one-line ``ValueError`` naming
the loss, the field, the value and the allowed range. The boundaries themselves are valid and
give a finite loss.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from _cases import expand_centres, random_batch

from workers.losses import (
    Choice,
    HyperparameterSpec,
    Interval,
    build_loss,
    get_loss_class,
    list_losses,
    reference_loss,
)


def _invalid_values(spec: HyperparameterSpec) -> list[Any]:
    domain = spec.domain
    common: list[Any] = [None, math.nan, [spec.default], {"value": spec.default}]
    if isinstance(domain, Choice):
        values = [*common, "bogus", ""]
        if all(isinstance(o, bool) for o in domain.options):
            values += ["true", "True", 1, 0, 1.0]
        if all(isinstance(o, str) for o in domain.options):
            values += [True, False, 1, *(o.upper() for o in domain.options)]
        return values
    assert isinstance(domain, Interval)
    low, high = domain.low, domain.high
    values = [*common, math.inf, -math.inf, True, False, str(spec.default), "abc",
              low - 1000.0, high + 1000.0]
    if domain.integer:
        values += [low - 1, high + 1, low + 0.5, high - 0.5, math.nextafter(float(low), math.inf)]
    else:
        values += [high + 1.0, math.nextafter(high, math.inf)]
        values.append(low if domain.low_open else math.nextafter(low, -math.inf))
    return values


INVALID = [
    pytest.param(name, spec, value, id=f"{name}-{spec.name}-{value!r}")
    for name in list_losses()
    for spec in get_loss_class(name).hyperparameters()
    for value in _invalid_values(spec)
]


def test_invalid_cases_cover_every_hyperparameter() -> None:
    covered = {(name, spec.name) for name, spec, _ in (p.values for p in INVALID)}
    declared = {(n, s.name) for n in list_losses() for s in get_loss_class(n).hyperparameters()}
    assert covered == declared
    print(f"{len(INVALID)} invalid hyperparameter values over {len(declared)} hyperparameters "
          f"of {len(list_losses())} losses")
    assert len(INVALID) >= 10 * len(declared)


@pytest.mark.parametrize(("name", "spec", "value"), INVALID)
def test_invalid_value_raises_one_line(name: str, spec: HyperparameterSpec, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        build_loss(name, **{spec.name: value})
    message = str(info.value)
    assert "\n" not in message, message
    for part in (name, spec.name, repr(value), str(spec.domain)):
        assert part in message, f"{part!r} missing from {message!r}"


def _boundaries(spec: HyperparameterSpec) -> list[Any]:
    domain = spec.domain
    if isinstance(domain, Choice):
        return list(domain.options)
    assert isinstance(domain, Interval)
    low = math.nextafter(domain.low, math.inf) if domain.low_open else domain.low
    if domain.integer:
        return [int(low), int(domain.high)]
    return [low, domain.high]


BOUNDARIES = [
    pytest.param(name, spec.name, value, id=f"{name}-{spec.name}-{value!r}")
    for name in list_losses()
    for spec in get_loss_class(name).hyperparameters()
    for value in _boundaries(spec)
]


@pytest.mark.parametrize(("name", "field", "value"), BOUNDARIES)
def test_boundaries_are_valid_and_finite(name: str, field: str, value: Any) -> None:
    loss = build_loss(name, **{field: value})
    assert getattr(loss, field) == value
    embeddings, weights, labels = random_batch(6, 9, 8, seed=0)
    embeddings[0] = weights[labels[0]]  # cos = 1 exactly
    weights = expand_centres(loss, weights)
    embeddings.requires_grad_()
    weights.requires_grad_()
    value_ = reference_loss(loss, embeddings, weights, labels, step=10)
    value_.backward()
    assert torch.isfinite(value_)
    assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all()
    assert weights.grad is not None and torch.isfinite(weights.grad).all()


def test_integral_float_for_integer_domain_works() -> None:
    """An integer domain given 4.0 (a YAML float, say) either builds a working loss or raises."""
    loss = build_loss("sphereface", margin=4.0)
    embeddings, weights, labels = random_batch(4, 7, 5, seed=0)
    torch.testing.assert_close(reference_loss(loss, embeddings, weights, labels),
                               reference_loss(build_loss("sphereface", margin=4), embeddings,
                                              weights, labels), atol=0, rtol=0)


def test_dsoftmax_weights_not_both_zero() -> None:
    build_loss("dsoftmax", w_intra=0.0)
    build_loss("dsoftmax", w_inter=0.0)
    with pytest.raises(ValueError) as info:
        build_loss("dsoftmax", w_intra=0.0, w_inter=0)
    message = str(info.value)
    assert "\n" not in message
    assert "dsoftmax" in message and "w_intra" in message and "w_inter" in message


def test_direct_construction_validates_too() -> None:
    cls = get_loss_class("arcface")
    with pytest.raises(ValueError, match=r"^arcface\.margin = -0\.1 rad is outside \[0, 1\.2\]$"):
        cls(margin=-0.1)
