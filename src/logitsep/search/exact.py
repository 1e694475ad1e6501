"""The exact answer, whatever path computed the scores first: every exact search path (the float16 screen, a float32
scan by numpy's BLAS, torch or FAISS) only *proposes* candidates, the rows whose fast score is within a proven error
bound of the cut; the candidates are then scored once more by :func:`canonical_scores`, the same computation for
every path, and :func:`~.select.select` chooses among them. So every path returns the same ids and the same scores,
bit for bit, and the scores are the float32 rounding of a float64 sum of exact products (closer to the true inner
product than any float32 dot product).

Why: the fastest path differs from machine to machine (:mod:`.paths` measures them), and a float32 dot product's
last bits depend on its summation order, so two paths that scored in float32 could disagree on an item within a
rounding error of the threshold. Here they cannot.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import Tensor

from .select import SearchResult, select

_U32 = 2.0 ** -24  # unit roundoff of float32
_U64 = 2.0 ** -53  # unit roundoff of float64
_TINY32 = 2.0 ** -149  # float32's smallest subnormal: the absolute error of a product that underflows
_BLOCK_ROWS = 16384  # rows scored per step by canonical_scores and RowNorms (bounded float64 temporaries)


def canonical_scores(rows: Tensor | np.ndarray, query: Tensor | np.ndarray,
                     ids: np.ndarray | None = None) -> np.ndarray:
    """``rows @ query`` (float32 ``[m, d]`` and ``[d]``; only the rows ``ids`` when given) as float32: the products
    are exact in float64, summed by numpy's pairwise summation along each row (one thread, an order fixed by ``d``
    alone), rounded once. A row's score depends only on the row and the query, never on which other rows are scored
    with it or on the machine's BLAS. Memory: one block of float64 products (bounded), whatever ``m``."""
    rows = rows.numpy() if isinstance(rows, Tensor) else np.asarray(rows)
    q = (query.numpy() if isinstance(query, Tensor) else np.asarray(query)).astype(np.float64)
    count = len(rows) if ids is None else len(ids)
    out = np.empty(count, np.float32)
    buf = np.empty((min(count, _BLOCK_ROWS), len(q)), np.float64)
    for start in range(0, count, _BLOCK_ROWS):
        block = rows[start:start + _BLOCK_ROWS] if ids is None else rows[ids[start:start + _BLOCK_ROWS]]
        products = np.multiply(block, q, out=buf[:len(block)])  # float32 × float64: exact in float64
        out[start:start + len(block)] = np.add.reduce(products, axis=1)
    return out


def canonical_error(dim: int, vq: float) -> float:
    """A bound on ``|canonical − v·q|`` for ``‖v‖‖q‖ ≤ vq``: the float64 sum errs by ``≤ γ_d(u64)·Σ|v_j q_j|``,
    the rounding to float32 by ``≤ u32·|s| + 2^-149``; with ``Σ|v_j q_j| ≤ ‖v‖‖q‖``."""
    return (_U32 * (1 + 2 * dim * _U64) + 2 * dim * _U64) * vq + _TINY32


def float32_margin(dim: int, max_norm: float, query_norm: float) -> float:
    """A bound on ``|s32 − canonical|`` for any float32 dot product ``s32`` of a row (``‖v‖ ≤ max_norm``) and the
    query, summed in any order (BLAS, SIMD, FMA, threads): ``γ_d·Σ|v_j q_j| + d·2^-149`` (``γ_d = d·u32/(1 −
    d·u32)``; each product's rounding is part of ``γ_d``, an underflowing one errs by at most 2^-149), plus the
    canonical score's own error; with 25% to spare."""
    gamma = dim * _U32 / (1 - dim * _U32)
    vq = max_norm * query_norm
    return 1.25 * (gamma * vq + (dim + 1) * _TINY32 + canonical_error(dim, vq))


def float32_margins(queries: Tensor | np.ndarray, max_norm: float) -> list[float]:
    """:func:`float32_margin` of each query of ``queries`` ``[q, dim]`` (its norm computed in float64)."""
    qs = np.asarray(queries.numpy() if isinstance(queries, Tensor) else queries, np.float64)
    return [float32_margin(qs.shape[1], max_norm, float(np.linalg.norm(v))) for v in qs]


def float32_at_most(cut: float) -> np.float32:
    """The largest float32 ``c ≤ cut``: float32 scores ``s ≥ c`` include every score ``s ≥ cut`` (a cut rounded to
    the nearest float32 could land above ``cut`` and lose a candidate)."""
    c = np.float32(cut)
    if math.isfinite(cut) and float(c) > cut:
        c = np.nextafter(c, np.float32(-np.inf))
    return c


def cut_of(scores: np.ndarray, threshold: float | None, top_k: int | None, margin: float) -> float:
    """The lowest fast score a row of the exact answer can have, given fast scores within ``margin`` of the
    canonical ones: ``threshold − margin``, and for top-k the k-th best fast score ``− 2·margin`` (the k-th best
    canonical score is at least the k-th best fast score − margin, and a row above it at most margin higher in
    fast score). ``-inf``: every row is a candidate."""
    cut = -math.inf if threshold is None else threshold - margin
    if top_k is not None and len(scores):
        k = min(top_k, len(scores))
        kth = float(np.partition(scores, len(scores) - k)[len(scores) - k])
        cut = max(cut, kth - 2 * margin)
    return cut


def candidates(scores: np.ndarray, cut: float) -> np.ndarray:
    """Positions of ``scores`` at or above ``cut`` (NaN scores, from an overflow, are kept)."""
    if not math.isfinite(cut):
        return np.arange(len(scores))
    return np.flatnonzero(~(scores < float32_at_most(cut)))


def finish(data: Tensor, query: Tensor, ids: np.ndarray, threshold: float | None, top_k: int | None,
           scanned: int) -> SearchResult:
    """The exact answer among the candidate rows ``ids`` of ``data``: canonical scores, then the one selection
    rule (threshold / top-k, ties by id)."""
    ids = np.asarray(ids, np.int64)
    every = len(ids) == len(data) and bool((ids == np.arange(len(ids))).all())  # every row, in order: no gather
    scores = canonical_scores(data, query, None if every else ids)
    return select(scores, threshold, top_k, ids=ids, scanned=scanned)


def max_row_norm(block: Tensor) -> float:
    """An upper bound on the largest Euclidean norm of the rows of ``block`` (float32 ``[m, d]``): computed in
    float32 it errs by at most ``(d + 2)·u32`` relative, so it is inflated by that much."""
    if len(block) == 0:
        return 0.0
    return float(torch.linalg.vector_norm(block, dim=1).max()) * (1 + (block.shape[1] + 4) * _U32)


class RowNorms:
    """The largest row norm of an index's committed rows (they never change), extended as rows are appended.
    Thread-safe; a pass over new rows costs about one scan of them."""

    def __init__(self) -> None:
        self.count = 0
        self.max_norm = 0.0
        self._lock = threading.Lock()

    def extend(self, data: Tensor) -> float:
        """The bound for the rows of ``data`` (``[n, d]``, a prefix of what was seen before plus new rows)."""
        if len(data) > self.count:
            with self._lock:
                for start in range(self.count, len(data), _BLOCK_ROWS):
                    block = data[start:start + _BLOCK_ROWS]
                    self.max_norm = max(self.max_norm, max_row_norm(block))
                    self.count = start + len(block)
        return self.max_norm
