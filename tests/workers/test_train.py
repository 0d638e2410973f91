"""``python -m workers.train``: a config file end to end, and bad input before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from workers.config import parse_trial_config

pytestmark = pytest.mark.slow

CONFIG = {
    "epochs": 1, "batch_size": 32,
    "data": {"source": "synthetic", "num_identities": 96, "samples_per_identity": 12,
             "heldout_identities": 48},
    "model": {"backbone": "small_cnn", "embedding_dim": 64, "width": 16},
    "resources": {"num_workers": 1, "cpus_per_worker": 0.45},
    "evaluation": {"num_pairs": 600},
}


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "workers.train", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_workers_train_cli_runs_a_config_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text(parse_trial_config(CONFIG).to_yaml())
    output = tmp_path / "out"
    process = _run("--config", str(config), "--workers", "2", "--output", str(output))
    assert process.returncode == 0, process.stderr[-3000:]
    centres = torch.load(output / "class_centres.pt")
    assert centres.shape == (96, 64)
    assert set(torch.load(output / "backbone.pt")) >= {"neck.1.weight"}
    written = parse_trial_config(yaml.safe_load((output / "trial.yaml").read_text()))
    assert written.resources.num_workers == 2
    assert json.loads((output / "metrics.json").read_text())["epoch"] == 0


def test_cli_rejects_a_bad_config_before_ray(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("head:\n  sample_ratio: 0\n")
    process = _run("--config", str(config))
    assert process.returncode == 2
    assert "bad.yaml: head.sample_ratio = 0 must be a number in (0.0, 1.0]" in process.stderr
    assert "ray" not in process.stderr.lower()
