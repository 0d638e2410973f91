"""Two trials at once, each with its own Ray Data ingest, on this 2-core machine: the study's
CPU budget leaves room for both pipelines and it finishes instead of starving or hanging, with
both trials learning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from study.driver import concurrency_limit
from study.pareto import run_trial_config
from study.run import build_parser, options_from_args
from tests.baselines import assert_learned, assert_loss_falls, logged_epoch_losses
from tests.services import ROOT, study_env
from workers.data import synthetic_identities
from workers.data.pack import pack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_concurrent_trials_with_ray_data_ingest_finish(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    # full-difficulty faces: the untrained network is near chance, so learning shows
    pack(synthetic_identities(96, 12, image_size=32, seed=0), shards,
         source={"kind": "synthetic"}, heldout_fraction=0.25, seed=0, shard_bytes=20_000)
    flags = ["--name", "shards", "--storage", str(tmp_path / "studies"),
             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--space", "normface", "--trials", "2", "--concurrent", "2", "--epochs", "2",
             "--scheduler", "none", "--workers", "2", "--cpus-per-worker", "0.25",
             "--batch-size", "32", "--data", "shards", "--data-path", str(shards),
             "--set", "data.ray_data_cpus=0.4", "--set", "model.width=16",
             "--set", "evaluation.num_pairs=400"]
    # each trial: 0.1 (its function) + 2 × 0.25 (workers) + 0.4 (Ray Data) = 1 of 2 CPUs
    assert concurrency_limit(options_from_args(build_parser().parse_args(flags)), {"CPU": 2.0}) == 2
    process = subprocess.run([sys.executable, str(ROOT / "study" / "run.py"), *flags],
                             capture_output=True, text=True, timeout=800, env=study_env())
    assert process.returncode == 0, process.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shards")
    children = [run for run in client.search_runs([experiment.experiment_id])
                if MLFLOW_PARENT_RUN_ID in run.data.tags]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        metrics = child.data.metrics
        assert {"verification_accuracy", "data_wait_fraction", "samples_per_second"} <= set(
            metrics)
        assert 0.0 <= metrics["data_wait_fraction"] < 1.0
        # each trial learnt (measured: loss 3.8 → 0.9 and 4.6 → 1.2; verification 0.65, the
        # untrained network of its config, → 0.78)
        assert_loss_falls(logged_epoch_losses(client, child.info.run_id), 0.5)
        assert_learned(run_trial_config(client, child.info.run_id), metrics, 0.06)
    # both trials ran at the same time
    first, second = sorted(children, key=lambda run: run.info.start_time)
    assert second.info.start_time < first.info.end_time
