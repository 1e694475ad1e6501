"""Model-parallel (class-sharded) linear head, as in Partial FC: for heads too large for one device.

**Layout.** With N processes in a ``torch.distributed`` group, rank r holds the rows ``[start, stop)`` of the
``k × d`` weight ``W`` and of the bias ``b`` of a linear head (:class:`ShardedLinearHead`): contiguous shards in rank
order whose sizes differ by at most one (:func:`shard_bounds`; the first ``k mod N`` ranks hold one row more; every
rank holds at least one class, so ``k >= N``). The backbone stays data-parallel: each rank has its own *local* batch
of ``M_r`` examples (sizes may differ), and :func:`gather_features` all-gathers the features into the *global* batch
``H [M, d]`` (``M = Σ_r M_r``, rank order) on every rank; rank r computes the logits of its classes for the whole
global batch, ``Z_r = H W_rᵀ + b_r`` (``[M, k_r]``), and never the ``[M, k]`` matrix.

**Losses** (:func:`sharded_loss`, :func:`loss_on_logit_shard`) are exact: their values and gradients equal those
of :mod:`logitsep.losses` on the full logits of the global batch (same ``reduction`` semantics), up to rounding:

* ``ce`` (and ``self_norm``): per row the global log-sum-exp, ``m_i + log Σ_r Σ_{j∈r} exp(z_ij − m_i)`` with ``m_i``
  the row maximum all-reduced (MAX, detached: the log-sum-exp does not depend on it, and every term is ``<= 1``),
  the sums of exponentials all-reduced, and the true logit ``z_{i,y_i}`` taken from the rank that holds class
  ``y_i`` (all-reduced with zeros elsewhere);
* ``batch_ce``: one log-sum-exp over all ``M·k`` logits (one maximum, one sum), the true logits as above;
* ``bce`` and exact ``nce`` (uniform or a given noise distribution ``q``; the shift ``log(t·q_j)`` uses the global
  ``k``): each rank sums its classes' terms per row, and the per-row sums are all-reduced.

**Gradients.** Every rank computes the same loss value L (replicated) and calls ``backward()`` on it (all ranks
must: the backward holds a collective). The all-reduces of the losses use :class:`_AllReduceSum`, whose backward
is the identity (Megatron's "reduce from the model-parallel region"): everything after the reduction is replicated,
so each rank's copy of ``∂L/∂(sum)`` is the gradient of its own contribution, and rank r obtains exactly
``∂L/∂Z_r``, hence ``∂L/∂W_r`` and ``∂L/∂b_r`` (no averaging of the head: **keep the sharded head out of DDP**). The
feature gradient ``∂L/∂H = Σ_r (∂L/∂Z_r) W_r`` has one term per rank: the backward of :func:`gather_features` sums
the ranks' gradients of rank r's rows (a reduce-scatter), giving exactly ``∂L/∂h_r``. A backbone wrapped in DDP
*averages* its gradients over the N ranks, so there ``feature_grad="ddp"`` multiplies the feature gradient by N
(as Partial FC does): ``(1/N)·Σ_r N·∂L/∂h_r·∂h_r/∂θ = ∂L/∂θ``, the one-process gradient.
(``torch.distributed.nn.functional.all_reduce`` would be wrong here: its backward all-reduces the gradients again,
which gives the gradient of ``Σ_r L = N·L``, N times too large for the head.)

**Communication per step** (b bytes per element, N ranks, global batch M, k/N classes per rank):

* forward: the local batch sizes (``2N`` int64); the features, all-gather, ``M·d·b`` received per rank (``(N−1)/N``
  of it from other ranks); the targets, all-gather, ``8·M``; the loss statistics, all-reduces of ``O(M)`` elements:
  ``ce``/``self_norm`` ``M`` (MAX) + ``2M`` (SUM), ``batch_ce`` 1 (MAX) + ``M + 1`` (SUM), ``bce``/``nce`` ``M``
  (SUM); independent of ``k``.
* backward: the feature gradients, a reduce-scatter of ``M·d`` elements (NCCL; ``≈ M·d·b`` sent per rank; other
  backends, e.g. gloo, an all-reduce, about twice that). The head's gradients are never communicated.
* Compare plain data parallelism with a replicated head: an all-reduce of the ``k·d`` head gradients every step
  (``≈ 2·k·d·b`` per rank). Sharding pays off when ``M ≪ k``; its memory per rank is ``k·d/N`` weights (plus their
  optimizer state) and ``M·k/N`` logits.

**Not supported** (each a clear error): cosine heads (:class:`~logitsep.heads.CosineHead`) and the losses on cosines
(``arcface``, ``cosface``, ``elasticface``, ``norm_softmax``); multi-label ``[M, k]`` targets; sampled ``nce``;
the other registered losses (``max_margin``, ``batch_max_margin``, ``z_loss``, ``smooth_topk_svm``,
``decoupled_softmax``); ``k < N`` (an empty shard). The single-logit methods of a head (``logit``, ``class_vectors``,
…) and checkpoints work on the full head: :meth:`ShardedLinearHead.gather_full`. Optimizer state stays per rank.

**Use in a training step** (backbone in DDP, head not)::

    head = ShardedLinearHead.from_full(full_head, group=group)  # or ShardedLinearHead(d, k, group=group)
    opt = torch.optim.SGD([*ddp_backbone.parameters(), *head.parameters()], lr=...)
    loss = sharded_loss("ce", ddp_backbone(x_local), y_local, head, feature_grad="ddp")
    opt.zero_grad(); loss.backward(); opt.step()   # on every rank; loss is the global-batch loss on every rank

Checkpoint: ``full = head.gather_full(dst=0)`` on every rank (a collective), rank 0 saves ``full.state_dict()``
(keys ``weight``/``bias``, as a :class:`~logitsep.heads.LinearHead`); restore with
``head.load_full_state_dict(state)`` on every rank (each keeps its rows).

Whatever multiplies the loss before ``backward()`` must be the same on every rank (the identity backward of the
sums relies on it). Anything global over the parameters must combine the shards: a gradient-norm clip adds the
all-reduced squared norms of the head's shards to the backbone's; an AMP ``GradScaler`` must skip a step on every
rank when any rank's head gradients overflow (its inf check is per rank); an EMA copy is per shard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .core.checks import HALF_DTYPES, check_positive_int, value_checks_enabled
from .heads import CosineHead, LinearHead
from .losses import get_loss, loss_spec
from .losses.common import reduce

__all__ = [
    "SHARDED_LOSSES",
    "ShardedLinearHead",
    "gather_features",
    "gather_shards",
    "loss_on_logit_shard",
    "shard_bounds",
    "sharded_loss",
]

# The registered losses with an exact sharded form.
SHARDED_LOSSES = ("ce", "self_norm", "batch_ce", "bce", "nce")
FEATURE_GRADS = ("exact", "ddp")


# ------------------------------------------------------------------------------------------ process groups


def _group_placement(group: object) -> tuple[int, int] | None:
    """(rank, world size) in ``group`` (None: the default group), or None without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("sharded: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _world(group: object) -> int:
    placement = _group_placement(group)
    return 1 if placement is None else placement[1]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks in the forward, identity in the backward: correct when everything computed from the sum
    is replicated on every rank (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: object) -> Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def _sum_over_ranks(x: Tensor, group: object, n: int) -> Tensor:
    return x if n == 1 else _AllReduceSum.apply(x, group)


def _max_over_ranks(x: Tensor, group: object, n: int) -> Tensor:
    """Element-wise maximum over the ranks, detached."""
    x = x.detach().clone(memory_format=torch.contiguous_format)
    if n > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def _all_gather_padded(x: Tensor, sizes: list[int], group: object) -> Tensor:
    """Every rank's ``x`` (``sizes[r]`` rows on rank r) concatenated along dim 0 in rank order."""
    most = max(sizes)
    x = x.contiguous()
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows (sizes may differ); the backward sums over the ranks the gradients of this rank's rows
    (a reduce-scatter: NCCL's, or an all-reduce elsewhere) and multiplies them by ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int, group: object,  # type: ignore[override]
                grad_scale: float) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_scale = sizes, rank, group, grad_scale
        return _all_gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        sizes, rank, group = ctx.sizes, ctx.rank, ctx.group
        n, most, tail = len(sizes), max(sizes), grad.shape[1:]
        padded = grad.new_zeros(n, most, *tail)
        offset = 0
        for r, size in enumerate(sizes):
            padded[r, :size] = grad[offset:offset + size]
            offset += size
        if dist.get_backend(group) == "nccl":
            mine = grad.new_empty(most, *tail)
            dist.reduce_scatter_tensor(mine, padded.view(n * most, *tail), group=group)
        else:  # gloo and others: no reduce-scatter everywhere; an all-reduce, keep this rank's part
            dist.all_reduce(padded, group=group)
            mine = padded[rank]
        mine = mine[:sizes[rank]]
        return (mine * ctx.grad_scale if ctx.grad_scale != 1 else mine), None, None, None, None


def _exchange_sizes(rows: int, target_rows: int, device: torch.device, group: object, n: int) -> list[int]:
    """Every rank's local batch size (one all-gather of ``2N`` int64); every rank raises the same error when a rank's
    targets and features disagree."""
    if n == 1:
        sizes = [(rows, target_rows)]
    else:
        mine = torch.tensor([rows, target_rows], dtype=torch.long, device=device)
        parts = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(parts, mine, group=group)
        sizes = [tuple(int(v) for v in p.tolist()) for p in parts]
    bad = [r for r, (a, b) in enumerate(sizes) if a != b]
    if bad:
        raise ValueError(f"sharded: the targets and features of rank(s) {bad} have different numbers of rows "
                         f"(features, targets per rank: {sizes})")
    if sum(a for a, _ in sizes) == 0:
        raise ValueError("sharded: the global batch is empty")
    return [a for a, _ in sizes]


def gather_features(features: Tensor, group: object = None, *, grad_scale: float = 1.0) -> Tensor:
    """The global batch: every rank's ``features`` (``[M_r, ...]``, the same trailing shape and dtype on every rank,
    ``M_r`` may differ) concatenated in rank order, ``[Σ_r M_r, ...]``, on every rank.

    Differentiable: rank r's features receive the sum over the ranks of the gradients of its rows (which is
    ``∂L/∂h_r`` when each rank's part of the loss flows through its copy), times ``grad_scale`` (N under DDP, see the
    module docstring). Alone (no process group, or a group of one) it returns ``features``.
    """
    placement = _group_placement(group)
    if placement is None or placement[1] == 1:
        return features
    rank, n = placement
    sizes = _exchange_sizes(features.shape[0], features.shape[0], features.device, group, n)
    return _GatherRows.apply(features, sizes, rank, group, float(grad_scale))


def gather_shards(x: Tensor, k: int, group: object = None) -> Tensor:
    """Every rank's shard ``x`` of a per-class tensor (rows ``shard_bounds(k, N, r)`` on rank r, e.g. an optimizer's
    momentum of the head's rows) assembled into the full ``[k, ...]`` tensor, on every rank (a collective)."""
    placement = _group_placement(group)
    if placement is None or placement[1] == 1:
        return x
    rank, n = placement
    sizes = [b - a for a, b in (shard_bounds(k, n, r) for r in range(n))]
    if x.shape[0] != sizes[rank]:
        raise ValueError(f"gather_shards: rank {rank} holds {sizes[rank]} of the {k} rows, got {x.shape[0]}")
    return _all_gather_padded(x.detach(), sizes, group)


# ------------------------------------------------------------------------------------------------ the head


def shard_bounds(k: int, world_size: int, rank: int) -> tuple[int, int]:
    """The classes ``[start, stop)`` of rank ``rank`` among ``world_size``: contiguous shards in rank order, the
    first ``k mod world_size`` ranks one class larger; every class is in exactly one shard."""
    k = check_positive_int(k, "k", "shard_bounds")
    world_size = check_positive_int(world_size, "world_size", "shard_bounds")
    rank = check_positive_int(rank, "rank", "shard_bounds", minimum=0)
    if rank >= world_size:
        raise ValueError(f"shard_bounds: rank must be in [0, {world_size}), got {rank}")
    if k < world_size:
        raise ValueError(f"shard_bounds: {k} classes cannot be sharded over {world_size} ranks (every rank needs at "
                         "least one class); use fewer ranks or no sharding")
    base, extra = divmod(k, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardedLinearHead(nn.Module):
    """Rank ``rank``'s shard of a linear head ``z = W h + b`` with ``W [k, d]``: the rows ``[start, stop)`` of ``W``
    (``weight``, ``[k_shard, d]``) and of ``b`` (``bias``, ``[k_shard]``, or None).

    ``forward(h)`` gives the logits of this shard's classes, ``[M, k_shard]`` (column ``j`` is class ``start + j``);
    pass it the *global* batch (:func:`gather_features`), or use :func:`sharded_loss`, which does. The rank and world
    size come from ``group`` (the default group when None); without a process group they may be given (to slice a
    checkpoint offline) and default to 0 and 1. The default initialisation draws from ``nn.Linear``'s distribution,
    ``U(−1/√d, 1/√d)`` (not the numbers a one-process head would draw: use :meth:`from_full` for those). Keep the
    head out of DDP: its gradients are complete on each rank, and its shards differ.
    """

    def __init__(self, d: int, k: int, *, bias: bool = True, group: object = None, rank: int | None = None,
                 world_size: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.d = check_positive_int(d, "d", "ShardedLinearHead")
        self.k = check_positive_int(k, "k", "ShardedLinearHead")
        self.group = group
        self.rank, self.world_size = _placement(group, rank, world_size)
        self.start, self.stop = shard_bounds(self.k, self.world_size, self.rank)
        self.weight = nn.Parameter(torch.empty(self.k_shard, self.d, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.k_shard, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def k_shard(self) -> int:
        """The number of classes of this shard, ``stop − start``."""
        return self.stop - self.start

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, h: Tensor) -> Tensor:
        """This shard's logits ``h W[start:stop]ᵀ + b[start:stop]``, ``[M, k_shard]``."""
        if not isinstance(h, Tensor) or not h.is_floating_point() or h.dim() != 2 or h.shape[1] != self.d:
            shown = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise ValueError(f"ShardedLinearHead: h must be a floating [batch, {self.d}] tensor, got {shown}")
        return F.linear(h, self.weight, self.bias)

    @classmethod
    def from_full(cls, head: nn.Module, *, group: object = None, rank: int | None = None,
                  world_size: int | None = None) -> ShardedLinearHead:
        """This rank's shard of a full linear head (a :class:`~logitsep.heads.LinearHead` or ``nn.Linear``): a copy
        of its rows ``[start, stop)``, on its device and dtype. Built on every rank from the same full head (same
        seed), the shards together are that head."""
        if isinstance(head, CosineHead):
            raise TypeError("ShardedLinearHead: cosine heads cannot be sharded (only linear heads z = Wh + b); "
                            "train a linear head or use data parallelism")
        if not isinstance(head, nn.Linear):
            raise TypeError(f"ShardedLinearHead.from_full: expected a LinearHead or nn.Linear, "
                            f"got {type(head).__name__}")
        w = head.weight
        out = cls(w.shape[1], w.shape[0], bias=head.bias is not None, group=group, rank=rank, world_size=world_size,
                  device=w.device, dtype=w.dtype)
        out.load_full_state_dict(head.state_dict())
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load this shard's rows from the state dict of the full head (``weight [k, d]``, ``bias [k]``: what
        ``gather_full().state_dict()`` saved)."""
        expected = {"weight"} | ({"bias"} if self.bias is not None else set())
        if set(state) != expected:
            raise ValueError(f"ShardedLinearHead: a full head's state dict has keys {sorted(expected)}, "
                             f"got {sorted(state)}")
        if tuple(state["weight"].shape) != (self.k, self.d):
            raise ValueError(f"ShardedLinearHead: the full weight must be [{self.k}, {self.d}], "
                             f"got {list(state['weight'].shape)}")
        self.weight.copy_(state["weight"][self.start:self.stop])
        if self.bias is not None:
            if tuple(state["bias"].shape) != (self.k,):
                raise ValueError(f"ShardedLinearHead: the full bias must be [{self.k}], "
                                 f"got {list(state['bias'].shape)}")
            self.bias.copy_(state["bias"][self.start:self.stop])

    @torch.no_grad()
    def gather_full(self, dst: int | None = 0, device: torch.device | str | None = None) -> LinearHead | None:
        """The full head, assembled from every rank's shard (a collective: call it on every rank): a
        :class:`~logitsep.heads.LinearHead` on rank ``dst`` of the group (every rank when ``dst`` is None) and None
        elsewhere; on ``device`` (default: the shards'). For checkpoints and single-logit inference."""
        n = self.world_size
        weight, bias = self.weight.detach(), None if self.bias is None else self.bias.detach()
        if n == 1:
            full_w, full_b = weight.clone(), None if bias is None else bias.clone()
        else:
            if _world(self.group) != n:
                raise ValueError(f"ShardedLinearHead.gather_full: the head is shard {self.rank} of {n} but there is "
                                 "no process group of that size")
            if dst is not None and not 0 <= dst < n:
                raise ValueError(f"ShardedLinearHead.gather_full: dst must be a rank in [0, {n}) or None, got {dst}")
            rows = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
            sizes = [b - a for a, b in (shard_bounds(self.k, n, r) for r in range(n))]
            if dst is None:
                full = _all_gather_padded(rows, sizes, self.group)
            else:
                most = max(sizes)
                padded = torch.cat([rows, rows.new_zeros(most - rows.shape[0], rows.shape[1])])
                parts = [torch.empty_like(padded) for _ in range(n)] if self.rank == dst else None
                target = dst if self.group is None else dist.get_global_rank(self.group, dst)
                dist.gather(padded, parts, dst=target, group=self.group)
                if self.rank != dst:
                    return None
                full = torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])
            full_w = full[:, :self.d]
            full_b = None if bias is None else full[:, self.d]
        with torch.device("meta"):  # no k×d initialisation that would be overwritten at once
            head = LinearHead(self.d, self.k, bias=bias is not None)
        head.weight = nn.Parameter(full_w.to(device).contiguous())
        if full_b is not None:
            head.bias = nn.Parameter(full_b.to(device).contiguous())
        return head

    def extra_repr(self) -> str:
        return (f"d={self.d}, k={self.k}, classes=[{self.start}, {self.stop}), rank={self.rank}, "
                f"world_size={self.world_size}, bias={self.bias is not None}")


def _placement(group: object, rank: int | None, world_size: int | None) -> tuple[int, int]:
    placement = _group_placement(group)
    if placement is None:
        if group is not None:
            raise ValueError("ShardedLinearHead: a process group was given but torch.distributed is not initialised")
        rank = 0 if rank is None else check_positive_int(rank, "rank", "ShardedLinearHead", minimum=0)
        world_size = 1 if world_size is None else check_positive_int(world_size, "world_size", "ShardedLinearHead")
        if rank >= world_size:
            raise ValueError(f"ShardedLinearHead: rank must be in [0, {world_size}), got {rank}")
        return rank, world_size
    if (rank is not None and rank != placement[0]) or (world_size is not None and world_size != placement[1]):
        raise ValueError(f"ShardedLinearHead: rank {rank} of {world_size} disagrees with the process group "
                         f"(rank {placement[0]} of {placement[1]}); leave them out to take the group's")
    return placement


# ---------------------------------------------------------------------------------------------- the losses


def _settings(loss: str | nn.Module, kwargs: dict[str, object]) -> nn.Module:
    """The built loss module (its arguments checked by its constructor), refused when it has no sharded form."""
    if isinstance(loss, str):
        module = get_loss(loss, **kwargs)
    elif isinstance(loss, nn.Module):
        if kwargs:
            raise TypeError("sharded loss: pass the loss's keyword arguments with its name, not with a built module")
        module = loss
    else:
        raise TypeError(f"sharded loss: loss must be a registered name or a loss module, got {type(loss).__name__}")
    spec = loss_spec(module)
    if spec.inputs == "cosines":
        raise ValueError(f"sharded loss: {spec.name!r} takes the cosines of a CosineHead; cosine heads are not "
                         f"sharded (supported: {', '.join(SHARDED_LOSSES)})")
    if spec.name not in SHARDED_LOSSES:
        raise ValueError(f"sharded loss: {spec.name!r} has no sharded form; supported: {', '.join(SHARDED_LOSSES)}")
    if spec.name == "nce" and module.sampled:
        raise ValueError("sharded loss: sampled nce is not supported (its draws would need the global k on one "
                         "rank); use the exact nce, sampled=False")
    return module


def _check_logit_shard(logits: object, k: int, start: int, where: str) -> Tensor:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        shown = (f"shape {tuple(logits.shape)}, dtype {logits.dtype}" if isinstance(logits, Tensor)
                 else type(logits).__name__)
        raise TypeError(f"{where}: logits must be a floating [batch, classes of the shard] tensor, got {shown}")
    if k < 2:
        raise ValueError(f"{where}: the head needs at least 2 classes, got k={k}")
    if logits.shape[0] < 1 or logits.shape[1] < 1 or not 0 <= start or start + logits.shape[1] > k:
        raise ValueError(f"{where}: logits of shape {tuple(logits.shape)} are not a shard of the classes "
                         f"[{start}, ...) of k={k} for a non-empty batch")
    return logits.float() if logits.dtype in HALF_DTYPES else logits


def _check_index_shape(target: object, where: str) -> None:
    """``target`` must be a tensor of ``[batch]`` class indices (the sharded losses take no multi-label targets)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{where}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dim() == 2:
        raise ValueError(f"{where}: multi-label [batch, classes] targets are not supported by the sharded losses; "
                         "give class indices [batch]")
    if target.dim() != 1:
        raise ValueError(f"{where}: target must be [batch] class indices, got shape {tuple(target.shape)}")


def _check_global_target(target: object, m: int, k: int, where: str, device: torch.device) -> Tensor:
    _check_index_shape(target, where)
    assert isinstance(target, Tensor)
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{where}: target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape[0] != m:
        raise ValueError(f"{where}: target has {target.shape[0]} entries but logits have {m} rows")
    if value_checks_enabled():
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= k:
            raise ValueError(f"{where}: target values must be in [0, {k}) for {k} classes, got range [{lo}, {hi}]")
    return target.to(device=device, dtype=torch.long)


def _noise_vector(noise: Tensor, k: int, z: Tensor) -> Tensor:
    """``q`` as a probability vector in the logits' dtype (the checks and normalisation of exact ``nce``)."""
    if noise.dim() != 1 or noise.shape[0] != k:
        raise ValueError(f"sharded nce: noise must be a probability vector of length {k}, got {tuple(noise.shape)}")
    q = noise.detach().double()
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError("sharded nce: noise must have finite, non-negative entries")
    total = float(q.sum())
    if abs(total - 1.0) > max(1e-4, torch.finfo(noise.dtype).eps):
        raise ValueError(f"sharded nce: noise must sum to 1, got {total:.6g}")
    return (q / total).to(device=z.device, dtype=z.dtype)


class _Softplus(torch.autograd.Function):
    """``F.softplus`` with the exact slope ``σ(x)`` in the backward, as the registered ``bce`` and ``nce`` have (torch's
    own backward takes the slope 1 past ``x = 20``, off by up to ``e^−20 ≈ 2e-9``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def _shard_per_row(module: nn.Module, z: Tensor, y: Tensor, k: int, start: int, group: object, n: int) -> Tensor:
    """The per-example loss ``[M]`` of the global batch, replicated on every rank (see the module docstring)."""
    name = loss_spec(module).name
    m, width = z.shape
    in_shard = (y >= start) & (y < start + width)
    local_y = (y - start).clamp(0, width - 1)
    true = z.gather(1, local_y[:, None]).squeeze(1)  # meaningful only where in_shard
    if name in ("ce", "self_norm"):
        row_max = _max_over_ranks(z.amax(dim=1), group, n)
        local = torch.stack([torch.exp(z - row_max[:, None]).sum(dim=1), torch.where(in_shard, true, 0.0)])
        sums = _sum_over_ranks(local, group, n)
        lse = row_max + torch.log(sums[0])
        nll = lse - sums[1]
        return nll if name == "ce" else nll + module.alpha * lse.square()
    if name == "batch_ce":
        if m < 2:
            raise ValueError(f"sharded batch_ce: a batch loss needs at least 2 examples, got {m}")
        top = _max_over_ranks(z.amax().reshape(1), group, n)
        local = torch.cat([torch.exp(z - top).sum().reshape(1), torch.where(in_shard, true, 0.0)])
        sums = _sum_over_ranks(local, group, n)
        log_normaliser = top + torch.log(sums[:1])
        return log_normaliser - sums[1:] - math.log(m)
    if name == "bce":  # softplus(−z) at the target, softplus(z) elsewhere: each term as such (no cancellation)
        onehot = in_shard[:, None] & (torch.arange(width, device=z.device) == local_y[:, None])
        return _sum_over_ranks(_Softplus.apply(torch.where(onehot, -z, z)).sum(dim=1), group, n)
    # exact nce: t·Σ_j q_j·softplus(z_j − log(t·q_j)) + softplus(log(t·q_y) − z_y)
    t = float(module.num_noise)
    if module.noise is None:
        shift = data_shift = math.log(t / k)
        noise_part = _Softplus.apply(z - shift).sum(dim=1) * (t / k)
    else:
        q = _noise_vector(module.noise, k, z)
        log_tq = math.log(t) + torch.log(q.clamp_min(torch.finfo(z.dtype).tiny))
        shift, data_shift = log_tq[start:start + width], log_tq[y]
        noise_part = _Softplus.apply(z - shift) @ (t * q[start:start + width])
    data_part = torch.where(in_shard, _Softplus.apply(data_shift - true), 0.0)
    return _sum_over_ranks(noise_part + data_part, group, n)


def loss_on_logit_shard(loss: str | nn.Module, logits: Tensor, target: Tensor, *, k: int, start: int,
                        group: object = None, **loss_kwargs: object) -> Tensor:
    """The loss of the global batch from this rank's shard of its logits (a collective: call it on every rank).

    ``logits [M, k_shard]``: the logits of this rank's classes ``[start, start + k_shard)`` of ``k``
    (:func:`shard_bounds`; checked) for the *global* batch; ``target [M]``: the global class indices (the same on
    every rank). ``loss``: a name of :data:`SHARDED_LOSSES` (with ``loss_kwargs``, e.g. ``num_noise=5``,
    ``reduction="sum"``) or a built loss module. Returns, on every rank, what the registered loss gives on the full
    ``[M, k]`` logits (with ``reduction="none"``, the ``[M]`` per-example losses of the global batch); its backward
    gives this rank's logits exactly their gradient.
    """
    module = _settings(loss, loss_kwargs)
    name = loss_spec(module).name
    where = f"sharded {name}"
    z = _check_logit_shard(logits, k, start, where)
    rank, n = _group_placement(group) or (0, 1)
    if (start, start + z.shape[1]) != shard_bounds(k, n, rank):
        raise ValueError(f"{where}: rank {rank} of {n} holds the classes {list(shard_bounds(k, n, rank))} of k={k}, "
                         f"got logits of the classes [{start}, {start + z.shape[1]})")
    y = _check_global_target(target, z.shape[0], k, where, z.device)
    per_row = _shard_per_row(module, z, y, k, start, group, n)
    # per_row is replicated on every rank: every rank takes the same decision
    if value_checks_enabled() and not bool(torch.isfinite(per_row.detach()).all()):
        raise ValueError(f"{where}: the logits of the global batch contain NaN or infinite values; "
                         "the loss is not defined there")
    return reduce(per_row, module.reduction)


def sharded_loss(loss: str | nn.Module, features: Tensor, target: Tensor, head: ShardedLinearHead, *,
                 feature_grad: str = "exact", **loss_kwargs: object) -> Tensor:
    """The loss of the global batch for a class-sharded linear head (a collective: call it, and ``backward()`` on
    its result, on every rank of ``head.group``).

    ``features [M_r, d]`` and ``target [M_r]`` (class indices) are this rank's local batch. The features are
    all-gathered (:func:`gather_features`), the head gives this rank's logits of the global batch, and
    :func:`loss_on_logit_shard` reduces them. The result is the loss one process computes on the global batch with
    the full head (the same value on every rank, nothing to average for logging).

    Gradients: ``head.weight``/``head.bias`` get exactly ``∂L/∂W[start:stop]``, ``∂L/∂b[start:stop]``; the local
    features get ``∂L/∂h_r`` with ``feature_grad="exact"``, and ``N·∂L/∂h_r`` with ``feature_grad="ddp"``, what a
    backbone in ``DistributedDataParallel`` (which averages its gradients over the N ranks) needs to end with the
    one-process gradient.
    """
    if feature_grad not in FEATURE_GRADS:
        raise ValueError(f"sharded_loss: feature_grad must be one of {FEATURE_GRADS}, got {feature_grad!r}")
    if not isinstance(head, ShardedLinearHead):
        raise TypeError(f"sharded_loss: head must be a ShardedLinearHead, got {type(head).__name__}")
    module = _settings(loss, loss_kwargs)
    where = f"sharded {loss_spec(module).name}"
    n = _world(head.group)
    if n != head.world_size:
        raise ValueError(f"{where}: the head is shard {head.rank} of {head.world_size} but its process group has "
                         f"{n} rank(s)")
    if not isinstance(features, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{where}: features and target must be torch.Tensors")
    if features.dim() != 2 or features.shape[1] != head.d:
        raise ValueError(f"{where}: features must be [batch, {head.d}], got shape {tuple(features.shape)}")
    _check_index_shape(target, where)
    if n == 1:
        h, y = features, target
    else:
        sizes = _exchange_sizes(features.shape[0], target.shape[0], features.device, head.group, n)
        scale = float(n) if feature_grad == "ddp" else 1.0
        h = _GatherRows.apply(features, sizes, head.rank, head.group, scale)
        y = _all_gather_padded(target.to(features.device), sizes, head.group)
    return loss_on_logit_shard(module, head(h), y, k=head.k, start=head.start, group=head.group)
