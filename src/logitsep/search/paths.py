"""Which exact search path answers on this machine: measured where it runs, never guessed from the CPU's vendor.

Paths for one query: ``screen`` (the float16 copy, :mod:`.screen`) and the float32 kernels of :mod:`.scan`
(``numpy``, ``torch``, ``faiss``). For several queries: one pass of a kernel's matrix product (``numpy``,
``torch``, ``faiss``), or the one-query path once per query (``loop``). Every path returns the same ids and
scores (:mod:`.exact`), so the choice is about speed only, and speed is what differs: on an AMD EPYC VM numpy's
OpenBLAS ``sgemv`` streamed at twice ``torch.mv``'s speed (MKL on one core) and the float16 screen at ×4.95
``torch.mv``; on an Intel Xeon VM the screen ran at 0.62× ``torch.mv``.

How: the first search of a kind on an index (one query, or a batch of about ``q`` queries, over about ``n``
rows) runs every candidate path on that very search, :data:`ROUNDS` rounds interleaved after a warm-up, and keeps
the one with the lowest median time. The choice is cached for the process, keyed by the kind, ``n`` and ``q``
rounded up to powers of two, the dimension and torch's thread count, so an index that grows is measured again
at each doubling (a few rounds of a search it would have run anyway). Below :data:`MIN_MEASURED_ROWS` rows no
path costs more than the call itself: ``numpy``, unmeasured. Override per index with
``EmbeddingIndex.open(..., exact_path=)`` or for the process with ``$LOGITSEP_EXACT_PATH``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SINGLE_PATHS = ("screen", "numpy", "torch", "faiss")
BATCH_PATHS = ("numpy", "torch", "faiss", "loop")
PATHS = ("auto", *SINGLE_PATHS)  # what exact_path / $LOGITSEP_EXACT_PATH accept
ENV = "LOGITSEP_EXACT_PATH"
ROUNDS = 3
MIN_MEASURED_ROWS = 4096


@dataclass(frozen=True)
class Choice:
    """The path chosen for searches of one kind and size, and the median seconds of every path measured."""

    kind: str  # "single" or "batch"
    path: str
    seconds: dict[str, float] = field(default_factory=dict)
    key: tuple = ()


_CHOSEN: dict[tuple, Choice] = {}
_LOCK = threading.RLock()  # a batch's measurement may measure the one-query path inside it


def check_path(path: str | None) -> str:
    """``path`` (None: ``$LOGITSEP_EXACT_PATH``, else ``auto``) checked against :data:`PATHS`."""
    value = (os.environ.get(ENV) or "auto") if path is None else path
    if value not in PATHS:
        source = f"${ENV}" if path is None else "exact_path"
        raise ValueError(f"{source} must be one of {', '.join(PATHS)}, got {value!r}")
    return value


def key_of(kind: str, rows: int, dim: int, queries: int, candidates: tuple[str, ...]) -> tuple:
    return (kind, max(rows - 1, 0).bit_length(), dim, max(queries - 1, 0).bit_length(), torch.get_num_threads(),
            candidates)


def choose(key: tuple, runners: dict[str, Callable[[], object]]) -> Choice:
    """The cached choice for ``key``, or the fastest of ``runners`` (name → a call of that path on the current
    search), measured now: a warm-up call each, then :data:`ROUNDS` interleaved rounds, median seconds. One
    measurement at a time (searches of other threads wait for it rather than disturb it)."""
    with _LOCK:
        if key in _CHOSEN:
            return _CHOSEN[key]
        times: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():
            run()
        for _ in range(ROUNDS):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        choice = Choice(key[0], min(seconds, key=seconds.__getitem__), seconds, key)
        _CHOSEN[key] = choice
        return choice


def chosen() -> list[Choice]:
    """Every choice made in this process (for reports: ``logitsep bench search``)."""
    with _LOCK:
        return list(_CHOSEN.values())


def forget() -> None:
    """Drop the cached choices (the next searches measure again)."""
    with _LOCK:
        _CHOSEN.clear()
