"""Data-parallel training: ``torchrun --nproc-per-node N -m logitsep train ...`` (gloo on CPU, NCCL on GPU; gloo
where N processes share fewer GPUs, :func:`cuda_placement`).

An N-process run computes the same updates as a one-process run on the same global batches:

- **Data.** Every rank draws the global batch of the step (``batch_indices``, as one process would) and keeps
  its contiguous shard: rank r takes rows ``[r·B/N, (r+1)·B/N)`` of the ``B = --batch-size`` rows.
- **Losses.** A loss whose value couples the examples of a batch (the paper's ``batch_ce`` and
  ``batch_max_margin``; ``global_batch`` in their registry spec) is computed on the *global* batch: the
  logits are all-gathered with the differentiable ``torch.distributed.nn.functional.all_gather`` (targets with a
  plain all-gather) and every rank evaluates the same global loss L. Gradient scaling: the backward of the
  all-gather *sums* over ranks the gradients that flow into each rank's logits, so rank r receives
  N·∂L/∂z_r; DDP then *averages* the parameter gradients over the N ranks, giving (1/N)·Σ_r N·∂L/∂z_r·∂z_r/∂θ
  = ∂L/∂θ, the one-process gradient. A per-example loss with ``reduction="mean"`` stays local: the mean over
  ranks of the shard means is the global mean (equal shards), which is what DDP's averaging computes. A loss
  that draws random numbers per example (``nce`` with ``sampled=True``, ``elasticface`` with ``std > 0``) also
  takes the global batch: every rank holds the same RNG state (same seed, same draws), so every rank then draws
  exactly what one process would, where per shard each rank would repeat rank 0's draws for its own examples.
- **Batch norm** normalises with the statistics of the global batch and updates the running statistics
  identically on every rank: :class:`GlobalBatchNorm` on CPU (``torch.nn.SyncBatchNorm`` refuses CPU
  tensors) and ``SyncBatchNorm`` on CUDA with NCCL (it exchanges only the per-channel statistics). Only when N > 1.
- Only rank 0 writes files and shows a progress bar (:func:`Context.is_main`).
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .losses import loss_spec


def world_size() -> int:
    """Number of processes of the initialised process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when there is no process group; torchrun's ``RANK`` before it is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@dataclass
class Context:
    """Where this process stands in a (possibly one-process) data-parallel run."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # this module initialised the process group and destroys it in close()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` rows (equal contiguous shards, in rank order)."""
        if batch_size % self.world_size:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the number of processes "
                             f"{self.world_size} (each takes an equal shard)")
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def wait_for_all(ctx: Context) -> None:
    """A barrier over the ranks of a multi-process run (nothing alone)."""
    if ctx.world_size > 1:
        dist.barrier()


def setup(device: str) -> Context:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1 in the environment), or use the one
    already initialised by the caller, or run alone. Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``
    (one GPU per process) and the backend is NCCL, or with fewer GPUs than processes a shared one over gloo
    (:func:`cuda_placement`); on CPU it is gloo. In a caller's group, ``"cuda"`` without
    an index becomes ``cuda:LOCAL_RANK`` (or ``cuda:RANK``)."""
    dev = torch.device(device)
    initialised = dist.is_available() and dist.is_initialized()
    launched = not initialised and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "gloo"
    if dev.type == "cuda" and (launched or (world_size() > 1 and dev.index is None)):
        local = int(os.environ.get("LOCAL_RANK", rank()))
        index, backend = cuda_placement(local, int(os.environ.get("LOCAL_WORLD_SIZE", world_size())),
                                        torch.cuda.device_count())
        if backend == "gloo" and launched and local == 0:
            warnings.warn(f"{os.environ.get('LOCAL_WORLD_SIZE')} processes share {torch.cuda.device_count()} "
                          "CUDA device(s): gloo instead of NCCL, which refuses two ranks on one device (the results "
                          "are the same; the collectives go through host memory)", stacklevel=2)
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if launched:
        dist.init_process_group(backend=backend)
    n = world_size()
    return Context(rank=rank() if n > 1 else 0, world_size=n, device=dev, owns_group=launched)


def cuda_placement(local_rank: int, local_world_size: int, devices: int) -> tuple[int, str]:
    """The CUDA device index and the process-group backend of the process ``local_rank`` of ``local_world_size``
    on this host: one device each and NCCL where there are enough devices; else the processes take the devices
    in turn (rank r on device r mod count) and talk over gloo, since NCCL refuses two ranks on one device. That
    runs N-process training (``--shard-head``) on a machine with one GPU: slower, the same results."""
    if devices < 1:
        raise ValueError("--device cuda, but torch sees no CUDA device here")
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"LOCAL_RANK {local_rank} is not in [0, LOCAL_WORLD_SIZE={local_world_size})")
    if local_world_size <= devices:
        return local_rank, "nccl"
    return local_rank % devices, "gloo"


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along dim 0 in rank order; differentiable: the gradient
    of each rank's rows is summed over the ranks that used them (``torch.distributed.nn.functional.all_gather``,
    whose backward works on gloo as well as NCCL; recent torch marks it deprecated in favour of a private
    module, so its FutureWarning is silenced here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_nn.all_gather(x.contiguous())
    return torch.cat(parts)


def _all_gather_plain(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def couples_examples(loss_fn: nn.Module) -> bool:
    """Whether the loss must be computed on the global batch: it couples the examples of a batch, or draws random
    numbers per example (its registry spec says which, :meth:`~logitsep.losses.LossSpec.needs_global_batch`)."""
    return loss_spec(loss_fn).needs_global_batch(loss_fn)


def batch_loss(loss_fn: nn.Module, logits: Tensor, target: Tensor) -> Tensor:
    """``loss_fn(logits, target)``, over the global batch when the loss couples examples and N > 1 (see the
    module docstring for why this gives, after DDP's gradient averaging, exactly the one-process gradient)."""
    if world_size() > 1 and couples_examples(loss_fn):
        return loss_fn(all_gather_rows(logits), _all_gather_plain(target))
    return loss_fn(logits, target)


def average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of a module trained outside DDP (meal_v2's discriminator)."""
    if world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def mean_over_ranks(x: Tensor) -> Tensor:
    """The element-wise mean of ``x`` over the ranks (``x`` itself when alone)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics are those of the global batch of a data-parallel step.

    In training with N > 1 processes it all-gathers its input (differentiably), applies ordinary batch norm to
    the whole batch (so the running mean and variance are updated exactly as one process would, identically on
    every rank) and returns this rank's rows. Alone, or in evaluation mode, it is ``nn.BatchNorm{1,2,3}d``.
    Every rank must pass the same number of rows. Parameter and buffer names are those of ``nn.BatchNorm*d``,
    so checkpoints are interchangeable.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2-D input [batch, channels, ...], got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        n = world_size()
        if not self.training or n == 1:
            return super().forward(x)
        out = super().forward(all_gather_rows(x))
        return out.narrow(0, dist.get_rank() * x.shape[0], x.shape[0])

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every ``nn.BatchNorm*d`` in ``module`` by a GlobalBatchNorm sharing its parameters and buffers."""
        if isinstance(module, _BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            return out
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def convert_batchnorm(model: nn.Module, ctx: Context) -> nn.Module:
    """Under N > 1 processes, make every batch norm of ``model`` use global-batch statistics (in place)."""
    if ctx.world_size == 1:
        return model
    if ctx.device.type == "cuda" and dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)  # CPU, and GPUs shared over gloo (cuda_placement)


def data_parallel(model: nn.Module, ctx: Context) -> nn.Module:
    """``DistributedDataParallel(model)`` under N > 1 processes (gradients averaged over ranks), else ``model``.

    Buffers are not broadcast: the global-batch batch norm keeps them identical on every rank already. A model
    with nothing to train (``--shard-head`` on ``--model linear``: the backbone is the identity) is returned as
    it is: there are no gradients to average, and DDP refuses such a module."""
    if ctx.world_size == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)
