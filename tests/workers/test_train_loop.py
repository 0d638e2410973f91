"""The Ray Train trial: real local Ray, 2 gloo workers on CPU, the synthetic default data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from workers.config import TrialConfig, parse_trial_config
from workers.head import read_head_manifest
from workers.train import build_trainer, check_resources
from workers.train_loop import (
    CHECKPOINT_FILE,
    HEAD_DIR,
    _schedule,
    build_runtime,
    load_checkpoint,
    save_checkpoint,
    train_epoch,
)

pytestmark = pytest.mark.slow

#: a small synthetic problem: two short epochs fit in ~20 s of training on 2 cores
SMALL_DATA = {"source": "synthetic", "num_identities": 96, "samples_per_identity": 12,
              "heldout_identities": 48}


def _trial(**overrides: Any) -> TrialConfig:
    data: dict[str, Any] = {
        "epochs": 2, "batch_size": 32, "seed": 0, "data": SMALL_DATA,
        "loss": {"name": "arcface", "hyperparameters": {"scale": 32.0, "margin": 0.3}},
        "model": {"backbone": "small_cnn", "embedding_dim": 64, "width": 16},
        "optim": {"lr": 0.1, "warmup_epochs": 0.2},
        "resources": {"num_workers": 2, "cpus_per_worker": 0.45},
        "evaluation": {"num_pairs": 600},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return parse_trial_config(data)


def _fit(trial: TrialConfig, storage: Path, name: str, resume_from: str | None = None) -> Any:
    return build_trainer(trial, storage, name=name, resume_from=resume_from).fit()


def _head_rows(checkpoint: Path, key: str | None = None) -> torch.Tensor:
    """The logical C × D weight (``key=None``) or optimizer state ``key`` of a checkpoint,
    joined from its shard files (a test may hold the whole matrix)."""
    manifest = read_head_manifest(checkpoint / HEAD_DIR)
    parts = [torch.load(checkpoint / HEAD_DIR / shard.file) for shard in manifest.shards]
    return torch.cat([part["weight"] if key is None else part["optimizer"][key]
                      for part in parts])


EXPECTED_METRICS = {
    "loss", "intra_positive_logit", "inter_negative_lse", "verification_accuracy",
    "verification_accuracy_std", "roc_auc", "tar_at_far_1e-01", "tar_at_far_1e-02",
    "heldout_intra_compactness", "heldout_inter_separation_mean",
    "heldout_inter_separation_p99", "centre_inter_separation_mean", "samples_per_second",
    "epoch_train_seconds", "eval_seconds", "head_flops_per_sample", "head_bytes_per_step",
    "ddp_bytes_per_step", "peak_memory_bytes", "sampled_classes", "grad_norm", "epoch", "step",
    "restarts",
}


def test_two_workers_two_epochs_report_every_metric(ray_local: Any, tmp_path: Path) -> None:
    result = _fit(_trial(checkpoint__keep=1), tmp_path, "full")
    metrics = result.metrics
    assert metrics["diverged"] == 0 and metrics["epoch"] == 1 and metrics["restarts"] == 0
    assert EXPECTED_METRICS <= set(metrics), EXPECTED_METRICS - set(metrics)
    assert metrics["verification_accuracy"] > 0.6, metrics["verification_accuracy"]
    # 96 classes over 2 shards, all sampled: K = 96, D = 64
    assert metrics["head_flops_per_sample"] == pytest.approx(8 * 64 * 96)
    assert metrics["head_bytes_per_step"] > 0 and metrics["peak_memory_bytes"] > 1e7
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=False)
        manifest = read_head_manifest(Path(directory) / HEAD_DIR, 96, 64)
        # both workers' shard files landed in the one checkpoint directory
        assert _head_rows(Path(directory)).shape == (96, 64)
    assert manifest.world_size == 2 and manifest.row_state == ["momentum_buffer"]
    assert state["world_size"] == 2 and state["epoch"] == 2
    # rank 0's state holds no head rows: not the weight, not its momentum
    (head_index,) = state["optimizer"]["param_groups"][1]["params"]
    assert "head_weight" not in state and head_index not in state["optimizer"]["state"]
    # checkpoint.keep = 1: storage holds the last of the two epochs' checkpoints only
    assert len([path for path in (tmp_path / "full").glob("checkpoint_*") if path.is_dir()]) == 1


def test_sample_ratio_cuts_head_flops_by_its_factor(ray_local: Any, tmp_path: Path) -> None:
    data = {**SMALL_DATA, "num_identities": 800, "samples_per_identity": 2}
    sampled = _fit(_trial(data=data, epochs=1, head__sample_ratio=0.1, batch_size=8), tmp_path,
                   "sampled").metrics
    # per shard of 400 classes: int(0.1·400) = 40 ≥ the ≤ 16 classes of a global batch
    assert sampled["sampled_classes"] == pytest.approx(80.0)
    assert sampled["head_flops_per_sample"] == pytest.approx(8 * 64 * 80)
    assert sampled["head_flops_per_sample"] / (8 * 64 * 800) == pytest.approx(0.1)


def test_checkpoint_at_two_workers_resumes_at_three_and_one(ray_local: Any,
                                                             tmp_path: Path) -> None:
    first = _fit(_trial(epochs=1), tmp_path, "two")
    with first.checkpoint.as_directory() as directory:
        saved_dir = Path(directory)
        saved = torch.load(saved_dir / CHECKPOINT_FILE, weights_only=False)
        # epoch 1 of 1 is done: three workers restore the checkpoint (each reading its rows)
        # and report it again from what they restored, without training
        three = _fit(_trial(epochs=1, resources__num_workers=3), tmp_path, "three",
                     resume_from=directory)
        resumed = _fit(_trial(epochs=2, resources__num_workers=1), tmp_path, "one",
                       resume_from=directory)
        with three.checkpoint.as_directory() as restored_dir:
            restored = Path(restored_dir)
            assert read_head_manifest(restored / HEAD_DIR).world_size == 3
            for key in (None, "momentum_buffer"):
                assert torch.equal(_head_rows(restored, key), _head_rows(saved_dir, key)), key
            state = torch.load(restored / CHECKPOINT_FILE, weights_only=False)
        assert state["step"] == saved["step"] and state["world_size"] == 3
        for name, value in saved["backbone"].items():
            assert torch.equal(state["backbone"][name], value), name
        with resumed.checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=False)
            trained = _head_rows(Path(directory))
        assert not torch.equal(trained, _head_rows(saved_dir))  # training continued
    metrics = resumed.metrics
    assert metrics["epoch"] == 1 and metrics["diverged"] == 0
    # one worker takes the whole global batch per step: 96·12 / 32 = 36 steps per epoch
    assert metrics["step"] == saved["step"] + 36
    assert state["world_size"] == 1 and trained.shape == (96, 64)


def test_diverging_config_ends_as_diverged_without_retries(ray_local: Any,
                                                          tmp_path: Path) -> None:
    trial = _trial(loss={"name": "softmax"}, optim={"lr": 10.0, "grad_clip_norm": None,
                                                    "momentum": 0.9})
    result = _fit(trial, tmp_path, "diverge")
    assert result.error is None
    assert result.metrics["diverged"] == 1
    assert result.metrics["epoch"] == 0 and result.metrics["diverged_step"] >= 0


def test_resources_are_checked_before_workers_start() -> None:
    trial = _trial(resources__num_workers=8, resources__cpus_per_worker=1.0)
    with pytest.raises(ValueError, match=r"resources.num_workers = 8 × resources.cpus_per_worker"
                                         r" = 1.0 needs 8 CPUs; the cluster has 2"):
        check_resources(trial, {"CPU": 2.0})


def test_checkpoint_round_trip_restores_every_piece(tmp_path: Path) -> None:
    trial = _trial(epochs=2, resources__num_workers=1, batch_size=16,
                   data={**SMALL_DATA, "num_identities": 24, "samples_per_identity": 4})
    runtime = build_runtime(trial, 0, 1, torch.device("cpu"), None)
    train_epoch(runtime, 0)
    runtime.epoch = 1
    save_checkpoint(runtime, tmp_path)
    fresh = build_runtime(trial, 0, 1, torch.device("cpu"), None)
    assert not torch.equal(fresh.head.weight, runtime.head.weight)
    load_checkpoint(fresh, tmp_path)
    assert torch.equal(fresh.head.weight, runtime.head.weight)
    momentum = fresh.optimizer.state[fresh.head.weight]["momentum_buffer"]
    assert torch.equal(momentum, runtime.optimizer.state[runtime.head.weight]["momentum_buffer"])
    for name, value in runtime.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[name], value), name
    assert (fresh.step, fresh.epoch) == (runtime.step, 1) and runtime.step > 0
    assert fresh.scheduler.last_epoch == runtime.scheduler.last_epoch
    # the next epoch continues identically from either runtime
    assert train_epoch(fresh, 1)["loss"] == pytest.approx(train_epoch(runtime, 1)["loss"],
                                                          rel=1e-6)


def test_schedule_warms_up_then_decays() -> None:
    cosine = _schedule(_trial(optim={"warmup_epochs": 1.0}), total_steps=20, steps_per_epoch=5)
    assert [round(cosine(t), 3) for t in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert cosine(5) == pytest.approx(1.0) and cosine(20) == pytest.approx(0.0, abs=1e-12)
    assert cosine(12.5) == pytest.approx(0.5)
    poly = _schedule(_trial(optim={"schedule": "polynomial", "poly_power": 2.0}),
                     total_steps=10, steps_per_epoch=5)
    assert poly(5) == pytest.approx(0.25)
