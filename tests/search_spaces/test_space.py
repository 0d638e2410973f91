"""Search spaces: every shipped file loads; every error is reported at once; Optuna parity."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from search_spaces import SpaceError, load_space, load_spaces, parse_space, shipped_space_files
from workers.config import parse_trial_config

FAMILIES = {"softmax", "normface", "sphereface", "sphereface_r", "cosface", "arcface",
            "combined", "dsoftmax", "sosoftmax", "virtual", "curricularface", "magface",
            "adaface", "elasticface_arc", "elasticface_cos", "subcenter_arcface", "uniface"}


def test_every_family_ships_a_valid_space() -> None:
    spaces = load_spaces(shipped_space_files())
    assert {space.name for space in spaces} == FAMILIES
    for space in spaces:
        keys = {p.key for p in space.params}
        assert {"head.sample_ratio", "head.sampling"} <= keys, space.name
        # the extremes of every range build valid trial configs
        for parameter in space.params:
            for value in parameter.end_points():
                parse_trial_config(space.trial_config({parameter.key: value}), space.path)


def test_grid_points_are_the_product_of_the_choices_in_file_order() -> None:
    space = parse_space(_space({
        "loss.margin": {"distribution": "categorical", "choices": [0.3, 0.5]},
        "head.sampling": {"distribution": "categorical", "choices": ["uniform", "batch"]},
        "seed": {"distribution": "categorical", "choices": [0, 1, 2]}}), "g.yaml")
    points = space.grid_points()
    assert len(points) == 12
    assert points[:4] == [{"loss.margin": 0.3, "head.sampling": "uniform", "seed": s}
                          for s in (0, 1, 2)] + [{"loss.margin": 0.3, "head.sampling": "batch",
                                                  "seed": 0}]
    for values in points:
        parse_trial_config(space.trial_config(values), space.path)


def test_grid_points_refuse_ranges() -> None:
    space = parse_space(_space({
        "loss.margin": {"distribution": "uniform", "low": 0.2, "high": 0.6},
        "seed": {"distribution": "categorical", "choices": [0, 1]}}), "g.yaml")
    with pytest.raises(SpaceError) as error:
        space.grid_points()
    assert error.value.lines == ["g.yaml: params.loss.margin: distribution uniform; "
                                 "--sampler grid needs categorical params"]


def _space(params: dict, **top: object) -> dict:
    return {"version": 1, "name": "t", "loss": "arcface", "params": params, **top}


def test_all_errors_of_a_file_at_once() -> None:
    with pytest.raises(SpaceError) as error:
        parse_space(_space({
            "loss.margin": {"distribution": "uniform", "low": 0.2, "high": 1.7},
            "loss.scale": {"distribution": "log_uniform", "low": 0.0, "high": 64},
            "loss.m": {"distribution": "uniform", "low": 0, "high": 1},
            "head.sample_ratio": {"distribution": "uniform", "low": 0.0, "high": 1.0},
            "head.sampling": {"distribution": "categorical", "choices": ["uniform", "topk"]},
            "optim.lr": {"distribution": "gaussian"},
        }, extra=1), "bad.yaml")
    lines = error.value.lines
    assert any("bad.yaml: extra: unknown top-level key; allowed: ['defaults', 'description'" in x
               for x in lines)
    assert any("params.loss.scale.low = 0.0 must be > 0 for a log scale" in x for x in lines)
    assert any("params.loss.margin: 1.7 rad is outside" in x for x in lines)
    assert any("arcface has no hyperparameter 'm'" in x for x in lines)
    assert any("head.sample_ratio = 0.0 must be a number in (0.0, 1.0]" in x for x in lines)
    assert any("head.sampling = 'topk' is not one of" in x for x in lines)
    assert len(lines) == 7
    assert any("'gaussian' is not one of" in x for x in lines)
    assert all(x.startswith("bad.yaml: ") and "\n" not in x for x in lines)


@pytest.mark.parametrize(("params", "expected"), [
    ({"loss.margin": {"distribution": "uniform", "low": 0.2, "high": 1.7}},
     "bad.yaml: params.loss.margin: 1.7 rad is outside arcface.margin's allowed range [0, 1.2]"),
    ({"loss.m": {"distribution": "uniform", "low": 0, "high": 1}},
     "bad.yaml: params.loss.m: arcface has no hyperparameter 'm'; allowed: ['margin', "),
    ({"head.sample_ratio": {"distribution": "uniform", "low": 0.0, "high": 1.0}},
     "params.head.sample_ratio: head.sample_ratio = 0.0 must be a number in (0.0, 1.0]"),
    ({"head.sampling": {"distribution": "categorical", "choices": ["uniform", "topk"]}},
     "head.sampling = 'topk' is not one of ['uniform', 'batch']"),
    ({"optim.lr": {"distribution": "uniform", "low": 0.3, "high": 0.1}},
     "bad.yaml: params.optim.lr: low <= high must hold, but got low = 0.3, high = 0.1"),
    ({"model.width": {"distribution": "int", "low": 8.5, "high": 64}},
     "bad.yaml: params.model.width.low = 8.5 must be a finite integer"),
    ({"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 0.3, "choices": [1]}},
     "bad.yaml: params.optim.lr.choices: unknown field for uniform"),
    ({"head.sampling": {"distribution": "categorical", "choices": []}},
     "bad.yaml: params.head.sampling.choices = [] must be a non-empty list"),
    ({"optim.momentum": {"distribution": "uniform", "low": 0.5, "high": 1.0}},
     "optim.momentum = 1.0 must be a number in [0.0, 1.0)"),
    ({"nonsense.key": {"distribution": "uniform", "low": 0.5, "high": 1.0}},
     "nonsense is not a known field"),
])
def test_each_bad_parameter_names_file_key_value_and_range(params: dict, expected: str) -> None:
    with pytest.raises(SpaceError) as error:
        parse_space(_space(params), "bad.yaml")
    assert any(expected in line for line in error.value.lines), error.value.lines


@pytest.mark.parametrize(("top", "expected"), [
    ({"version": 2}, "version = 2 must be 1"),
    ({"loss": "arcfac"}, "loss: unknown loss 'arcfac'; known: ['adaface', 'arcface'"),
    ({"name": "has space"}, "name = 'has space' must be an identifier"),
    ({"params": {}}, "params must be a non-empty mapping"),
    ({"fixed": {"head": {"sample_ratio": 2}}}, "head.sample_ratio = 2 must be a number in"),
])
def test_bad_top_level(top: dict, expected: str) -> None:
    data = _space({"optim.lr": {"distribution": "uniform", "low": 0.1, "high": 0.2}})
    data.update(top)
    with pytest.raises(SpaceError) as error:
        parse_space(data, "bad.yaml")
    assert any(expected in line for line in error.value.lines), error.value.lines


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="no such search-space file"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(SpaceError, match="must be a mapping, got list"):
        load_space(tmp_path / "list.yaml")
    arcface = Path(shipped_space_files()[0])
    (tmp_path / "again.yaml").write_text(arcface.read_text())
    with pytest.raises(SpaceError, match="is used by more than one file"):
        load_spaces([arcface, tmp_path / "again.yaml"])


def test_conversion_suggests_what_a_hand_written_optuna_space_suggests(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_space({
        "loss.margin": {"distribution": "uniform", "low": 0.2, "high": 0.6},
        "loss.scale": {"distribution": "log_uniform", "low": 16.0, "high": 64.0},
        "model.width": {"distribution": "int", "low": 16, "high": 64, "step": 16},
        "optim.grad_accumulation": {"distribution": "int", "low": 1, "high": 8, "log": True},
        "head.sampling": {"distribution": "categorical", "choices": ["uniform", "batch"]},
    }), sort_keys=False))  # suggestion order follows the file
    space = load_space(path)

    def hand_written(trial: optuna.Trial) -> dict:
        return {"loss.margin": trial.suggest_float("loss.margin", 0.2, 0.6),
                "loss.scale": trial.suggest_float("loss.scale", 16.0, 64.0, log=True),
                "model.width": trial.suggest_int("model.width", 16, 64, step=16),
                "optim.grad_accumulation": trial.suggest_int("optim.grad_accumulation", 1, 8,
                                                             log=True),
                "head.sampling": trial.suggest_categorical("head.sampling", ["uniform", "batch"])}

    ours = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    theirs = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen_widths, seen_accumulation = set(), set()
    for _ in range(200):
        a, b = ours.ask(), theirs.ask()
        values = space.suggest(a)
        assert values == hand_written(b)
        seen_widths.add(values["model.width"])
        seen_accumulation.add(values["optim.grad_accumulation"])
        ours.tell(a, 0.0)
        theirs.tell(b, 0.0)
    assert seen_widths == {16, 32, 48, 64}  # integer bounds are inclusive
    assert seen_accumulation == set(range(1, 9))
    assert space.distributions() == {p: ours.trials[0].distributions[p]
                                     for p in ours.trials[0].params}


def test_trial_config_nests_dotted_keys_and_loss_hyperparameters() -> None:
    space = parse_space(_space({"loss.margin": {"distribution": "uniform", "low": 0.2,
                                                "high": 0.6}},
                               fixed={"loss": {"scale": 32.0}, "head": {"chunk_size": 64}}), "s")
    config = space.trial_config({"loss.margin": 0.3, "head.sample_ratio": 0.5},
                                base={"epochs": 3, "head": {"sampling": "batch"}})
    assert config == {"epochs": 3,
                      "head": {"sampling": "batch", "chunk_size": 64, "sample_ratio": 0.5},
                      "loss": {"name": "arcface",
                               "hyperparameters": {"scale": 32.0, "margin": 0.3}}}
    assert parse_trial_config(config).loss.build().margin == 0.3


#: the published settings (LOSSES.md) a warm-started study starts each family from
PUBLISHED = {
    "arcface": {"loss.scale": 64.0, "loss.margin": 0.5, "loss.margin_grad": "true"},
    "cosface": {"loss.scale": 64.0, "loss.margin": 0.35},
    "combined": {"loss.m1": 1.0, "loss.m2": 0.3, "loss.m3": 0.2},
    "magface": {"loss.l_a": 10.0, "loss.u_a": 110.0, "loss.l_m": 0.45, "loss.u_m": 0.8,
                "loss.lambda_g": 35.0},
    "adaface": {"loss.scale": 64.0, "loss.margin": 0.4, "loss.h": 0.333},
    "sphereface": {"loss.margin": 4, "loss.lambda_min": 5.0},
    "subcenter_arcface": {"loss.subcenters": 3, "loss.margin": 0.5,
                          "head.filter_threshold": 0.0},
}


def test_warm_start_is_the_published_setting_for_every_shipped_space() -> None:
    for space in load_spaces(shipped_space_files()):
        values = space.warm_start()
        assert set(values) == {p.key for p in space.params}, space.name
        # full softmax at the trial config's learning rate, then the loss's published values
        assert values["head.sample_ratio"] == 1.0 and values["optim.lr"] == 0.1, space.name
        assert values.items() >= PUBLISHED.get(space.name, {}).items(), space.name
        parse_trial_config(space.trial_config(values), space.path)
    arcface = load_space(shipped_space_files()[1])
    assert arcface.warm_start("arcface.") == {
        "arcface.loss.margin": 0.5, "arcface.loss.scale": 64.0, "arcface.loss.margin_grad": "true",
        "arcface.head.sample_ratio": 1.0, "arcface.head.sampling": "uniform",
        "arcface.optim.lr": 0.1}


def test_defaults_replace_the_published_values_and_must_lie_in_the_ranges() -> None:
    params = {"loss.margin": {"distribution": "uniform", "low": 0.2, "high": 0.4},
              "loss.subcenters": {"distribution": "int", "low": 1, "high": 5, "step": 2},
              "head.sampling": {"distribution": "categorical", "choices": ["uniform", "batch"]}}
    space = parse_space({**_space(params, defaults={"loss.margin": 0.3, "loss.subcenters": 5,
                                                    "head.sampling": "batch"}),
                         "loss": "subcenter_arcface"}, "ok.yaml")
    assert space.warm_start() == {"loss.margin": 0.3, "loss.subcenters": 5,
                                  "head.sampling": "batch"}
    with pytest.raises(SpaceError) as error:
        parse_space({**_space(params, defaults={
            "loss.margin": 0.5, "loss.subcenters": 2, "head.sampling": "topk",
            "optim.lr": 0.1}), "loss": "subcenter_arcface"}, "bad.yaml")
    assert error.value.lines == [
        "bad.yaml: defaults.loss.margin = 0.5 must be a number in [0.2, 0.4] (params.loss.margin)",
        "bad.yaml: defaults.loss.subcenters = 2 must be an integer in [1, 5] in steps of 2 "
        "(params.loss.subcenters)",
        "bad.yaml: defaults.head.sampling = 'topk' must be one of ['uniform', 'batch'] "
        "(params.head.sampling)",
        "bad.yaml: defaults.optim.lr: not a searched key; allowed: ['head.sampling', "
        "'loss.margin', 'loss.subcenters']"]
    # a range without the published value, or a key with no default, needs a defaults entry
    narrowed = parse_space(_space({
        "loss.margin": {"distribution": "uniform", "low": 0.2, "high": 0.4},
        "data.num_identities": {"distribution": "int", "low": 100, "high": 200}}), "narrow.yaml")
    with pytest.raises(SpaceError) as error:
        narrowed.warm_start()
    assert error.value.lines == [
        "narrow.yaml: params.loss.margin: its default 0.5 is not a number in [0.2, 0.4]; give "
        "defaults.loss.margin to warm-start this space",
        "narrow.yaml: params.data.num_identities: it has no default; give "
        "defaults.data.num_identities to warm-start this space"]


def test_defaults_must_build_a_trial_config_together() -> None:
    params = {"loss.normalized": {"distribution": "categorical", "choices": [True, False]},
              "head.filter_threshold": {"distribution": "categorical", "choices": [0.0, 0.4]}}
    data = {**_space(params, fixed={"loss": {"normalized": True}}), "loss": "virtual"}
    assert parse_space(data, "v.yaml").warm_start() == {"loss.normalized": True,
                                                        "head.filter_threshold": 0.0}
    with pytest.raises(SpaceError) as error:  # each value is allowed, the pair is not
        parse_space({**data, "defaults": {"loss.normalized": False,
                                          "head.filter_threshold": 0.4}}, "v.yaml")
    assert error.value.lines == ["v.yaml: defaults: config: head.filter_threshold = 0.4 needs a "
                                 "loss with cosine logits; virtual does not normalise both"]
