"""What a search returns and the one rule that selects it: items with ``score >= threshold`` and/or the
``top_k`` best, sorted by score descending, ties by id ascending. Every search path (the exact scan, the float16
screen, FAISS IVF, the service's cached score columns) ends in :func:`select`, so they all break ties and treat
a score equal to the threshold alike. Also the checks of a search's arguments (queries, thresholds, top_k)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.checks import check_top_k


@dataclass(frozen=True)
class SearchResult:
    """The items found for one query: ``ids`` (int64 row numbers in the index) and their ``scores`` (float32
    inner products), sorted by score descending, ties by id ascending; ``scanned``: items whose score was
    computed (the whole index for an exact search, the probed lists for an IVF search)."""

    ids: np.ndarray
    scores: np.ndarray
    scanned: int

    def __len__(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids.tolist(), "scores": self.scores.tolist(), "scanned": int(self.scanned)}


def empty_result(scanned: int = 0) -> SearchResult:
    return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float32), scanned)


def select(scores: np.ndarray, threshold: float | None, top_k: int | None, ids: np.ndarray | None = None,
           scanned: int | None = None) -> SearchResult:
    """The items of ``scores`` (float32; ``ids[i]`` is the id of ``scores[i]``, positions when None) with
    ``score >= threshold`` (compared in float32) and/or the ``top_k`` largest, sorted by score descending, ties by
    id ascending (of several items tied with the k-th score, the lowest ids). ``scanned`` defaults to
    ``len(scores)``. Cost: one pass (and a partition for top-k) over ``scores``, a sort of what is kept."""
    n = len(scores)
    if threshold is not None:
        pos = np.flatnonzero(scores >= np.float32(threshold))
    elif top_k is not None and n > top_k:
        pos = np.flatnonzero(scores >= np.partition(scores, n - top_k)[n - top_k])  # the top k and their ties
    else:
        pos = np.arange(n)
    kept = scores[pos]
    if top_k is not None and len(pos) > top_k:
        keep = kept >= np.partition(kept, len(kept) - top_k)[len(kept) - top_k]
        pos, kept = pos[keep], kept[keep]
    found = pos if ids is None else ids[pos]
    order = np.lexsort((found, -kept))[:top_k]
    return SearchResult(np.ascontiguousarray(found[order], np.int64), np.ascontiguousarray(kept[order], np.float32),
                        int(n if scanned is None else scanned))


def as_queries(queries: object, dim: int) -> tuple[Tensor, bool]:
    """``queries`` ([dim] or [q, dim], float) as a float32 CPU ``[q, dim]`` tensor, and whether it was 1-D."""
    if isinstance(queries, np.ndarray):
        if queries.dtype.kind != "f":
            raise TypeError(f"queries must be floating-point, got dtype {queries.dtype}")
        queries = torch.from_numpy(np.ascontiguousarray(queries))
    if not isinstance(queries, Tensor):
        raise TypeError(f"queries must be a torch.Tensor or a numpy array, got {type(queries).__name__}")
    if not queries.is_floating_point():
        raise TypeError(f"queries must be floating-point, got dtype {queries.dtype}")
    single = queries.dim() == 1
    q = queries.detach().to("cpu", torch.float32)
    q = q[None] if single else q
    if q.dim() != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [{dim}] or [q, {dim}] (the index's vector dimension is {dim}), "
                         f"got shape {tuple(queries.shape)}")
    if not torch.isfinite(q).all():
        raise ValueError("queries contain NaN or infinite values")
    return q.contiguous(), single


def as_thresholds(threshold: object, q: int) -> Tensor | None:
    """None, one number for every query, or one per query (a sequence/array/tensor of length q), as float32."""
    if threshold is None:
        return None
    if isinstance(threshold, bool):
        raise TypeError("threshold must be a number or one number per query, got a bool")
    if isinstance(threshold, numbers.Real):
        values = torch.full((q,), float(threshold), dtype=torch.float32)
    else:
        try:
            values = torch.as_tensor(np.asarray(threshold, dtype=np.float64), dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError):
            raise TypeError(f"threshold must be a number or one number per query, got {threshold!r}") from None
        if values.shape != (q,):
            raise ValueError(f"threshold must be one number or {q} numbers (one per query), got {values.numel()}")
    if torch.isnan(values).any():
        raise ValueError("threshold must not be NaN")
    return values


def search_args(threshold: object, top_k: object, q: int) -> tuple[Tensor | None, int | None]:
    """The thresholds (one per query, float32) and top_k of a search of ``q`` queries; at least one is needed."""
    thresholds, k = as_thresholds(threshold, q), check_top_k(top_k)
    if thresholds is None and k is None:
        raise ValueError("give a threshold (items with score >= threshold), top_k (the k best items), or both")
    return thresholds, k


def thresholds_of(thresholds: Tensor | None, j: int) -> Tensor | None:
    """The thresholds of query ``j`` alone (a length-1 tensor), or None: for a search of that query by itself."""
    return None if thresholds is None else thresholds[j:j + 1]


def limit(thresholds: Tensor | None, j: int) -> float | None:
    """The threshold of query ``j`` as a Python float (exactly the float32 value), or None."""
    return None if thresholds is None else float(thresholds[j])
