"""The sampled, sharded, chunked softmax head: any loss of the zoo over many classes."""

from __future__ import annotations

import typing
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from workers.losses import Batch, LossState, MarginLoss, Target, check_filter_threshold
from workers.seeding import derive_seed

from ._collectives import (
    all_gather_rows,
    all_reduce_sum,
    gather_rows,
    local_rows,
    replicated,
    row_offset,
    scatter_rows_sum,
)
from ._function import ChunkedLSE, LSEOptions
from ._partition import HeadShard
from ._sampling import SampledClasses, sample_classes
from ._sparse_step import check_sparse_optimizer, sparse_row_step

Sampling = Literal["uniform", "batch"]
UnsampledRows = Literal["dense", "frozen", "sparse"]
#: rows per block of the initial class centres; each block has its own seed
INIT_BLOCK_ROWS = 4096
#: standard deviation of the initial class centres (Partial FC's normal(0, 0.01))
INIT_STD = 0.01
#: logits per chunk with ``chunk_size=None``: ≈8 MiB of float32 on CPU (cache-sized), ≈128 MiB
#: on accelerators (few kernel launches per step)
AUTO_CHUNK_LOGITS = {"cpu": 2**21, "accelerator": 2**25}
#: MiB of chunk logits kept from forward for backward by default (``head.logit_budget_mb``):
#: at B = 1024 float32 rows it keeps 65,536 classes' logits (every sampled class of a
#: 655k-row shard at r = 0.1) for 1 % of a 24 GiB CPU worker's memory and 0.3 % of an
#: 80 GiB accelerator's; the chunks beyond it are recomputed, as at budget 0
DEFAULT_LOGIT_BUDGET_MB = 256


def initial_rows(seed: int, start: int, stop: int, dim: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of the logical ``C × D`` initial centre matrix (float32, CPU).

    Block ``b`` (rows ``[4096·b, 4096·(b+1))``) is ``0.01·N(0, 1)`` drawn from
    ``derive_seed("init", seed, b)``, so the matrix does not depend on how it is sharded.
    """
    out = torch.empty(stop - start, dim)
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        generator = torch.Generator().manual_seed(derive_seed("init", seed, block))
        values = torch.randn(INIT_BLOCK_ROWS, dim, generator=generator).mul_(INIT_STD)
        first = block * INIT_BLOCK_ROWS
        lo, hi = max(start, first), min(stop, first + INIT_BLOCK_ROWS)
        out[lo - start : hi - start] = values[lo - first : hi - first]
    return out


class SampledSoftmaxHead(nn.Module):
    """Partial-FC softmax head: ``head(local_embeddings, local_labels) -> loss`` for any loss.

    Math: with ``x̃``/``W̃`` normalised where ``loss`` says so, ``z_j = x̃·W̃_j``,
    ``P = loss.positive_logit(Target(z_y, ‖x‖, ‖W_y‖, step))``,
    ``LSE = log Σ_{j≠y, j ∈ S} exp(loss.phi(z_j))`` (joined by ``logaddexp`` with
    ``loss.virtual_logit`` where there is one), loss ``= mean_i loss.combine(P_i, LSE_i)`` over
    the *global* batch; ``S`` is the union over ranks of each shard's sample. It equals
    ``reference_loss(loss, X, W, labels, step=step, classes=S)`` on the concatenated batch.

    Distribution: ``process_group`` (explicit; ``None`` = one process, no collective even if
    ``torch.distributed`` is initialised — pass ``torch.distributed.group.WORLD`` for the default
    group) splits the classes into contiguous shards differing by at most one class; this
    module's ``weight`` Parameter is only its shard. Embeddings and labels are all-gathered
    (local batch sizes may differ, even be 0); every rank returns the same scalar.

    Sampling per step: every class of the global batch in this shard is kept, filled up to
    ``int(sample_ratio·shard_size)`` with uniform negatives without replacement
    (``sampling='uniform'``), or only the batch's classes (``sampling='batch'``); seeded from
    ``(seed, step, rank)``. ``last_sample`` holds this shard's sampled global class indices.

    Unsampled rows (their gradient is exactly 0):

    * ``unsampled_rows='dense'`` (default, insightface PartialFC_V2): the gradient is a dense
      ``C_shard × D`` tensor with zero rows, so momentum and weight decay still move every row.
      On CPU, when only some rows are sampled, it lives in one buffer the head reuses every
      step: the log-sum-exp returns its sampled rows, which a post-accumulate-grad hook adds
      into that buffer, zeroed in place (``_densify_gradient``), instead of a fresh zeroed
      ``C_shard × D`` tensor whose pages the CPU allocator maps anew each step (on an
      accelerator the caching allocator reuses freed blocks, and a persistent buffer would
      only hold the shard's size through every forward).
    * ``unsampled_rows='frozen'`` (Partial FC v1): call ``attach_optimizer(optimizer)``; around
      each ``optimizer.step()`` the rows not sampled since the previous step keep their weight
      and their rows of every per-parameter state tensor shaped like the weight (rows of state
      created by that step are zeroed). Cost per step: a copy of the unsampled rows of the
      weight and of each such state tensor, saved before and written back after the step
      (≈ (1 − r) × shard × (1 + #state tensors) elements of extra memory). Scalar state, e.g.
      Adam's ``step`` (bias correction), is shared by all rows and still advances.
    * ``unsampled_rows='sparse'`` (Partial FC v1, O(r·C) per step): the gradient is a sparse
      COO tensor of the sampled rows only, and ``attach_optimizer(optimizer)`` (SGD, Adam or
      AdamW) applies the optimizer's own update to those rows and their state alone. The
      result equals ``frozen``; the gradient, the update and its memory traffic scale with
      the sampled rows instead of the shard (see ``_sparse_step``).

    ``step``: pass it to ``forward``, or leave ``None`` to use ``step_count``, which every
    training-mode forward that does so increments. It seeds the sampling and is ``Target.step``.

    The modern losses (``workers.losses`` module docstring):

    * per-row context: for a loss that ``needs_batch``, every global row's target logit (a
      detached all-reduce of B values) and ‖x‖ (gathered) go to ``loss.prepare``, which —
      identically on every rank — updates ``loss_state`` (training mode only) and returns
      the ``(B, k)`` context for ψ (own rows) and φ (every row, in the chunk pass). Per-row
      random draws come from ``(seed, step, global row)``;
    * ``loss_state``: a ``LossState`` module (buffers such as CurricularFace's ``t``,
      parameters such as UniFace's ``b``; None for a stateless loss). Its parameters are
      replicated: their gradient is all-reduced, so every rank holds the same value and
      gradient. It travels in the head checkpoint;
    * sub-centres (``loss.subcenters = K``): ``weight`` is ``C_shard × K·D`` (class c's K
      rows side by side); sampling is by class; cos θ_j is the max over the K rows;
    * ``filter_threshold = τ`` (keyword): Partial FC's inter-class filter, negatives with
      cos θ_j > τ count with cos θ_j = 0 (0 = off; losses with cosine logits only);
    * ``loss.reduction = 'sum'`` (UniFace): the negatives' per-class terms are summed by the
      same chunked Function.

    ``chunk_size``: classes per chunk of the log-sum-exp (peak extra memory O(B·chunk + B·D)
    plus the kept logits and the shard gradient); ``None`` picks ``AUTO_CHUNK_LOGITS / B_global``.
    ``logit_budget_mb``: MiB (2²⁰ bytes) per rank of chunk logits kept from forward for backward,
    which then skips those chunks' products ``x @ Ŵ_cᵀ``; the chunks beyond it are recomputed
    (0: every chunk, memory O(B·chunk) whatever C; see ``ChunkedLSE``). Under autocast
    the embeddings are exchanged and the chunk products run in the autocast dtype, the
    log-sum-exp, the per-row terms and the loss in float32 (float64 inputs stay float64). Do
    not wrap the head in ``DistributedDataParallel``: its
    weight is a shard and its gradients need no all-reduce.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        loss: MarginLoss,
        sample_ratio: float = 1.0,
        sampling: Sampling = "uniform",
        process_group: dist.ProcessGroup | None = None,
        chunk_size: int | None = None,
        *,
        seed: int = 0,
        unsampled_rows: UnsampledRows = "dense",
        filter_threshold: float = 0.0,
        logit_budget_mb: float = DEFAULT_LOGIT_BUDGET_MB,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim = {embedding_dim} must be >= 1")
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio = {sample_ratio} must be in (0, 1]")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size = {chunk_size} must be >= 1")
        if not 0 <= logit_budget_mb < float("inf"):
            raise ValueError(f"logit_budget_mb = {logit_budget_mb} must be finite and >= 0")
        if sampling not in ("uniform", "batch"):
            raise ValueError(f"sampling = {sampling!r} must be one of {{'uniform', 'batch'}}")
        if unsampled_rows not in typing.get_args(UnsampledRows):
            raise ValueError(f"unsampled_rows = {unsampled_rows!r} must be one of "
                             f"{set(typing.get_args(UnsampledRows))}")
        check_filter_threshold(loss, filter_threshold)
        self.shard = HeadShard.from_num_classes(num_classes, process_group)
        self.embedding_dim, self.num_classes, self.loss = embedding_dim, num_classes, loss
        self.sample_ratio, self.sampling, self.chunk_size = sample_ratio, sampling, chunk_size
        self.seed, self.unsampled_rows = seed, unsampled_rows
        self.logit_budget_mb = logit_budget_mb
        self.filter_threshold, self.subcenters = filter_threshold, int(loss.subcenters)
        rows = initial_rows(seed, self.shard.start, self.shard.stop,
                            embedding_dim * self.subcenters)
        self.weight = nn.Parameter(rows.to(device=device, dtype=dtype))
        state = LossState(loss, num_classes, sample_ratio, device=device,
                          dtype=dtype or torch.float32)
        #: the loss's state (buffers and replicated parameters), None for a stateless loss
        self.loss_state: LossState | None = state if len(state) else None
        self.step_count = 0
        self.last_sample: torch.Tensor | None = None
        #: ``[Σ P, Σ LSE(N)]`` over this rank's rows and this shard's sample size, detached,
        #: on the device (no host sync; a training loop reduces them across ranks per epoch)
        self.last_statistics: torch.Tensor | None = None
        #: rows sampled since the last optimizer step (``unsampled_rows='frozen'``)
        self.register_buffer("_touched", torch.zeros(self.shard.size, dtype=torch.bool,
                                                     device=self.weight.device), persistent=False)
        self._frozen: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        #: the dense policies' reused CPU shard gradient (``_densify_gradient``), and the
        #: ``id`` of the Parameter whose hook fills it: a weight substituted by
        #: ``torch.func.functional_call``, or a deep copy's, gets a dense gradient as before
        self._gradient_buffer: torch.Tensor | None = None
        self._densified_weight: int | None = None
        if unsampled_rows != "sparse":
            self.weight.register_post_accumulate_grad_hook(self._densify_gradient)
            self._densified_weight = id(self.weight)

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, "
                f"shard=[{self.shard.start}, {self.shard.stop}), loss={self.loss.describe()}, "
                f"sample_ratio={self.sample_ratio}, sampling={self.sampling!r}, "
                f"chunk_size={self.chunk_size}, logit_budget_mb={self.logit_budget_mb}, "
                f"unsampled_rows={self.unsampled_rows!r}"
                + (f", filter_threshold={self.filter_threshold}" if self.filter_threshold else ""))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        """The loss (same scalar on every rank) of this rank's rows joined with the others'."""
        shard, loss = self.shard, self.loss
        local_labels = local_labels.to(local_embeddings.device)
        sizes = self._batch_sizes(local_embeddings, local_labels)
        if step is None:
            step = self.step_count
            if self.training:
                self.step_count += 1
        acc = torch.float64 if local_embeddings.dtype == torch.float64 else torch.float32
        x_hat = (F.normalize(local_embeddings, dim=1) if loss.normalize_embeddings
                 else local_embeddings)
        # exchanged in the dtype of the products (the autocast dtype under autocast)
        x_global = gather_rows(x_hat.to(self._compute_dtype(x_hat)), sizes, shard)
        labels = all_gather_rows(local_labels, sizes, shard)

        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed(derive_seed("sample", self.seed, step, shard.rank))
        num_sample = 0 if self.sampling == "batch" else int(self.sample_ratio * shard.size)
        sample = sample_classes(labels, shard, num_sample, generator)
        self.last_sample = sample.index + shard.start
        if self.unsampled_rows == "frozen" and torch.is_grad_enabled():
            self._touched[sample.index.to(self._touched.device)] = True

        context = None
        if loss.needs_batch:
            context = self._context(x_global, labels, sample, local_embeddings, sizes, step, acc)
        # LSE first: autograd then runs the (later-created) target branch first, so the target
        # rows' sparse gradient is added in place into the LSE's dense shard gradient instead of
        # a second dense C_shard × D tensor being allocated for the sum
        lse = local_rows(self._negative_lse(x_global, sample, context), sizes, shard)
        target_values = scatter_rows_sum(self._owned_targets(x_global, labels, sample, acc),
                                         sizes, shard)
        norm = local_embeddings.norm(dim=1).to(acc)
        if context is not None:
            start = row_offset(sizes, shard.rank)
            context = context[start : start + sizes[shard.rank]]
        target = Target(logit=target_values[:, 0], embedding_norm=norm,
                        weight_norm=target_values[:, 1], step=step, context=context)
        virtual = loss.virtual_logit(target)
        if virtual is not None:
            lse = torch.logaddexp(lse, virtual)
        positive = loss.positive_logit(target)
        per_sample = loss.combine(positive, lse)
        extra = loss.regularizer(target)
        if extra is not None:
            per_sample = per_sample + extra
        self.last_statistics = torch.stack([
            positive.detach().sum(), lse.detach().clamp_min(-1e30).sum(),
            positive.new_tensor(float(len(sample.index)))]).double()
        return all_reduce_sum(per_sample.sum() / sum(sizes), shard)

    def _owned_targets(self, x_global: torch.Tensor, labels: torch.Tensor,
                       sample: SampledClasses, acc: torch.dtype) -> torch.Tensor:
        """(B_global, 2): ``[x̃·W̃_y, ‖W_y‖]`` for rows whose class is in this shard, else 0
        (K sub-centres: the closest sub-centre's cosine and norm)."""
        owned = (sample.target >= 0).nonzero().squeeze(1)
        w_y = F.embedding(labels[owned] - self.shard.start, self.weight, sparse=True)
        if self.subcenters > 1:
            return self._owned_subcenter_targets(x_global, owned, w_y, acc)
        w_hat_y = F.normalize(w_y, dim=1) if self.loss.normalize_weights else w_y
        values = torch.stack([(x_global[owned].to(acc) * w_hat_y.to(acc)).sum(dim=1),
                              w_y.to(acc).norm(dim=1)], dim=1)
        return values.new_zeros((len(x_global), 2)).index_put((owned,), values)

    def _owned_subcenter_targets(self, x_global: torch.Tensor, owned: torch.Tensor,
                                 w_y: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        w_y = w_y.unflatten(1, (self.subcenters, self.embedding_dim)).to(acc)
        w_hat_y = F.normalize(w_y, dim=2) if self.loss.normalize_weights else w_y
        cos, closest = (w_hat_y @ x_global[owned].to(acc).unsqueeze(2)).squeeze(2).max(dim=1)
        norms = w_y.norm(dim=2).gather(1, closest.unsqueeze(1)).squeeze(1)
        values = torch.stack([cos, norms], dim=1)
        return values.new_zeros((len(x_global), 2)).index_put((owned,), values)

    def _context(self, x_global: torch.Tensor, labels: torch.Tensor, sample: SampledClasses,
                 local_embeddings: torch.Tensor, sizes: list[int], step: int,
                 acc: torch.dtype) -> torch.Tensor | None:
        """The loss's per-row context of the global batch (updating its state when training):
        every row's target logit (a detached all-reduce over the shards) and ‖x‖ (gathered)."""
        shard = self.shard
        with torch.no_grad():
            targets = self._owned_targets(x_global, labels, sample, acc)[:, 0].contiguous()
            if shard.world_size > 1:
                dist.all_reduce(targets, op=dist.ReduceOp.SUM, group=shard.group)
            norms = all_gather_rows(local_embeddings.detach().norm(dim=1).to(acc), sizes, shard)
        batch = Batch(targets, norms, step, self.seed, update=self.training)
        context = self.loss.prepare(batch, self.loss_state)
        return None if context is None else replicated(context, shard)

    def _negative_lse(self, x_global: torch.Tensor, sample: SampledClasses,
                      context: torch.Tensor | None = None) -> torch.Tensor:
        """The replicated (B_global,) ``LSE_{j≠y, j sampled}(φ(z_j))`` over every shard (the
        sum of the φ terms for ``loss.reduction = 'sum'``).

        The base-class ``φ(z) = s·z`` is folded into the embeddings, ``s·(x̃·Ŵ) = (s·x̃)·Ŵ``,
        and the Function gets plain logits (``phi=None``; not with the inter-class filter,
        which compares cosines): no φ pass in forward, none through autograd in backward, and
        a kept chunk needs no pass over its logits at all in backward.
        """
        loss = self.loss
        linear_phi = type(loss).phi is MarginLoss.phi and not self.filter_threshold
        options = LSEOptions(
            phi=None if linear_phi else loss.phi, normalize_weights=loss.normalize_weights,
            chunk_size=self._chunk_size(x_global), shard=self.shard,
            compute_dtype=self._compute_dtype(x_global),
            sparse_weight_grad=self._sparse_weight_gradient(len(sample.index)),
            subcenters=self.subcenters,
            filter_threshold=self.filter_threshold, reduction=loss.reduction,
            logit_budget_bytes=int(self.logit_budget_mb * 2**20))
        x = x_global * loss.scale_value() if linear_phi else x_global
        if context is not None and loss.context_in_phi:
            return ChunkedLSE.apply(x, self.weight, sample.index, sample.target, options, context)
        return ChunkedLSE.apply(x, self.weight, sample.index, sample.target, options)

    def _sparse_weight_gradient(self, sampled: int) -> bool:
        """Whether the log-sum-exp returns the weight's gradient as its ``sampled`` rows:
        always for ``unsampled_rows='sparse'``; for the dense policies on CPU when not every
        row is sampled and ``_densify_gradient`` watches this weight."""
        if self.unsampled_rows == "sparse":
            return True
        return (sampled < self.shard.size and self.weight.device.type == "cpu"
                and id(self.weight) == self._densified_weight)

    @property
    def held_gradient_bytes(self) -> int:
        """Bytes of the reused shard gradient this head holds between steps (0 before the
        first backward that needs it, and off CPU)."""
        buffer = self._gradient_buffer
        return 0 if buffer is None else buffer.numel() * buffer.element_size()

    def _densify_gradient(self, weight: torch.Tensor) -> None:
        """After autograd accumulated ``weight.grad``: a sparse one (rows of this step's sample,
        the first backward since the gradient was reset) becomes the reused dense buffer,
        zeroed in place plus those rows. A dense one (already the buffer, or the user's) had
        the rows added in place by autograd and is left alone."""
        gradient = weight.grad
        if gradient is None or not gradient.is_sparse:
            return
        buffer = self._gradient_buffer
        if (buffer is None or buffer.shape != weight.shape or buffer.dtype != weight.dtype
                or buffer.device != weight.device):
            buffer = self._gradient_buffer = torch.zeros_like(weight)
        else:
            buffer.zero_()
        weight.grad = buffer.add_(gradient)

    def _chunk_size(self, x: torch.Tensor) -> int:
        """``chunk_size``, or the auto size: a fixed logit budget over the global batch rows."""
        if self.chunk_size is not None:
            return self.chunk_size
        budget = AUTO_CHUNK_LOGITS["cpu" if x.device.type == "cpu" else "accelerator"]
        return max(1, budget // (len(x) * self.subcenters))

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The loss state's parameters: the same on every rank, gradients already summed."""
        return [] if self.loss_state is None else list(self.loss_state.parameters())

    def loss_state_values(self) -> dict[str, float]:
        """The loss state by name (``{}`` for a stateless loss); identical on every rank."""
        return {} if self.loss_state is None else self.loss_state.values()

    def class_centres(self) -> torch.Tensor:
        """(C_shard, D) centres: the weight, or for K sub-centres the normalised sum of each
        class's normalised sub-centres (the direction of their mean)."""
        if self.subcenters == 1:
            return self.weight
        rows = F.normalize(self.weight.unflatten(1, (self.subcenters, self.embedding_dim)), dim=2)
        return F.normalize(rows.sum(dim=1), dim=1)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The autocast dtype when autocast is on for ``x``'s device, else the promoted dtype."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return torch.promote_types(x.dtype, self.weight.dtype)

    def _batch_sizes(self, embeddings: torch.Tensor, labels: torch.Tensor) -> list[int]:
        """Every rank's local batch size; checks every rank's inputs so all ranks raise alike."""
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (batch, {self.embedding_dim}), "
                             f"got shape {tuple(embeddings.shape)}")
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        bounds = torch.stack(labels.aminmax()) if len(labels) else labels.new_zeros(2)
        meta = torch.cat([torch.tensor([len(embeddings), embeddings.shape[1], len(labels)],
                                       device=labels.device), bounds.long()])
        ranks = all_gather_rows(meta.unsqueeze(0), [1] * self.shard.world_size,
                                self.shard).tolist()
        for rank, (rows, width, count, low, high) in enumerate(ranks):
            where = f" on rank {rank}" if self.shard.world_size > 1 else ""
            if width != self.embedding_dim:
                raise ValueError(f"embedding width {width}{where} != embedding_dim "
                                 f"{self.embedding_dim}")
            if count != rows:
                raise ValueError(f"{rows} embeddings but {count} labels{where}")
            bad = low if low < 0 else high
            if not 0 <= bad < self.num_classes:
                raise ValueError(f"label {bad}{where} outside [0, {self.num_classes})")
        sizes = [row[0] for row in ranks]
        if sum(sizes) == 0:
            raise ValueError("the global batch is empty")
        return sizes

    # --- optimizer policy for unsampled rows ----------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Apply ``unsampled_rows='frozen'`` or ``'sparse'`` around ``optimizer.step()``;
        no-op for ``'dense'``.

        Returns the hook handles (``handle.remove()`` detaches them).
        """
        if self.unsampled_rows == "dense":
            return []
        if not any(p is self.weight for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("attach_optimizer: the optimizer does not hold this head's weight")
        if self.unsampled_rows == "sparse":
            check_sparse_optimizer(optimizer)
            return [optimizer.register_step_pre_hook(self._sparse_step)]
        return [optimizer.register_step_pre_hook(self._save_unsampled),
                optimizer.register_step_post_hook(self._restore_unsampled)]

    def _sparse_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Update the sampled rows, then hide the gradient from the optimizer's dense step."""
        gradient = self.weight.grad
        if gradient is not None and gradient.is_sparse:
            sparse_row_step(optimizer, self.weight, gradient)
            self.weight.grad = None

    def _row_tensors(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """The weight and every per-parameter optimizer state tensor shaped like it."""
        state = optimizer.state.get(self.weight, {})
        tensors = {key: value for key, value in state.items()
                   if torch.is_tensor(value) and value.shape == self.weight.shape}
        return {"": self.weight.data, **tensors}

    def _save_unsampled(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        rows = (~self._touched).nonzero().squeeze(1)
        self._frozen = (rows, {key: value[rows].clone()
                               for key, value in self._row_tensors(optimizer).items()})

    @torch.no_grad()
    def _restore_unsampled(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if self._frozen is None:
            return
        rows, saved = self._frozen
        for key, value in self._row_tensors(optimizer).items():
            value[rows] = saved[key] if key in saved else 0
        self._touched.zero_()
        self._frozen = None
