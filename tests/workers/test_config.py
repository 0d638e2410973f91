"""Trial config: defaults round-trip through YAML; every bad field is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.config import (
    ConfigError,
    TrialConfig,
    load_trial_config,
    parse_trial_config,
    parse_yaml,
)


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    config = parse_trial_config({"loss": {"name": "cosface", "hyperparameters": {"margin": 0.3}},
                                 "head": {"sample_ratio": 0.25, "sampling": "batch"}})
    path = tmp_path / "trial.yaml"
    path.write_text(config.to_yaml())
    assert load_trial_config(path) == config
    assert config.loss.build().margin == 0.3


@pytest.mark.parametrize(("data", "expected"), [
    ({"head": {"sample_ratio": 0}}, "t.yaml: head.sample_ratio = 0 must be a number in (0.0, 1.0]"),
    ({"head": {"sample_ratio": 1.5}}, "head.sample_ratio = 1.5 must be a number in (0.0, 1.0]"),
    ({"head": {"sampling": "topk"}}, "head.sampling = 'topk' is not one of ['uniform', 'batch']"),
    ({"head": {"chunk_size": 0}}, "head.chunk_size = 0 must be an integer in [1, 16777216]"),
    ({"epochs": "two"}, "epochs = 'two' must be an integer in [1, 100000]"),
    ({"resources": {"num_workers": -1}}, "resources.num_workers = -1 must be an integer in [1,"),
    ({"optim": {"head_lr": -1}}, "optim.head_lr = -1 must be a number in (0.0, 10.0]"),
    ({"optim": {"optimizer": "lamb"}}, "optim.optimizer = 'lamb' is not one of ['sgd', 'adamw']"),
    ({"model": {"backbone": "vgg"}}, "model.backbone = 'vgg': not one of ['small_cnn'"),
    ({"loss": {"name": "arcfac"}}, "loss.name = 'arcfac': not one of ['"),
    ({"loss": {"name": "arcface", "hyperparameters": {"margin": 1.7}}},
     "loss: arcface.margin = 1.7 rad is outside [0, 1.2]"),
    ({"loss": {"name": "arcface", "hyperparameters": {"m": 1}}},
     "loss: arcface: unknown hyperparameter(s) ['m']"),
    ({"head": {"ratio": 0.1}}, "head.ratio is not a known field; allowed: ['chunk_size',"),
    ({"version": 2}, "version = 2 is not one of [1]"),
    ({"evaluation": {"max_identities": 1}},
     "evaluation.max_identities = 1 must be an integer in [2, 100000000]"),
    ({"evaluation": {"images_per_identity": 2.0}},
     "evaluation.images_per_identity = 2.0 must be an integer in [2, 1000000]"),
    ({"data": {"source": "omniglot", "heldout_fraction": 0.0}},
     "t.yaml: data.heldout_fraction = 0.0: must be a number in (0.0, 1.0) without pair_files"),
    ({"data": {"source": "omniglot", "heldout_fraction": -0.5}},
     "t.yaml: data.heldout_fraction = -0.5 must be a number in [0.0, 1.0)"),
    ({"batch_size": 10, "optim": {"grad_accumulation": 3}},
     "config: batch_size = 10 is not divisible by optim.grad_accumulation = 3"),
])
def test_bad_field_is_one_line_naming_it(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_trial_config(data, "t.yaml")
    assert len(error.value.lines) == 1
    assert expected in error.value.lines[0]


def test_evaluation_caps_default_and_accept_none() -> None:
    evaluation = parse_trial_config({}).evaluation
    assert (evaluation.max_identities, evaluation.images_per_identity) == (2000, 10)
    config = parse_trial_config({"evaluation": {"max_identities": None,
                                                "images_per_identity": None},
                                 "data": {"source": "omniglot", "heldout_fraction": 0.0,
                                          "pair_files": ["lfw.bin"]}})
    assert config.evaluation.max_identities is None
    assert config.evaluation.images_per_identity is None


def test_all_errors_reported_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        parse_trial_config({"head": {"sample_ratio": 0, "sampling": "x"}, "epochs": 0}, "t.yaml")
    assert len(error.value.lines) == 3
    assert all(line.startswith("t.yaml: ") for line in error.value.lines)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_trial_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: must be a mapping of fields, got list"):
        load_trial_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_trial_config(tmp_path / "bad.yaml")


def test_config_is_frozen() -> None:
    config = TrialConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.epochs = 3  # type: ignore[misc]


def test_yaml_reads_exponents_as_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("optim: {lr: 1e-3, weight_decay: 5E-4, head_lr: 2.5e+0}\n")
    optim = load_trial_config(path).optim
    assert (optim.lr, optim.weight_decay, optim.head_lr) == (1e-3, 5e-4, 2.5)
    assert parse_yaml("[1e3, 1.5e-2, 12, '1e3', 1e3x]", "x") == [1000.0, 0.015, 12, "1e3",
                                                                 "1e3x"]


def test_yaml_refuses_a_key_given_twice_naming_file_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("epochs: 2\nhead:\n  sample_ratio: 0.5\n  sample_ratio: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_trial_config(path)
    assert error.value.lines == [f"{path}:4: duplicate key 'sample_ratio' (each key may appear "
                                 "once per mapping)"]


def test_a_file_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_bytes("model: {backbone: café}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_trial_config(path)
    assert error.value.lines == [f"{path}: not UTF-8 text (byte 0xe9 at offset 21); save the "
                                 "config file as UTF-8"]


def test_a_field_a_flag_set_is_named_by_the_flag() -> None:
    flags = {"epochs": "--epochs", "head.sample_ratio": "--set head.sample_ratio",
             "data": "--set data"}
    with pytest.raises(ConfigError) as error:
        parse_trial_config({"epochs": 0, "head": {"sample_ratio": 2.0},
                            "data": {"num_identities": 1}, "seed": -1}, "command line", flags)
    assert sorted(error.value.lines) == [
        "--epochs = 0 must be an integer in [1, 100000]",
        "--set data: data.num_identities = 1 must be an integer in [2, inf]",
        "--set head.sample_ratio = 2.0 must be a number in (0.0, 1.0]",
        "command line: seed = -1 must be an integer in [0, 2147483647]"]


def test_name_is_not_a_loss_hyperparameter() -> None:
    with pytest.raises(ConfigError) as error:
        parse_trial_config({"loss": {"name": "arcface", "hyperparameters": {"name": "cosface"}}},
                           "t.yaml")
    assert len(error.value.lines) == 1
    assert "arcface: unknown hyperparameter(s) ['name']" in error.value.lines[0]
