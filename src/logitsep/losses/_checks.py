"""Input validation shared by every loss, kept apart from the computations.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, range or
value) with a message that names the argument and what was expected.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
HALF_DTYPES = (torch.float16, torch.bfloat16)
_VALUE_CHECKS: ContextVar[bool] = ContextVar("logitsep_value_checks", default=True)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn on or off, inside the block, the checks that read tensor *values*: finite logits, class indices in
    range, 0/1 multi-label targets, cosines in ``[−1, 1]`` (shapes, dtypes and arguments are always checked).

    Each such check copies a number from the tensor's device; on a GPU that waits for every queued kernel, once per
    loss call. A training loop whose data were checked once can skip them (``logitsep train`` does on CUDA, where
    it still stops at a non-finite loss, reading the losses a window of steps at a time). With the checks off, bad
    values give NaN or torch's own index errors instead of a ``ValueError``, and cosines are always clamped into
    ``[−1, 1]``. Per thread and per asyncio task (a ``ContextVar``); blocks nest.
    """
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_enabled() -> bool:
    """Whether the value checks of :func:`value_checks` are on here (they are by default)."""
    return _VALUE_CHECKS.get()


def check_logits(logits: object, loss: str, *, name: str = "logits", finite: bool = True) -> Tensor:
    """Validate a ``[m, k]`` floating-point tensor of scores and return it upcast from half precision.

    float16/bfloat16 inputs are computed in float32 (the result is float32); float32/float64 are kept.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{loss}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{loss}: {name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{loss}: {name} must be 2-D [batch, classes], got shape {tuple(logits.shape)}")
    m, k = logits.shape
    if m < 1:
        raise ValueError(f"{loss}: {name} is an empty batch (shape {tuple(logits.shape)})")
    if k < 2:
        raise ValueError(f"{loss}: {name} needs at least 2 classes, got shape {tuple(logits.shape)}")
    # The sum is finite for finite inputs unless it overflows; only then is the exact (slower) check needed.
    # (Summed detached, read as a Python float: no autograd node, no extra isfinite kernel, half the cost.)
    if (finite and _VALUE_CHECKS.get() and not math.isfinite(float(logits.detach().sum()))
            and not bool(torch.isfinite(logits).all())):
        raise ValueError(f"{loss}: {name} contains NaN or infinite values; the loss is not defined there")
    return logits.float() if logits.dtype in HALF_DTYPES else logits


def check_target(target: object, logits: Tensor, loss: str, *, multilabel: bool = False) -> Tensor:
    """Validate class indices ``[m]`` (or, where ``multilabel``, a 0/1 matrix ``[m, k]``).

    Returns the indices as int64, or the 0/1 matrix as a boolean tensor on the logits' device.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{loss}: target must be a torch.Tensor, got {type(target).__name__}")
    m, k = logits.shape
    if target.dim() == 2:
        if not multilabel:
            raise ValueError(
                f"{loss}: target must be 1-D class indices [batch]; got shape {tuple(target.shape)} "
                "(this loss takes no multi-label targets)"
            )
        if tuple(target.shape) != (m, k):
            raise ValueError(
                f"{loss}: multi-label target must have the logits' shape {(m, k)}, got {tuple(target.shape)}"
            )
        if target.dtype != torch.bool:
            if target.is_complex():
                raise TypeError(f"{loss}: target must be real, got dtype {target.dtype}")
            if _VALUE_CHECKS.get() and not bool(((target == 0) | (target == 1)).all()):
                raise ValueError(f"{loss}: multi-label target must contain only 0 and 1")
            target = target != 0
        return target.to(logits.device)
    if target.dim() != 1:
        expected = "[batch] class indices or a [batch, classes] 0/1 matrix" if multilabel else "[batch]"
        raise ValueError(f"{loss}: target must be {expected}, got shape {tuple(target.shape)}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{loss}: target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape[0] != m:
        raise ValueError(f"{loss}: target has {target.shape[0]} entries but logits have {m} rows")
    if _VALUE_CHECKS.get():
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= k:
            raise ValueError(f"{loss}: target values must be in [0, {k}) for {k} classes, got range [{lo}, {hi}]")
    return target.to(device=logits.device, dtype=torch.long)


def check_batch_size(logits: Tensor, loss: str) -> None:
    """Batch losses compare examples with each other: they need at least two."""
    if logits.shape[0] < 2:
        raise ValueError(f"{loss}: a batch loss needs at least 2 examples, got {logits.shape[0]}")


def check_positive(value: object, name: str, loss: str, *, allow_zero: bool = False) -> float:
    """A finite real number > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{loss}: {name} must be finite and {bound}, got {value}")
    return value


def check_reduction(reduction: object, loss: str, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    if reduction not in allowed:
        raise ValueError(f"{loss}: reduction must be one of {allowed}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def reduce(per_example: Tensor, reduction: str) -> Tensor:
    """torch's reduction convention over a per-example vector."""
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example
