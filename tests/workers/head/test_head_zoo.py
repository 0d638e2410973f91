"""The head with the modern zoo, one process: per-row context and loss state, sub-centres,
the sum reduction, the inter-class filter — each against ``reference_loss``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.head import SampledSoftmaxHead, initial_rows
from workers.losses import LossState, build_loss, get_loss_class, reference_loss

DIM, NUM_CLASSES = 6, 11
ZOO = ["curricularface", "magface", "adaface", "elasticface_arc", "elasticface_cos",
       "subcenter_arcface", "uniface"]


def small_loss(name: str, **kwargs: Any) -> Any:
    has_scale = any(spec.name == "scale" for spec in get_loss_class(name).hyperparameters())
    return build_loss(name, **({"scale": 8.0} if has_scale else {}), **kwargs)


def make_head(loss: Any, **kwargs: Any) -> SampledSoftmaxHead:
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, loss, dtype=torch.float64,
                              **{"chunk_size": 4, "seed": 5, **kwargs})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator,
                                      dtype=torch.float64))
    return head


def make_batch(seed: int, batch: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + seed)
    embeddings = 3.0 * torch.randn(batch, DIM, generator=generator, dtype=torch.float64)
    return embeddings, torch.randint(0, NUM_CLASSES, (batch,), generator=generator)


def _compare(head: SampledSoftmaxHead, state: LossState | None, step: int,
             filter_threshold: float = 0.0) -> None:
    """One training step of the head against the reference on its sample, the same state."""
    x, labels = make_batch(step)
    x_head = x.clone().requires_grad_()
    head.zero_grad()
    value = head(x_head, labels, step=step)
    value.backward()
    x_ref = x.clone().requires_grad_()
    w_ref = head.weight.detach().clone().requires_grad_()
    if state is not None:
        state.zero_grad()
    expected = reference_loss(head.loss, x_ref, w_ref, labels, step=step, seed=head.seed,
                              classes=head.last_sample, state=state,
                              filter_threshold=filter_threshold)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_head.grad, x_ref.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=0, atol=1e-10)
    if state is not None:
        for name, value_ in state.state_dict().items():
            torch.testing.assert_close(head.loss_state.state_dict()[name], value_, rtol=0,
                                       atol=1e-14)
        for got, want in zip(head.replicated_parameters(), state.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("ratio", "sampling"), [(1.0, "uniform"), (0.6, "uniform"),
                                                 (1.0, "batch")])
@pytest.mark.parametrize("name", ZOO)
def test_three_steps_match_the_reference_with_its_state(name: str, ratio: float,
                                                        sampling: str) -> None:
    loss = small_loss(name)
    head = make_head(loss, sample_ratio=ratio, sampling=sampling)
    state = None
    if head.loss_state is not None:
        state = LossState(loss, NUM_CLASSES, ratio, dtype=torch.float64)
        assert state.values() == head.loss_state_values()
    for step in range(3):
        _compare(head, state, step)


@pytest.mark.parametrize("name", ["arcface", "cosface", "curricularface", "uniface",
                                  "subcenter_arcface", "adaface"])
def test_inter_class_filter_matches_the_reference(name: str) -> None:
    loss = small_loss(name)
    head = make_head(loss, sample_ratio=0.7, filter_threshold=0.3)
    state = (None if head.loss_state is None
             else LossState(loss, NUM_CLASSES, 0.7, dtype=torch.float64))
    for step in range(2):
        _compare(head, state, step, filter_threshold=0.3)


def test_state_updates_in_training_only() -> None:
    head = make_head(small_loss("adaface"))
    x, labels = make_batch(0)
    head.eval()
    head(x, labels)
    assert head.loss_state_values() == {"mu": 20.0, "sigma": 100.0}
    head.train()
    head(x, labels)
    assert head.loss_state_values()["mu"] != 20.0
    assert not any(buffer.requires_grad for buffer in head.loss_state.buffers())


def test_uniface_bias_is_a_head_parameter_that_an_optimizer_trains() -> None:
    head = make_head(small_loss("uniface"))
    bias = head.loss_state.bias
    assert any(p is bias for p in head.parameters()) and head.replicated_parameters() == [bias]
    assert float(bias.detach()) == pytest.approx(torch.log(torch.tensor(110.0)).item())
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    before = float(bias.detach())
    x, labels = make_batch(1)
    head(x, labels).backward()
    optimizer.step()
    assert float(bias.detach()) != before
    assert "loss_state.bias" in head.state_dict()


def test_subcenter_rows_sampling_and_policies() -> None:
    loss = small_loss("subcenter_arcface")  # K = 3
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, loss, sample_ratio=0.5, seed=2)
    assert head.weight.shape == (NUM_CLASSES, 3 * DIM) and head.subcenters == 3
    assert torch.equal(head.weight.detach(), initial_rows(2, 0, NUM_CLASSES, 3 * DIM))
    centres = head.class_centres()
    assert centres.shape == (NUM_CLASSES, DIM)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(NUM_CLASSES))
    for policy in ("sparse", "frozen"):
        head = make_head(loss, sample_ratio=0.5, unsampled_rows=policy)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        head.attach_optimizer(optimizer)
        before = head.weight.detach().clone()
        x, labels = make_batch(2)
        head(x, labels).backward()
        if policy == "sparse":
            assert head.weight.grad.is_sparse and head.weight.grad.shape == (NUM_CLASSES, 18)
        sampled = head.last_sample
        optimizer.step()
        unsampled = torch.ones(NUM_CLASSES, dtype=torch.bool)
        unsampled[sampled] = False
        assert torch.equal(head.weight.detach()[unsampled], before[unsampled])
        assert not torch.equal(head.weight.detach()[sampled], before[sampled])


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_subcenter_chunking_does_not_change_the_result(chunk_size: int) -> None:
    head = make_head(small_loss("subcenter_arcface"), chunk_size=chunk_size)
    _compare(head, None, 0)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("subcenter_arcface", {}), ("uniface", {}), ("magface", {"l_a": 0.5, "u_a": 60.0}),
    ("elasticface_arc", {"plus": True}), ("curricularface", {"t_alpha": 0.0}),
    ("elasticface_cos", {})])
def test_gradcheck_whole_head(name: str, kwargs: dict) -> None:
    """Finite differences of the whole head w.r.t. embeddings and its sampled shard (the
    losses whose context does not move with the inputs' own detached statistics)."""
    head = make_head(small_loss(name, **kwargs), sample_ratio=0.6)
    x, labels = make_batch(3, batch=5)
    head.eval()  # no state update between the finite-difference evaluations

    def run(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(head, {"weight": weight}, (embeddings, labels, 2))

    weight = head.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x.requires_grad_(), weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["adaface", "uniface", "curricularface", "subcenter_arcface"])
def test_autocast_bfloat16_close_to_float32(name: str) -> None:
    loss = small_loss(name)
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, loss, chunk_size=4)
    x, labels = make_batch(4)
    head.eval()
    expected = head(x.float(), labels, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x.float(), labels, step=0)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_filter_needs_cosine_logits() -> None:
    with pytest.raises(ValueError, match=r"^filter_threshold = 0.4 needs cosine logits, but "
                                         r"softmax does not normalise both"):
        SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss("softmax"), filter_threshold=0.4)
    with pytest.raises(ValueError, match=r"^filter_threshold = 2 is outside \[0, 1\]"):
        SampledSoftmaxHead(DIM, NUM_CLASSES, build_loss("arcface"), filter_threshold=2)
