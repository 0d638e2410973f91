"""The trial config's ``head.filter_threshold`` (Partial FC's inter-class filter)."""

from __future__ import annotations

import pytest

from workers.config import ConfigError, parse_trial_config


def test_filter_threshold_range_and_loss() -> None:
    trial = parse_trial_config({"head": {"filter_threshold": 0.4}})  # arcface by default
    assert trial.head.filter_threshold == 0.4
    assert parse_trial_config({}).head.filter_threshold == 0.0
    with pytest.raises(ConfigError) as error:
        parse_trial_config({"head": {"filter_threshold": 1.5}})
    assert "head.filter_threshold" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        parse_trial_config({"loss": {"name": "softmax"}, "head": {"filter_threshold": 0.4}})
    assert error.value.lines == [
        "trial config: config: head.filter_threshold = 0.4 needs a loss with cosine logits; "
        "softmax does not normalise both"]
