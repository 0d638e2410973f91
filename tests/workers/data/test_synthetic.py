"""Synthetic identities: determinism, roles, knobs, and that the default is learnable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.data import DataConfig, epoch_batches, load_dataset, synthetic_identities
from workers.evaluation import evaluate_verification, sample_pairs, verification_metrics


def _pixel_accuracy(dataset) -> float:
    """Verification accuracy of raw pixels (cosine), a difficulty probe without training."""
    unit = F.normalize(dataset.data.flatten(1), dim=1)
    left, right, issame = sample_pairs(dataset.labels, 4000, seed=0)
    return verification_metrics((unit[left] * unit[right]).sum(1).numpy(),
                                issame)["verification_accuracy"]


def test_shapes_labels_and_determinism() -> None:
    first = synthetic_identities(7, 3, seed=5)
    assert first.data.shape == (21, 1, 32, 32) and first.data.dtype == torch.float32
    assert torch.equal(first.labels, torch.arange(7).repeat_interleave(3))
    assert torch.equal(first.data, synthetic_identities(7, 3, seed=5).data)
    assert not torch.equal(first.data, synthetic_identities(7, 3, seed=6).data)
    assert synthetic_identities(2, 2, image_size=16).data.shape == (4, 1, 16, 16)


def test_zero_difficulty_renders_the_prototype() -> None:
    clean = synthetic_identities(4, 5, difficulty=0.0).data.view(4, 5, -1)
    assert torch.allclose(clean, clean[:, :1].expand_as(clean), atol=1e-5)
    assert (clean[:, 0, None] - clean[None, :, 0]).abs().amax(-1).sum() > 1.0


def test_heldout_identities_are_new() -> None:
    train = synthetic_identities(50, 1, difficulty=0.0).data.flatten(1)
    heldout = synthetic_identities(50, 1, difficulty=0.0, role="heldout").data.flatten(1)
    closest = torch.cdist(heldout, train).min(1).values
    within = torch.cdist(train, train) + torch.eye(50) * 1e9
    assert float(closest.min()) > 0.5 * float(within.min(1).values.median())
    with pytest.raises(ValueError, match="role"):
        synthetic_identities(2, 2, role="test")


def test_difficulty_makes_pixels_less_informative() -> None:
    accuracies = [_pixel_accuracy(synthetic_identities(100, 10, difficulty=d, seed=1))
                  for d in (0.25, 1.0, 2.0)]
    assert accuracies[0] > accuracies[1] + 0.05 > accuracies[2] + 0.1
    assert accuracies[1] < 0.8  # raw pixels alone are far from solving the default


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box, spinning OpenMP threads of concurrent
    processes slow multi-threaded training by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_small_cnn_learns_the_default_in_seconds(one_thread) -> None:
    """SmallCNN + NormFace (learnable centres), 80 steps: well above chance and above the
    untrained network on held-out identities."""
    from workers.backbones import build_backbone
    from workers.losses import build_loss, reference_loss

    torch.manual_seed(0)
    split = load_dataset(DataConfig(heldout_identities=100))
    model = build_backbone("small_cnn", 64, split.input_shape, width=16)
    untrained = evaluate_verification(model, split.heldout, num_pairs=2000)
    centres = torch.nn.Parameter(torch.randn(split.num_classes, 64) * 0.01)
    optimizer = torch.optim.Adam([*model.parameters(), centres], lr=3e-3)
    loss = build_loss("normface", scale=16)
    model.train()
    for indices in epoch_batches(len(split.train), 64, 0, 1, epoch=0, seed=0)[:80]:
        inputs, labels = split.train.batch(indices)
        value = reference_loss(loss, model(inputs), centres, labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    trained = evaluate_verification(model, split.heldout, num_pairs=2000)
    assert trained["verification_accuracy"] > 0.7
    assert trained["verification_accuracy"] > untrained["verification_accuracy"] + 0.1
    assert trained["roc_auc"] > 0.75
