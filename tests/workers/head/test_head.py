"""SampledSoftmaxHead in one process (no group): reference parity, sampling, policies, errors."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.config import ConfigError, parse_trial_config
from workers.head import SampledSoftmaxHead, initial_rows, partition_n_into_range
from workers.head.head import DEFAULT_LOGIT_BUDGET_MB
from workers.losses import build_loss, get_loss_class, list_losses, reference_loss

DIM, NUM_CLASSES = 6, 11


def small_loss(name: str) -> Any:
    """The loss ``name`` with scale 8 where it has a scale (well-conditioned float64 parity)."""
    has_scale = any(spec.name == "scale" for spec in get_loss_class(name).hyperparameters())
    return build_loss(name, scale=8.0) if has_scale else build_loss(name)


def make_batch(batch: int = 9, dtype: torch.dtype = torch.float64,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, DIM, generator=generator, dtype=dtype)
    return embeddings, torch.randint(0, NUM_CLASSES, (batch,), generator=generator)


def make_head(loss: str = "arcface", **kwargs: Any) -> SampledSoftmaxHead:
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, small_loss(loss), dtype=torch.float64,
                              **{"chunk_size": 4, **kwargs})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # (K sub-centres: the weight's K·D columns)
        head.weight.copy_(torch.randn(NUM_CLASSES, head.weight.shape[1], generator=generator,
                                      dtype=torch.float64))
    return head


def assert_matches_reference(head: SampledSoftmaxHead, step: int, classes: Any) -> None:
    x, labels = make_batch()
    x_head = x.clone().requires_grad_()
    value = head(x_head, labels, step=step)
    value.backward()
    x_ref, w_ref = x.clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    expected = reference_loss(head.loss, x_ref, w_ref, labels, step=step, classes=classes)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(x_head.grad, x_ref.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(head.weight.grad, w_ref.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss", list_losses())
def test_full_softmax_matches_reference(loss: str) -> None:
    head = make_head(loss)
    assert_matches_reference(head, step=3, classes=None)
    assert torch.equal(head.last_sample, torch.arange(NUM_CLASSES))


@pytest.mark.parametrize(("loss", "ratio", "sampling"), [
    ("arcface", 0.5, "uniform"), ("sphereface", 0.3, "uniform"), ("virtual", 0.5, "uniform"),
    ("dsoftmax", 1.0, "batch"), ("combined", 1.0, "batch"),
])
def test_sampled_matches_reference_on_sampled_classes(loss: str, ratio: float,
                                                      sampling: str) -> None:
    head = make_head(loss, sample_ratio=ratio, sampling=sampling)
    x, labels = make_batch()
    head(x, labels, step=5)
    classes = head.last_sample
    positives = labels.unique()
    assert bool(torch.isin(positives, classes).all())
    expected_count = len(positives) if sampling == "batch" else max(int(ratio * NUM_CLASSES),
                                                                    len(positives))
    assert len(classes) == expected_count
    head.zero_grad()
    assert_matches_reference(head, step=5, classes=classes)
    unsampled = torch.ones(NUM_CLASSES, dtype=torch.bool)
    unsampled[classes] = False
    assert torch.count_nonzero(head.weight.grad[unsampled]) == 0


@pytest.mark.parametrize("loss", ["cosface", "arcface", "virtual", "sosoftmax"])
def test_gradcheck_whole_head(loss: str) -> None:
    """Finite differences of the whole head w.r.t. embeddings and its (sampled) shard."""
    head = make_head(loss, sample_ratio=0.6)
    x, labels = make_batch(batch=5)

    def run(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(head, {"weight": weight}, (embeddings, labels, 2))

    weight = head.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(run, (x.requires_grad_(), weight), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_chunk_size_does_not_change_the_result(chunk_size: int) -> None:
    assert_matches_reference(make_head("cosface", chunk_size=chunk_size), step=0, classes=None)


def test_sampling_reproducible_and_changes_with_step() -> None:
    """Same seed and step: same sample; 20 consecutive steps: all different samples."""
    x, labels = make_batch(batch=2)
    a, b = (SampledSoftmaxHead(DIM, 400, small_loss("arcface"), 0.1, seed=7) for _ in range(2))
    samples = []
    for _ in range(20):
        a(x.float(), labels)
        b(x.float(), labels)
        assert torch.equal(a.last_sample, b.last_sample)
        samples.append(tuple(a.last_sample.tolist()))
    assert len(set(samples)) == 20
    assert a.step_count == 20


def test_step_counter_only_advances_in_training_without_explicit_step() -> None:
    head = make_head()
    x, labels = make_batch()
    head(x, labels)
    head(x, labels, step=100)
    head.eval()
    head(x, labels)
    assert head.step_count == 1


def test_autocast_bfloat16_close_to_float32() -> None:
    head = SampledSoftmaxHead(DIM, NUM_CLASSES, small_loss("arcface"), chunk_size=4)
    x, labels = make_batch(dtype=torch.float32)
    expected = head(x, labels, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x, labels, step=0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_inputs_not_mutated() -> None:
    head = make_head(sample_ratio=0.5)
    x, labels = make_batch()
    x.requires_grad_()
    before = x.detach().clone(), labels.clone()
    head(x, labels).backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(labels, before[1])


def _sgd_steps(policy: str, optimizer_name: str = "sgd", accumulate: int = 1) -> list[dict]:
    """Three steps at r = 0.3; per step the weight and state rows before and after."""
    head = make_head("cosface", sample_ratio=0.3, unsampled_rows=policy)
    optimizer = (torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
                 if optimizer_name == "sgd" else
                 torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.1))
    head.attach_optimizer(optimizer)
    history = []
    for step in range(3):
        sampled = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        for micro in range(accumulate):
            x, labels = make_batch(batch=2, seed=10 * step + micro)
            head(x, labels).backward()
            sampled[head.last_sample] = True
        before = {"weight": head.weight.detach().clone(),
                  **{k: v.clone() for k, v in optimizer.state[head.weight].items()}}
        optimizer.step()
        optimizer.zero_grad()
        after = {"weight": head.weight.detach().clone(),
                 **{k: v.clone() for k, v in optimizer.state[head.weight].items()}}
        history.append({"sampled": sampled, "before": before, "after": after})
    return history


@pytest.mark.parametrize(("optimizer_name", "accumulate"), [("sgd", 1), ("sgd", 2), ("adamw", 1)])
def test_frozen_policy_leaves_unsampled_rows_and_state_untouched(optimizer_name: str,
                                                                  accumulate: int) -> None:
    history = _sgd_steps("frozen", optimizer_name, accumulate)
    for record in history:
        unsampled, sampled = ~record["sampled"], record["sampled"]
        for key, after in record["after"].items():
            if after.shape != (NUM_CLASSES, DIM):
                continue  # scalar state (AdamW's step) is shared by every row
            before = record["before"].get(key, torch.zeros_like(after))
            assert torch.equal(after[unsampled], before[unsampled]), key
            assert not torch.equal(after[sampled], before[sampled]), key
    assert bool(history[-1]["sampled"].any() and (~history[-1]["sampled"]).any())


def test_dense_policy_moves_unsampled_rows_by_decay_and_momentum() -> None:
    history = _sgd_steps("dense")
    for record in history:
        unsampled = ~record["sampled"]
        moved = record["after"]["weight"][unsampled] != record["before"]["weight"][unsampled]
        assert bool(moved.all())
        assert bool((record["after"]["momentum_buffer"][unsampled] != 0).all())


def test_attach_optimizer_needs_the_head_weight() -> None:
    head = make_head(unsampled_rows="frozen")
    with pytest.raises(ValueError, match=r"^attach_optimizer: the optimizer does not hold"):
        head.attach_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert make_head().attach_optimizer(torch.optim.SGD(head.parameters(), lr=0.1)) == []


def test_saved_tensors_have_no_batch_by_classes_term_beyond_the_budget() -> None:
    """Elements saved for backward (besides the weight itself) grow by O(C), not O(B·C), with
    logit budget 0; a budget adds the kept chunks, at most the budget."""

    def saved_elements(num_classes: int, budget_mb: float = 0) -> int:
        head = SampledSoftmaxHead(8, num_classes, small_loss("arcface"), chunk_size=32,
                                  logit_budget_mb=budget_mb)
        x = torch.randn(16, 8, requires_grad=True)
        labels = torch.randint(0, num_classes, (16,))
        weight_storage = head.weight.untyped_storage().data_ptr()
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if tensor.untyped_storage().data_ptr() != weight_storage:
                total += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            head(x, labels)
        return total

    small, large = saved_elements(64), saved_elements(4096)
    assert large - small <= 2 * (4096 - 64), (small, large)
    # 5 of the 128 chunks: each 16 × 32 float32 exponentials (and 16 row maxima)
    kept = saved_elements(4096, budget_mb=5.5 * 16 * 32 * 4 / 2**20) - large
    assert kept == 5 * (16 * 32 + 16), kept


def test_backward_allocates_one_dense_shard_gradient() -> None:
    """The target rows' gradient is added in place: no out-of-place C × D ``add``."""
    head = SampledSoftmaxHead(8, 64, small_loss("arcface"), chunk_size=16)
    x, labels = torch.randn(16, 8, requires_grad=True), torch.randint(0, 64, (16,))
    with torch.profiler.profile(record_shapes=True) as prof:
        head(x, labels).backward()
    # an in-place add_ shows as aten::add with its own C × D output as the fourth argument
    adds = [event.input_shapes for event in prof.events() if event.name == "aten::add"]
    assert not [shapes for shapes in adds if [64, 8] in shapes and shapes[3:] != [[64, 8]]], adds
    assert head.weight.grad.layout == torch.strided


def test_initial_rows_independent_of_sharding() -> None:
    head = SampledSoftmaxHead(3, 9000, small_loss("normface"), seed=3)
    full = initial_rows(3, 0, 9000, 3)
    assert torch.equal(head.weight, full)
    for world_size in (2, 3, 7):
        parts = [initial_rows(3, start, stop, 3)
                 for start, stop in partition_n_into_range(9000, world_size)]
        assert torch.equal(torch.cat(parts), full)
    assert abs(float(full.std()) - 0.01) < 1e-3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sample_ratio": 0.0}, r"^sample_ratio = 0.0 must be in \(0, 1\]$"),
    ({"sample_ratio": 1.5}, r"^sample_ratio = 1.5 must be in \(0, 1\]$"),
    ({"chunk_size": 0}, r"^chunk_size = 0 must be >= 1$"),
    ({"logit_budget_mb": -1}, r"^logit_budget_mb = -1 must be finite and >= 0$"),
    ({"logit_budget_mb": float("nan")}, r"^logit_budget_mb = nan must be finite and >= 0$"),
    ({"logit_budget_mb": float("inf")}, r"^logit_budget_mb = inf must be finite and >= 0$"),
    ({"sampling": "hard"}, r"^sampling = 'hard' must be one of \{'uniform', 'batch'\}$"),
    ({"unsampled_rows": "lazy"}, r"^unsampled_rows = 'lazy' must be one of"),
    ({"num_classes": 0}, r"^num_classes = 0 must be >= the world size 1$"),
    ({"embedding_dim": 0}, r"^embedding_dim = 0 must be >= 1$"),
])
def test_constructor_errors(kwargs: dict, match: str) -> None:
    arguments = {"embedding_dim": DIM, "num_classes": NUM_CLASSES, "loss": small_loss("arcface"),
                 **kwargs}
    with pytest.raises(ValueError, match=match):
        SampledSoftmaxHead(**arguments)


@pytest.mark.parametrize("value", [-1, 1.5, 1 << 21])
def test_config_logit_budget_out_of_range_is_one_line(value: Any) -> None:
    with pytest.raises(ConfigError) as error:
        parse_trial_config({"head": {"logit_budget_mb": value}}, "trial.yaml")
    assert error.value.lines == [f"trial.yaml: head.logit_budget_mb = {value} must be an "
                                 f"integer in [0, 1048576]"]
    assert parse_trial_config({}).head.logit_budget_mb == DEFAULT_LOGIT_BUDGET_MB


@pytest.mark.parametrize(("embeddings", "labels", "match"), [
    (torch.randn(3, DIM + 1), torch.tensor([0, 1, 2]), r"^embedding width 7 != embedding_dim 6$"),
    (torch.randn(3, DIM), torch.tensor([0, 11, 2]), r"^label 11 outside \[0, 11\)$"),
    (torch.randn(3, DIM), torch.tensor([0, -1, 2]), r"^label -1 outside \[0, 11\)$"),
    (torch.randn(3, DIM), torch.tensor([0, 1]), r"^3 embeddings but 2 labels$"),
    (torch.randn(3, DIM), torch.tensor([0.0, 1.0, 2.0]), r"^labels must be a 1-D integer tensor"),
    (torch.randn(DIM), torch.tensor([0]), r"^embeddings must be 2-D"),
    (torch.randn(0, DIM), torch.tensor([], dtype=torch.long), r"^the global batch is empty$"),
])
def test_forward_errors(embeddings: torch.Tensor, labels: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_head()(embeddings.double(), labels)


def test_no_hard_coded_device_in_workers() -> None:
    workers = Path(__file__).resolve().parents[3] / "workers"
    assert [path for path in workers.rglob("*.py") if ".cuda()" in path.read_text()] == []


def reference_weight_gradient(head: SampledSoftmaxHead, x: torch.Tensor, labels: torch.Tensor,
                              step: int) -> torch.Tensor:
    """The dense C × D gradient of ``reference_loss`` on the classes the head sampled."""
    w_ref = head.weight.detach().clone().requires_grad_()
    reference_loss(head.loss, x, w_ref, labels, step=step, classes=head.last_sample).backward()
    return w_ref.grad


@pytest.mark.parametrize("unsampled_rows", ["dense", "frozen"])
def test_dense_gradient_buffer_is_reused_and_exact_across_steps(unsampled_rows: str) -> None:
    """On CPU at r < 1 the dense policies' gradient lives in one reused buffer: every step's
    gradient equals the reference's, rows sampled only by an earlier step (or written by the
    user in place) are zero again, and no C × D tensor is allocated after the first step."""
    head = make_head(sample_ratio=0.4, unsampled_rows=unsampled_rows)
    storage, samples = None, []
    for step in range(4):
        x, labels = make_batch(seed=step)
        head(x, labels, step=step).backward()
        assert head.weight.grad.layout == torch.strided
        torch.testing.assert_close(head.weight.grad,
                                   reference_weight_gradient(head, x, labels, step),
                                   rtol=0, atol=1e-10)
        storage = storage or head.weight.grad.data_ptr()
        assert head.weight.grad.data_ptr() == storage
        samples.append(set(head.last_sample.tolist()))
        head.weight.grad.add_(1.0)  # a user's in-place edit, e.g. manual weight decay
        head.zero_grad(set_to_none=True)
    assert any(earlier - later for earlier, later in itertools.pairwise(samples))
    assert head.held_gradient_bytes == NUM_CLASSES * DIM * 8


def test_dense_gradient_buffer_accumulates_micro_batches() -> None:
    """Two backward passes without a reset (gradient accumulation) sum into the buffer, as
    with a fresh dense gradient; ``zero_grad(set_to_none=False)`` zeroes it in place."""
    head = make_head(sample_ratio=0.4)
    expected = torch.zeros_like(head.weight)
    for step in range(2):
        x, labels = make_batch(seed=step)
        head(x, labels, step=step).backward()
        expected += reference_weight_gradient(head, x, labels, step)
    torch.testing.assert_close(head.weight.grad, expected, rtol=0, atol=1e-10)
    head.zero_grad(set_to_none=False)
    x, labels = make_batch(seed=5)
    head(x, labels, step=5).backward()
    torch.testing.assert_close(head.weight.grad, reference_weight_gradient(head, x, labels, 5),
                               rtol=0, atol=1e-10)


def test_substituted_or_copied_weight_gets_a_fresh_dense_gradient() -> None:
    """Only the Parameter whose hook fills the buffer gets a sparse LSE gradient: a deep copy
    of the head, or a weight passed through ``functional_call``, gets a dense one as before."""
    import copy

    head = make_head(sample_ratio=0.4)
    x, labels = make_batch()
    clone = copy.deepcopy(head)
    clone(x, labels, step=1).backward()
    assert clone.weight.grad.layout == torch.strided and clone.held_gradient_bytes == 0
    weight = head.weight.detach().clone().requires_grad_()
    torch.func.functional_call(head, {"weight": weight}, (x, labels, 1)).backward()
    assert weight.grad.layout == torch.strided and head.held_gradient_bytes == 0
    torch.testing.assert_close(weight.grad, clone.weight.grad, rtol=0, atol=0)
