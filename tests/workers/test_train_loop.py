"""The Ray Train trial: real local Ray, gloo workers on CPU, real data formats.

Every fit that trains must beat the untrained network of its own config and seed
(``tests.baselines``) and lower its training loss. Between them the fits run the loop with
Omniglot plus a ``.bin`` pair set evaluated each epoch, gradient accumulation under DDP
(``no_sync``), AdamW with frozen unsampled rows, RecordIO with JPEG payloads, and resumes at
other worker counts whose restored state is compared tensor by tensor with the saved one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.baselines import assert_learned, assert_loss_falls, kept_epoch_losses
from tests.workers.data._data_helpers import encode_jpeg, encode_png
from workers.config import TrialConfig, parse_trial_config
from workers.data import (
    alphabet_of_class,
    decode_image_pixels,
    epoch_batches,
    resolve_omniglot_path,
    split_identities,
    synthetic_identities,
    write_pairs_bin,
    write_recordio,
)
from workers.data.pack import encoded_image
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
#: Omniglot with 80 % of its characters held out (whole alphabets): an epoch trains on 192
#: characters × 20 drawings at 16 × 16; evaluation embeds 100 held-out characters × 10
OMNIGLOT = {"source": "omniglot", "image_size": 16, "heldout_fraction": 0.8}
OMNIGLOT_EVALUATION = {"num_pairs": 600, "max_identities": 100}
#: RecordIO faces: 145 synthetic identities × 12 JPEGs, 48 held out, so 97 train classes
#: (shards of 49/48 rows at 2 workers, 33/32/32 at 3)
RECORDIO_IDENTITIES, RECORDIO_SAMPLES, RECORDIO_CLASSES = 145, 12, 97


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


@pytest.fixture(scope="module")
def omniglot_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.bin`` pair set of Omniglot's held-out alphabets (as ``OMNIGLOT`` splits them at
    seed 0): 150 genuine and 150 impostor pairs of drawings, seeded, as PNG."""
    with np.load(resolve_omniglot_path()) as archive:
        paper = archive["images"]  # (964, 20, 105, 105), True = paper
    _, heldout = split_identities(alphabet_of_class(), OMNIGLOT["heldout_fraction"], seed=0)
    rng = np.random.default_rng(0)
    images, issame = [], []
    for same in [True, False] * 150:
        first, second = rng.choice(heldout.numpy(), 2, replace=False)
        drawers = rng.choice(20, 2, replace=False)
        for character, drawer in zip((first, first if same else second), drawers, strict=True):
            images.append(encode_png(np.where(paper[character, drawer], 0, 255).astype(np.uint8)))
        issame.append(same)
    path = tmp_path_factory.mktemp("pairs") / "omniglot_heldout.bin"
    write_pairs_bin(path, images, issame)
    return path


@pytest.fixture(scope="module")
def recordio_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An insightface RecordIO set of synthetic identities, each image a grayscale JPEG."""
    faces = synthetic_identities(RECORDIO_IDENTITIES, RECORDIO_SAMPLES, image_size=32, seed=0)
    jpegs = [encode_jpeg(decode_image_pixels(encoded_image(faces, index), 32, 1, "")[0].numpy())
             for index in range(len(faces))]
    path = tmp_path_factory.mktemp("recordio")
    write_recordio(path, jpegs, faces.labels.tolist(), (32, 32))
    return path


EXPECTED_METRICS = {
    "loss", "intra_positive_logit", "inter_negative_lse", "verification_accuracy",
    "verification_accuracy_std", "roc_auc", "tar_at_far_1e-01", "tar_at_far_1e-02",
    "heldout_intra_compactness", "heldout_inter_separation_mean",
    "heldout_inter_separation_p99", "centre_inter_separation_mean", "samples_per_second",
    "epoch_train_seconds", "eval_seconds", "head_flops_per_sample", "head_bytes_per_step",
    "ddp_bytes_per_step", "peak_memory_bytes", "sampled_classes", "grad_norm", "epoch", "step",
    "restarts", "pairs0_verification_accuracy", "pairs0_roc_auc", "head_seconds_per_step",
    "head_time_fraction",
}


def test_two_workers_learn_omniglot_and_its_pair_set(ray_local: Any, omniglot_pairs: Path,
                                                    tmp_path: Path) -> None:
    # gradient accumulation: two micro-batches of 16 per worker, DDP syncs on the second
    trial = _trial(data={**OMNIGLOT, "pair_files": [str(omniglot_pairs)]},
                   evaluation=OMNIGLOT_EVALUATION, epochs=3,
                   optim={"lr": 0.1, "warmup_epochs": 0.2, "grad_accumulation": 2})
    result = _fit(trial, tmp_path, "omniglot")
    metrics = result.metrics
    assert metrics["diverged"] == 0 and metrics["epoch"] == 2 and metrics["restarts"] == 0
    assert EXPECTED_METRICS <= set(metrics), EXPECTED_METRICS - set(metrics)
    # the kept checkpoints' epochs 1 and 2 (measured 10.6 → 7.5)
    assert_loss_falls(kept_epoch_losses(result), 0.85)
    # held-out alphabets and the pair file of other drawings of them, both evaluated per epoch
    # (measured: untrained 0.61 → 0.91 and 0.63 → 0.85)
    assert_learned(trial, metrics, 0.15)
    assert_learned(trial, metrics, 0.1, "pairs0_verification_accuracy")
    train_classes, _ = split_identities(alphabet_of_class(), OMNIGLOT["heldout_fraction"], 0)
    classes = len(train_classes)
    # every class of the 2 shards sampled: K = C, D = 64
    assert metrics["head_flops_per_sample"] == pytest.approx(8 * 64 * classes)
    assert metrics["head_bytes_per_step"] > 0 and metrics["peak_memory_bytes"] > 1e7
    # the head's measured share of the step: some of it, not all (the backbone runs too)
    assert 0 < metrics["head_time_fraction"] < 1 and metrics["head_seconds_per_step"] > 0
    directory = Path(result.checkpoint.path)
    state = torch.load(directory / CHECKPOINT_FILE, weights_only=False)
    manifest = read_head_manifest(directory / HEAD_DIR, classes, 64)
    # both workers' shard files landed in the one checkpoint directory
    assert _head_rows(directory).shape == (classes, 64)
    assert manifest.world_size == 2 and manifest.row_state == ["momentum_buffer"]
    assert state["world_size"] == 2 and state["epoch"] == 3
    # rank 0's state holds no head rows: not the weight, not its momentum
    (head_index,) = state["optimizer"]["param_groups"][1]["params"]
    assert "head_weight" not in state and head_index not in state["optimizer"]["state"]
    # checkpoint.keep = 2 (the default): storage holds the last two of the three epochs'
    assert len([path for path in (tmp_path / "omniglot").glob("checkpoint_*")
                if path.is_dir()]) == 2
    assert list(result.metrics_dataframe["epoch"]) == [1, 2]


def test_sample_ratio_cuts_head_flops_by_its_factor(ray_local: Any, tmp_path: Path) -> None:
    data = {**SMALL_DATA, "num_identities": 320, "samples_per_identity": 4}
    trial = _trial(data=data, head__sample_ratio=0.1, batch_size=8)
    result = _fit(trial, tmp_path, "sampled")
    sampled = result.metrics
    # per shard of 160 classes: int(0.1·160) = 16 ≥ the ≤ 16 classes of a global batch
    assert sampled["sampled_classes"] == pytest.approx(32.0)
    assert sampled["head_flops_per_sample"] == pytest.approx(8 * 64 * 32)
    assert sampled["head_flops_per_sample"] / (8 * 64 * 320) == pytest.approx(0.1)
    # measured: loss 19.1 → 13.7, verification 0.48 → 0.68
    assert_loss_falls(kept_epoch_losses(result), 0.85)
    assert_learned(trial, sampled, 0.08)


def _recordio_trial(path: Path, workers: int) -> TrialConfig:
    """Two epochs of AdamW, half the classes sampled per step, the unsampled rows and their
    moments frozen."""
    return _trial(
        data={"source": "recordio", "path": str(path), "image_size": 32, "channels": 1,
              "heldout_fraction": 0.33},
        head={"sample_ratio": 0.5, "unsampled_rows": "frozen"},
        optim={"optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 0.2},
        resources__num_workers=workers)


def _assert_same(saved: Any, restored: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values are equal, tensors bitwise."""
    if isinstance(saved, dict):
        assert saved.keys() == restored.keys(), where
        for key in saved:
            _assert_same(saved[key], restored[key], f"{where}.{key}")
    elif isinstance(saved, list | tuple):
        assert len(saved) == len(restored), where
        for index, (left, right) in enumerate(zip(saved, restored, strict=True)):
            _assert_same(left, right, f"{where}[{index}]")
    elif torch.is_tensor(saved):
        assert torch.equal(saved, restored), where
    else:
        assert saved == restored, (where, saved, restored)


def _training_state(checkpoint: Path) -> dict[str, Any]:
    """Everything a checkpoint restores, whatever world size wrote it: rank 0's state (backbone,
    optimizer, scheduler, scaler, counters) but its ``world_size``, the head's shared state
    (the optimizer's scalar state of the weight, e.g. AdamW's step) and step count, and the
    weight and every optimizer row state joined over the shard files."""
    state = torch.load(checkpoint / CHECKPOINT_FILE, weights_only=False)
    del state["world_size"]
    manifest = read_head_manifest(checkpoint / HEAD_DIR)
    rows = {key: _head_rows(checkpoint, key) for key in manifest.row_state}
    return {"state": state, "head_shared": torch.load(checkpoint / HEAD_DIR / "shared.pt"),
            "head_step": manifest.step_count, "head_weight": _head_rows(checkpoint),
            "head_rows": rows}


def _shard_rows(checkpoint: Path) -> list[int]:
    """The number of head rows in each shard file of a checkpoint, in rank order."""
    return [shard.stop - shard.start for shard in read_head_manifest(checkpoint / HEAD_DIR).shards]


def test_resume_at_more_workers_restores_every_saved_tensor(ray_local: Any,
                                                            recordio_faces: Path,
                                                            tmp_path: Path) -> None:
    """1 worker trains; 2 workers resume its checkpoint; 3 workers resume theirs. A run resumed
    after its last epoch reports the state it restored as its checkpoint, without training."""
    trial = _recordio_trial(recordio_faces, 1)
    one = _fit(trial, tmp_path, "one")
    two = _fit(_recordio_trial(recordio_faces, 2), tmp_path, "two",
               resume_from=one.checkpoint.path)
    three = _fit(_recordio_trial(recordio_faces, 3), tmp_path, "three",
                 resume_from=two.checkpoint.path)
    assert one.metrics["diverged"] == 0 and one.metrics["epoch"] == 1
    # measured: loss 14.6 → 7.5, verification 0.61 → 0.79
    assert_loss_falls(kept_epoch_losses(one), 0.7)
    assert_learned(trial, one.metrics, 0.08)
    # the same steps and metrics, reported again from the restored state
    assert two.metrics["step"] == three.metrics["step"] == one.metrics["step"] == 2 * len(
        epoch_batches(RECORDIO_CLASSES * RECORDIO_SAMPLES, 32, 0, 1, 0, 0))
    assert two.metrics["loss"] == three.metrics["loss"] == one.metrics["loss"]

    checkpoints = [Path(result.checkpoint.path) for result in (one, two, three)]
    # 97 classes: one file at 1 worker, uneven shards at 2 and 3
    assert [_shard_rows(path) for path in checkpoints] == [[97], [49, 48], [33, 32, 32]]
    content = _training_state(checkpoints[0])
    # AdamW's moments of every row and its step travel with the head, sharded
    assert set(content["head_rows"]) == {"exp_avg", "exp_avg_sq"}
    assert set(content["head_shared"]["optimizer"]) == {"step"}
    assert content["state"]["optimizer"]["state"]  # and the backbone's moments with rank 0
    _assert_same(content, _training_state(checkpoints[1]))  # 1 → 2 workers
    _assert_same(content, _training_state(checkpoints[2]))  # 2 → 3 workers


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
