"""The registry: names, lookup errors, duplicates, and defaults/ranges from LOSSES.md."""

from __future__ import annotations

import dataclasses

import pytest

import workers.losses as zoo
from workers.losses import (
    ArcFace,
    Choice,
    Interval,
    build_loss,
    get_loss_class,
    list_losses,
    register_loss,
)

# The ten rows of the LOSSES.md table, by registry name.
EXPECTED = {"softmax", "normface", "sphereface", "sphereface_r", "cosface", "arcface",
            "combined", "dsoftmax", "sosoftmax", "virtual",
            # "The modern zoo" of LOSSES.md
            "curricularface", "magface", "adaface", "elasticface_arc", "elasticface_cos",
            "subcenter_arcface", "uniface"}

# Defaults from the LOSSES.md table ("defaults" column).
DEFAULTS = {
    "normface": {"scale": 64.0},
    "sphereface": {"margin": 4, "lambda_base": 1000.0, "lambda_gamma": 0.12,
                   "lambda_power": 1.0, "lambda_min": 5.0},
    "sphereface_r": {"margin": 1.7},
    "cosface": {"scale": 64.0, "margin": 0.35},
    "arcface": {"scale": 64.0, "margin": 0.5},
    "combined": {"scale": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
    "dsoftmax": {"d": 0.9},
    "virtual": {"normalized": False},
}
SCALE_RANGE_DEFAULTS = {"sphereface_r": (30.0, 64.0), "dsoftmax": (30.0, 64.0)}  # "s=30..64"

# Search ranges from the LOSSES.md table: every one must lie inside the validated domain.
SEARCH_RANGES = {
    "normface": {"scale": (8.0, 64.0)},
    "sphereface": {"margin": (2, 4), "lambda_min": (1.0, 10.0)},
    "sphereface_r": {"margin": (1.2, 2.0)},
    "cosface": {"margin": (0.1, 0.5), "scale": (16.0, 64.0)},
    "arcface": {"margin": (0.2, 0.6)},
    "combined": {"m1": (0.9, 1.2), "m2": (0.0, 0.5), "m3": (0.0, 0.35)},
    "dsoftmax": {"d": (0.5, 0.95)},
    "sosoftmax": {"lambda_p": (0.0, 1.0), "lambda_n": (0.0, 1.0), "goal_n": (-0.2, 0.4)},
}


def test_list_losses_is_sorted_and_complete() -> None:
    names = list_losses()
    assert names == sorted(names)
    assert set(names) == EXPECTED


@pytest.mark.parametrize("name", list_losses())
def test_get_and_build(name: str) -> None:
    cls = get_loss_class(name)
    assert cls.name == name
    loss = build_loss(name)
    assert type(loss) is cls
    assert loss == cls()
    assert loss.describe().startswith(f"{name}(")
    for spec in cls.hyperparameters():
        assert isinstance(spec.domain, Interval | Choice)
        assert spec.domain.contains(spec.default), f"{name}.{spec.name} default outside domain"
        assert spec.doc, f"{name}.{spec.name} has no doc"
        assert getattr(loss, spec.name) == spec.default
        assert f"{spec.name}={spec.default!r}" in loss.describe()


@pytest.mark.parametrize("name", list_losses())
def test_losses_are_frozen(name: str) -> None:
    loss = build_loss(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.scale = 3.0  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_defaults_follow_losses_md(name: str) -> None:
    values = build_loss(name).hyperparameter_values()
    for field, want in DEFAULTS[name].items():
        assert values[field] == want, f"{name}.{field}: {values[field]!r} != LOSSES.md {want!r}"


@pytest.mark.parametrize("name", sorted(SCALE_RANGE_DEFAULTS))
def test_scale_defaults_within_losses_md_range(name: str) -> None:
    low, high = SCALE_RANGE_DEFAULTS[name]
    assert low <= build_loss(name).scale <= high


@pytest.mark.parametrize("name", sorted(SEARCH_RANGES))
def test_search_ranges_of_losses_md_are_valid(name: str) -> None:
    specs = {s.name: s for s in get_loss_class(name).hyperparameters()}
    for field, (low, high) in SEARCH_RANGES[name].items():
        for value in (low, high):
            assert specs[field].domain.contains(value), (name, field, value)
            build_loss(name, **{field: value})


def test_unknown_loss_lists_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        build_loss("arcfase")
    message = info.value.args[0]
    assert message == f"unknown loss 'arcfase'; known: {list_losses()}"
    with pytest.raises(KeyError, match="unknown loss"):
        get_loss_class("")


@pytest.mark.parametrize("name", list_losses())
def test_unknown_hyperparameter(name: str) -> None:
    with pytest.raises(ValueError) as info:
        build_loss(name, margn=0.5)
    message = str(info.value)
    assert "\n" not in message
    assert name in message and "margn" in message
    for spec in get_loss_class(name).hyperparameters():
        assert spec.name in message, f"allowed name {spec.name} not listed: {message}"


def test_register_rejects_duplicates() -> None:
    before = list_losses()
    with pytest.raises(ValueError, match="'arcface' is already registered"):
        register_loss(ArcFace)

    @dataclasses.dataclass(frozen=True)
    class Impostor(ArcFace):
        """Formula: none."""

    with pytest.raises(ValueError, match="already registered"):
        register_loss(Impostor)
    assert list_losses() == before
    assert get_loss_class("arcface") is ArcFace


def test_public_surface() -> None:
    for name in zoo.__all__:
        assert hasattr(zoo, name), name
    assert {"build_loss", "list_losses", "get_loss_class", "register_loss",
            "reference_loss"} <= set(zoo.__all__)
