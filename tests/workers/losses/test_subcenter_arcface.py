"""Sub-center ArcFace: cos θ_j = max over class j's K sub-centres, then ArcFace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cases import expand_centres, make_batch

from workers.losses import build_loss, raw_logits, reference_loss


def test_one_subcenter_is_arcface() -> None:
    embeddings, weights, labels = make_batch(seed=3)
    grads = []
    for loss in (build_loss("subcenter_arcface", scale=8.0, subcenters=1),
                 build_loss("arcface", scale=8.0)):
        e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
        value = reference_loss(loss, e, w, labels, reduction="none")
        grads.append((value.detach(), *torch.autograd.grad(value.sum(), (e, w))))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_logits_are_the_max_over_subcenters_and_only_the_argmax_learns() -> None:
    loss = build_loss("subcenter_arcface", scale=8.0, subcenters=3)
    embeddings, weights, labels = make_batch(seed=4)
    centres = expand_centres(loss, weights).requires_grad_()
    per_centre = F.normalize(embeddings, dim=1) @ F.normalize(centres.unflatten(1, (3, -1)),
                                                              dim=2).flatten(0, 1).T
    per_centre = per_centre.unflatten(1, (-1, 3))
    torch.testing.assert_close(raw_logits(loss, embeddings, centres),
                               per_centre.amax(dim=2), atol=1e-14, rtol=0)
    reference_loss(loss, embeddings, centres, labels).backward()
    grad = centres.grad.unflatten(1, (3, -1)).norm(dim=2)  # (C, K)
    closest = per_centre.argmax(dim=2)  # (B, C): each row's arg-max sub-centre per class
    learned = torch.zeros(grad.shape, dtype=torch.bool)
    learned[torch.arange(grad.shape[0]).expand_as(closest), closest] = True
    assert bool((grad[~learned] == 0).all()) and bool((grad[learned] > 0).all())


def test_centres_of_the_wrong_width_are_one_line() -> None:
    embeddings, weights, labels = make_batch()
    with pytest.raises(ValueError, match=r"^subcenter_arcface with 3 centre row\(s\) per class "
                                         r"needs centres of width 3·5 = 15, got 5$"):
        reference_loss(build_loss("subcenter_arcface"), embeddings, weights, labels)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"subcenters": 0}, r"subcenter_arcface\.subcenters = 0 is outside \{1, …, 16\}"),
    ({"subcenters": 2.5}, r"subcenter_arcface\.subcenters = 2\.5 must be an integer in"),
    ({"margin": -0.1}, r"subcenter_arcface\.margin = -0\.1 rad is outside \[0, 1\.2\]"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        build_loss("subcenter_arcface", **kwargs)
