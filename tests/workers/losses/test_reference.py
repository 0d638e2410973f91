"""``reference_loss`` itself: class subsets (the sampled-head reference), reductions, logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cases import CASES, Case, case_params, expand_centres, random_batch
from _formulas import naive_loss

from workers.losses import build_loss, list_losses, raw_logits, reference_loss

# one setting per loss (its first in CASES), plus the normalised Virtual Softmax
SUBSET_CASES = (
    *{c.name: c for c in reversed(CASES)}.values(),
    Case("virtual", {"normalized": True, "scale": 8.0}),
)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeddings, weights, _ = random_batch(6, 12, 5, seed=0)
    labels = torch.tensor([3, 7, 3, 0, 11, 7])
    return embeddings, weights, labels


@pytest.mark.parametrize("case", case_params(SUBSET_CASES))
def test_class_subset_matches_formula(case: Case) -> None:
    """Negatives restricted to ``classes`` (unsorted on purpose), labels keep their ids."""
    loss = build_loss(case.name, **case.hyperparameters)
    embeddings, weights, labels = _batch()
    weights = expand_centres(loss, weights)
    classes = torch.tensor([11, 3, 5, 0, 7, 9])
    e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
    got = reference_loss(loss, e, w, labels, step=case.step, classes=classes, reduction="none")
    want = naive_loss(case.name, loss.hyperparameter_values(), e, w, labels, step=case.step,
                      classes=classes, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    got_grads = torch.autograd.grad(got.sum(), (e, w))
    want_grads = torch.autograd.grad(want.sum(), (e, w))
    for g, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-10, rtol=0)
    unsampled = [c for c in range(12) if c not in classes.tolist()]
    assert float(got_grads[1][unsampled].abs().max()) == 0.0


@pytest.mark.parametrize("name", list_losses())
def test_subset_of_all_classes_is_the_full_loss(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, labels = _batch()
    weights = expand_centres(loss, weights)
    full = reference_loss(loss, embeddings, weights, labels, reduction="none")
    every = reference_loss(loss, embeddings, weights, labels, classes=torch.randperm(12),
                           reduction="none")
    torch.testing.assert_close(full, every, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list_losses())
def test_labels_only_subset(name: str) -> None:
    """Only the positives sampled: CE without negatives is 0; D-Softmax's inter term is 0."""
    loss = build_loss(name)
    embeddings, weights, _ = _batch()
    weights = expand_centres(loss, weights)
    labels = torch.tensor([4, 4, 4, 4, 4, 4])
    got = reference_loss(loss, embeddings, weights, labels, classes=torch.tensor([4]),
                         reduction="none")
    want = naive_loss(name, loss.hyperparameter_values(), embeddings, weights, labels,
                      classes=[4], reduction="none")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # not CE: D-Softmax's intra term, the virtual class, MagFace's regulariser, UniFace's BCE
    if name not in ("dsoftmax", "virtual", "magface", "uniface"):
        assert torch.equal(got, torch.zeros_like(got))


def test_label_outside_subset_raises() -> None:
    embeddings, weights, labels = _batch()
    for classes in (torch.tensor([3, 7, 0]), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])):
        with pytest.raises(ValueError, match="every label must be among `classes`"):
            reference_loss(build_loss("arcface"), embeddings, weights, labels, classes=classes)


@pytest.mark.parametrize("name", list_losses())
def test_reductions(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, labels = _batch()
    weights = expand_centres(loss, weights)
    per_sample = reference_loss(loss, embeddings, weights, labels, reduction="none")
    assert per_sample.shape == (6,)
    total = reference_loss(loss, embeddings, weights, labels, reduction="sum")
    mean = reference_loss(loss, embeddings, weights, labels)
    assert mean.shape == total.shape == ()
    torch.testing.assert_close(total, per_sample.sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(mean, per_sample.mean(), atol=1e-12, rtol=0)
    torch.testing.assert_close(mean, reference_loss(loss, embeddings, weights, labels,
                                                    reduction="mean"), atol=0, rtol=0)


@pytest.mark.parametrize("name", list_losses())
def test_raw_logits_normalise_as_declared(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, _ = _batch()
    x = embeddings / embeddings.norm(dim=1, keepdim=True) if loss.normalize_embeddings \
        else embeddings
    w = weights / weights.norm(dim=1, keepdim=True) if loss.normalize_weights else weights
    # K sub-centres of the same row: the max over them (sub-centre 0 is ``weights``)
    expected = torch.stack([x @ c.T for c in expand_centres(loss, w).unflatten(
        1, (loss.subcenters, -1)).unbind(1)]).amax(dim=0)
    torch.testing.assert_close(raw_logits(loss, embeddings, expand_centres(loss, weights)),
                               expected, atol=1e-12, rtol=0)
    # LOSSES.md "norm" column (Virtual Softmax at its default, unnormalised)
    expected = {"softmax": (False, False), "sphereface": (False, True), "virtual": (False, False)}
    assert (loss.normalize_embeddings, loss.normalize_weights) == expected.get(name, (True, True))


def test_repeated_labels_and_scale_invariance_of_normalised_losses() -> None:
    embeddings, weights, labels = _batch()
    loss = build_loss("arcface")
    a = reference_loss(loss, embeddings, weights, labels, reduction="none")
    b = reference_loss(loss, 3.0 * embeddings, 0.5 * weights, labels, reduction="none")
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # a plain softmax CE check of the whole pipeline on the same batch
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).T
    normface = reference_loss(build_loss("normface", scale=10.0), embeddings, weights, labels)
    torch.testing.assert_close(normface, F.cross_entropy(10.0 * cos, labels), atol=1e-12, rtol=0)
