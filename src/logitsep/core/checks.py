"""Every input check of logitsep, in one place, kept apart from the computations.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, range or value)
with a message that names the argument, what was expected and what was given; it returns the value converted to
the form the computation takes. ``where`` (a loss, a head, a command) prefixes the message.

* numbers: :func:`check_positive_int`, :func:`check_positive`, :func:`check_fraction`, :func:`check_threshold`,
  :func:`check_top_k`;
* classes: :func:`check_class` (one index), :func:`parse_class` (an index or a class name: the one rule for
  both), :func:`class_indices` (a list of classes), :func:`per_example_classes` (one class per row);
* torch logits and targets of the losses: :func:`check_logits`, :func:`check_target`, :func:`check_reduction`,
  :func:`check_batch_size`; the :func:`value_checks` switch turns off the checks that read tensor values;
* numpy (or torch) score matrices and labels of the metrics: :func:`to_numpy`, :func:`check_scores`,
  :func:`check_labels`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import numpy as np
import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
HALF_DTYPES = (torch.float16, torch.bfloat16)
_VALUE_CHECKS: ContextVar[bool] = ContextVar("logitsep_value_checks", default=True)


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _is_integer(value: object) -> bool:
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
    return isinstance(value, (numbers.Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


# ------------------------------------------------------------------------------------------------- numbers


def check_positive_int(value: object, name: str, where: str = "", *, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (1 by default); ``bool`` is refused (``True`` is not a size)."""
    if not _is_integer(value) or int(value) < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{_prefix(where)}{name} must be {what}, got {value!r}")
    return int(value)


def check_positive(value: object, name: str, where: str = "", *, allow_zero: bool = False) -> float:
    """A finite real number ``> 0`` (or ``>= 0`` with ``allow_zero``)."""
    if not _is_real(value):
        raise TypeError(f"{_prefix(where)}{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{_prefix(where)}{name} must be finite and {bound}, got {value}")
    return value


def check_fraction(value: object, name: str, where: str = "") -> float:
    """A real number in ``(0, 1]`` (a target precision or recall, a recall level)."""
    if not _is_real(value):
        raise TypeError(f"{_prefix(where)}{name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{_prefix(where)}{name} must be in (0, 1], got {value}")
    return float(value)


def check_threshold(value: object, name: str = "threshold", where: str = "") -> float:
    """A finite real number (a decision threshold on logits); ``bool`` is refused."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{_prefix(where)}{name} must be a finite number, got {value!r}")
    return float(value)


def check_top_k(value: object, where: str = "") -> int | None:
    """None, or a positive integer."""
    if value is None:
        return None
    if not _is_integer(value) or int(value) < 1:
        raise ValueError(f"{_prefix(where)}top_k must be a positive integer or None, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------- classes


def _out_of_range(lo: int, hi: int, k: int, where: str) -> ValueError:
    """The one message for class indices outside ``[0, k)``: the first bad one, the valid range, the range given."""
    bad = lo if lo < 0 else hi
    return ValueError(f"{_prefix(where)}unknown class {bad}: class indices are in [0, {k}), got range [{lo}, {hi}]")


def check_class(c: object, k: int, where: str = "", name: str = "class") -> int:
    """One class index: an integer (not a bool) in ``[0, k)``."""
    if not _is_integer(c):
        raise TypeError(f"{_prefix(where)}{name} must be an integer class index, got {c!r}")
    if not 0 <= int(c) < k:
        raise ValueError(f"{_prefix(where)}unknown {name} {int(c)}: class indices are in [0, {k})")
    return int(c)


def parse_class(c: object, names: Sequence[str], where: str = "") -> int:
    """A class as an index, from an integer in ``[0, k)``, a class name, or a string of an index. A name wins
    when it is also a number (class "7" of a dataset whose names are digits); ``k = len(names)``."""
    if isinstance(c, Tensor) and c.dim() == 0 and not (c.is_floating_point() or c.dtype == torch.bool):
        c = int(c)
    if isinstance(c, str):
        if c in names:
            return list(names).index(c)
        if not re.fullmatch(r"\s*[+-]?\d+\s*", c):
            shown = ", ".join(map(str, names[:20])) + (", …" if len(names) > 20 else "")
            raise ValueError(f"{_prefix(where)}unknown class {c!r}: give an index in [0, {len(names)}) or one of "
                             f"the class names ({shown})")
        c = int(c)
    if not _is_integer(c):
        raise TypeError(f"{_prefix(where)}a class must be an int index or a class name, got {type(c).__name__}")
    return check_class(c, len(names), where)


def class_indices(classes: object, k: int, where: str = "") -> Tensor:
    """Classes as a 1-D int64 CPU tensor of indices in ``[0, k)`` (duplicates allowed), from an int, a sequence
    of ints, a numpy array or a 0-/1-D integer tensor."""
    if _is_integer(classes):
        classes = [int(classes)]
    if isinstance(classes, np.ndarray):
        classes = torch.from_numpy(classes)
    if not isinstance(classes, Tensor):
        if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, range)):
            raise TypeError(f"{_prefix(where)}classes must be an int, a list of ints or an integer tensor, "
                            f"got {type(classes).__name__}")
        values = list(classes)
        if not all(_is_integer(v) for v in values):
            raise TypeError(f"{_prefix(where)}class indices must be integers, got {values!r}")
        classes = torch.tensor([int(v) for v in values], dtype=torch.long)
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise TypeError(f"{_prefix(where)}class indices must be integers, got dtype {classes.dtype}")
    classes = classes.reshape(-1) if classes.dim() == 0 else classes
    if classes.dim() != 1:
        raise ValueError(f"{_prefix(where)}classes must be a 1-D list of class indices, got shape "
                         f"{tuple(classes.shape)}")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= k):
        raise _out_of_range(int(classes.min()), int(classes.max()), k, where)
    return classes.long().cpu()


def per_example_classes(c: object, m: int, k: int, where: str = "") -> int | Tensor:
    """One class for every example (an int, or a 0-d integer tensor) or one per example (a ``[m]`` integer
    tensor, returned as int64 on its device)."""
    if type(c) is int and 0 <= c < k:  # the common query, checked without the ABC machinery below
        return c
    if isinstance(c, Tensor):
        if c.dtype == torch.bool or c.is_floating_point() or c.is_complex():
            raise TypeError(f"{_prefix(where)}class indices must be integers, got dtype {c.dtype}")
        if c.dim() == 0:
            return check_class(int(c), k, where)
        if c.dim() != 1 or c.shape[0] != m:
            raise ValueError(f"{_prefix(where)}c must be an int or a [{m}] tensor of class indices, got shape "
                             f"{tuple(c.shape)}")
        if m > 0:
            lo, hi = int(c.min()), int(c.max())
            if lo < 0 or hi >= k:
                raise _out_of_range(lo, hi, k, where)
        return c.long()
    if not _is_integer(c):
        raise TypeError(f"{_prefix(where)}c must be an int or an integer tensor, got {type(c).__name__}")
    return check_class(c, k, where)


# --------------------------------------------------------------------------------- torch: logits of a loss


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


def check_logits(logits: object, where: str, *, name: str = "logits", finite: bool = True) -> Tensor:
    """Validate a ``[m, k]`` floating-point tensor of scores and return it upcast from half precision.

    float16/bfloat16 inputs are computed in float32 (the result is float32); float32/float64 are kept.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"{where}: {name} must be 2-D [batch, classes], got shape {tuple(logits.shape)}")
    m, k = logits.shape
    if m < 1:
        raise ValueError(f"{where}: {name} is an empty batch (shape {tuple(logits.shape)})")
    if k < 2:
        raise ValueError(f"{where}: {name} needs at least 2 classes, got shape {tuple(logits.shape)}")
    # The sum is finite for finite inputs unless it overflows; only then is the exact (slower) check needed.
    # (Summed detached, read as a Python float: no autograd node, no extra isfinite kernel, half the cost.)
    if (finite and _VALUE_CHECKS.get() and not math.isfinite(float(logits.detach().sum()))
            and not bool(torch.isfinite(logits).all())):
        raise ValueError(f"{where}: {name} contains NaN or infinite values; the loss is not defined there")
    return logits.float() if logits.dtype in HALF_DTYPES else logits


def check_target(target: object, logits: Tensor, where: str, *, multilabel: bool = False) -> Tensor:
    """Validate class indices ``[m]`` (or, where ``multilabel``, a 0/1 matrix ``[m, k]``) for ``[m, k]`` logits.

    Returns the indices as int64, or the 0/1 matrix as a boolean tensor on the logits' device.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{where}: target must be a torch.Tensor, got {type(target).__name__}")
    m, k = logits.shape
    if target.dim() == 2:
        if not multilabel:
            raise ValueError(
                f"{where}: target must be 1-D class indices [batch]; got shape {tuple(target.shape)} "
                "(this loss takes no multi-label targets)"
            )
        if tuple(target.shape) != (m, k):
            raise ValueError(
                f"{where}: multi-label target must have the logits' shape {(m, k)}, got {tuple(target.shape)}"
            )
        if target.dtype != torch.bool:
            if target.is_complex():
                raise TypeError(f"{where}: target must be real, got dtype {target.dtype}")
            if _VALUE_CHECKS.get() and not bool(((target == 0) | (target == 1)).all()):
                raise ValueError(f"{where}: multi-label target must contain only 0 and 1")
            target = target != 0
        return target.to(logits.device)
    if target.dim() != 1:
        expected = "[batch] class indices or a [batch, classes] 0/1 matrix" if multilabel else "[batch]"
        raise ValueError(f"{where}: target must be {expected}, got shape {tuple(target.shape)}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{where}: target must be an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape[0] != m:
        raise ValueError(f"{where}: target has {target.shape[0]} entries but logits have {m} rows")
    if _VALUE_CHECKS.get():
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= k:
            raise ValueError(f"{where}: target values must be in [0, {k}) for {k} classes, got range [{lo}, {hi}]")
    return target.to(device=logits.device, dtype=torch.long)


def check_batch_size(logits: Tensor, where: str) -> None:
    """Batch losses compare examples with each other: they need at least two."""
    if logits.shape[0] < 2:
        raise ValueError(f"{where}: a batch loss needs at least 2 examples, got {logits.shape[0]}")


def check_reduction(reduction: object, where: str, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    if reduction not in allowed:
        raise ValueError(f"{where}: reduction must be one of {allowed}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


# ------------------------------------------------------------------------- numpy: score matrices of metrics


def to_numpy(value: object, name: str) -> np.ndarray:
    """A numpy view of a numpy array, a torch tensor (any device; detached, moved to the CPU, half precision
    upcast to float32 exactly) or a sequence."""
    if isinstance(value, Tensor):
        t = value.detach()
        if t.dtype in HALF_DTYPES:
            t = t.float()  # exact; numpy has no bfloat16 and sorts float32 faster than float16
        return t.cpu().resolve_conj().resolve_neg().numpy()
    if isinstance(value, np.ndarray):
        return value
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}") from err
    if array.dtype == object:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    return array


def check_scores(scores: object, name: str = "scores") -> np.ndarray:
    """Validate a non-empty ``[n, k]`` floating-point score matrix without NaN; return it as a numpy array.

    float16 / bfloat16 are upcast to float32 (exactly: the order and the ties are unchanged); float32 and
    float64 are kept, a torch tensor is moved to the CPU. The result may share memory with the input and is
    never written to. ``+-inf`` are allowed (they rank above / below everything).
    """
    x = to_numpy(scores, name)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [examples, classes], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); need at least one example and one class")
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    if np.isnan(x.min()):  # min propagates NaN: one reduction, no boolean temporary
        raise ValueError(f"{name} contains NaN; a NaN score has no place in a ranking")
    return x


def check_labels(target: object, shape: tuple[int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Validate the labels of scores of ``shape`` = (n, k).

    Returns ``(y, None)`` for class indices ``y`` (int64, shape [n], values in [0, k)) or ``(None, Y)`` for a
    multi-label 0/1 matrix ``Y`` (bool, shape [n, k]; positives of class c are the rows with ``Y[:, c] = 1``).
    """
    n, k = shape
    t = to_numpy(target, "target")
    if t.ndim == 2:
        if t.shape != (n, k):
            raise ValueError(f"multi-label target must have the scores' shape {(n, k)}, got {tuple(t.shape)}")
        if t.dtype == np.bool_:
            return None, t
        if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
            raise TypeError(f"multi-label target must be a 0/1 (bool, integer or float) matrix, got dtype {t.dtype}")
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("multi-label target must contain only 0 and 1")
        return None, t != 0
    if t.ndim != 1:
        raise ValueError(f"target must be [n] class indices or an [n, k] 0/1 matrix, got shape {tuple(t.shape)}")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"target must be integer class indices, got dtype {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"target has {t.shape[0]} entries but scores have {n} rows")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"target values must be in [0, {k}) for {k} classes, got range [{lo}, {hi}]")
    return t.astype(np.int64, copy=False), None
