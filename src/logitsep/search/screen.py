"""The exact float16 screen: an exact search at half the bytes read.

A float16 copy of an index's rows, held in memory, is scanned first; only the candidates whose float16 score is
within a proven error bound (:func:`screen_margin`) of the cut are scored again, canonically (:mod:`.exact`). No item
of the exact answer can be left out, so the result is every exact path's (:class:`Screen`).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import Tensor

from .exact import canonical_error, finish
from .select import SearchResult

_U16 = 2.0 ** -11  # unit roundoff of float16 (round to nearest)
_U32 = 2.0 ** -24  # unit roundoff of float32
_E16 = 2.0 ** -25  # half the spacing of float16's subnormal numbers: the absolute rounding error below 2^-14
F16_ENTRY_LIMIT = 65000.0  # a row or query with a larger entry is not screened (float16 overflows at 65504)
F16_SCORE_LIMIT = 60000.0  # nor a query whose scores could leave float16's range
_SCREEN_MAX_FRACTION = 0.1  # more candidates than this fraction of the rows: the plain scan is about as fast
_SCREEN_BLOCK_ROWS = 16384  # rows converted to float16 per step (bounded temporaries)
_FP16_MV_CHECKED: list[bool] = []


def fp16_mv_accumulates_in_fp32() -> bool:
    """Whether torch's float16 matrix-vector product on this CPU accumulates in float32, so that its only error
    beyond the inputs' rounding is the final rounding to float16 (≤ 2^-11 relative). Checked once, on positive
    data of length 4096, where a float16 accumulator (sequential or pairwise) is off by several times that."""
    if not _FP16_MV_CHECKED:
        gen = torch.Generator().manual_seed(0)
        v = (torch.rand(8, 4096, generator=gen) + 1).half()
        q = (torch.rand(4096, generator=gen) + 1).half()
        exact = v.double() @ q.double()
        _FP16_MV_CHECKED.append(bool(((torch.mv(v, q).double() - exact).abs() <= 1.5 * _U16 * exact).all()))
    return _FP16_MV_CHECKED[0]


def screen_margin(dim: int, max_norm: float, query_norm: float) -> float:
    """A bound on ``|s16 − s32|`` for any stored row ``v`` (``‖v‖ ≤ max_norm``) and a query ``q``
    (``‖q‖ = query_norm``), where ``s32`` is the float32 score ``v·q`` and ``s16`` the float16 screen's score:
    ``v`` and ``q`` rounded to float16, multiplied and accumulated in float32, the sum rounded to float16.

    Rounding ``v_j`` and ``q_j`` errs by ``≤ u16·|x| + e`` each (``u16 = 2^-11``; ``e = 2^-25`` in the
    subnormal range); products of two float16 numbers are exact in float32; a float32 sum of ``d`` terms errs by
    ``≤ γ_d·Σ|v_j q_j|`` (``γ_d = d·u32/(1 − d·u32)``), in the screen and in the float32 score alike; the final
    rounding by ``≤ u16·|s| + e``. With ``Σ|v_j q_j| ≤ ‖v‖‖q‖`` and ``‖x‖₁ ≤ √d·‖x‖`` (Cauchy-Schwarz):
    ``(3u16 + 2γ_d + 5u16²)·‖v‖‖q‖ + e·(1 + 2u16)·√d·(‖v‖ + ‖q‖) + d·e² + e``; returned with 25% to spare.
    """
    gamma = dim * _U32 / (1 - dim * _U32)
    vq = max_norm * query_norm
    bound = ((3 * _U16 + 2 * gamma + 5 * _U16 ** 2) * vq
             + _E16 * (1 + 2 * _U16) * math.sqrt(dim) * (max_norm + query_norm) + dim * _E16 ** 2 + _E16)
    return 1.25 * bound


def float16_at_most(cut: float) -> Tensor:
    """The largest float16 number ``c`` with ``c ≤ cut`` (rounded down from the float32 just below ``cut``), as a
    0-d tensor: for float16 scores, ``s ≥ c`` keeps every score ``s ≥ cut``. Compared in float16 by torch (about
    0.1 ms per 10⁶ scores; numpy's float16 comparison, done in software, takes 2 ms); a Python float would be
    rounded to the nearest float16, possibly above ``cut``, and lose candidates."""
    below = np.float32(np.nextafter(np.float32(cut), np.float32(-np.inf)))
    with np.errstate(over="ignore"):  # beyond float16's range: ±inf or ±65504, still a bound from below
        c16 = np.float16(below)
        if np.float32(c16) > below:
            c16 = np.nextafter(c16, np.float16(-np.inf))
    return torch.tensor(c16, dtype=torch.float16)


class Screen:
    """A float16 copy of an index's rows, in memory, that answers an exact search at half the bytes read.

    An exact query reads the float16 rows once (torch's float16 matrix-vector product on CPU streams them faster
    than float32 per byte, and there are half as many bytes), keeps the candidates whose float16 score is within
    :func:`screen_margin` of the cut (the threshold, or the k-th best float16 score minus a second margin), and
    scores only those again, canonically, from the float32 rows (:func:`~.exact.finish`). No item of the exact
    answer can be left out by the screen: the result is every exact path's, bit for bit. Rows are converted when
    first searched
    (about 0.3 s per 10⁶ × 513 here) and extended as the index grows; memory: 2 bytes per stored number.
    Falls back to the plain float32 scan when it cannot help or cannot bound its error: an entry beyond float16's
    range, a threshold of −inf, too many candidates, or a float16 product that does not accumulate in float32.
    """

    def __init__(self, dim: int) -> None:
        self.rows = torch.empty(0, dim, dtype=torch.float16)
        self.count = 0
        self.usable = fp16_mv_accumulates_in_fp32()
        self.last_candidates = -1  # rows re-scored in float32 by the last search; -1: it fell back
        self._lock = threading.Lock()

    def extend(self, data: Tensor) -> None:
        """Convert the rows of ``data`` (the index's float32 rows; committed rows never change) not yet held.
        Thread-safe (a service may search from several threads); a search meanwhile sees the old count."""
        if not self.usable or data.shape[0] <= self.count:
            return
        with self._lock:
            self._extend(data)

    def _extend(self, data: Tensor) -> None:
        n, dim = data.shape
        if not self.usable or n <= self.count:
            return
        if n > self.rows.shape[0]:  # grow by at least a quarter: appends in small batches stay amortised
            grown = torch.empty(max(n, self.rows.shape[0] * 5 // 4), dim, dtype=torch.float16)
            grown[:self.count] = self.rows[:self.count]
            self.rows = grown
        for start in range(self.count, n, _SCREEN_BLOCK_ROWS):
            block = data[start:min(start + _SCREEN_BLOCK_ROWS, n)]
            if float(block.abs().max()) >= F16_ENTRY_LIMIT:
                self.usable, self.rows = False, torch.empty(0, dim, dtype=torch.float16)
                return
            self.rows[start:start + len(block)] = block
        self.count = n

    def search(self, data: Tensor, query: Tensor, threshold: float | None, top_k: int | None,
               max_norm: float) -> SearchResult | None:
        """The exact answer for one float32 ``query`` ``[dim]`` (see the class), or None where the plain scan
        must answer. ``max_norm``: a bound on the norms of ``data``'s rows (the index's
        :class:`~.exact.RowNorms`)."""
        n, dim = data.shape
        self.last_candidates = -1  # until the screen answers
        query_norm = float(torch.linalg.vector_norm(query.double()))
        if (not self.usable or self.count != n or n == 0 or float(query.abs().max()) >= F16_ENTRY_LIMIT
                or 1.01 * max_norm * query_norm >= F16_SCORE_LIMIT):
            return None
        # fast scores within screen_margin of the true inner product, canonical ones within canonical_error
        margin = screen_margin(dim, max_norm, query_norm) + canonical_error(dim, max_norm * query_norm)
        scores16 = torch.mv(self.rows[:n], query.half())
        cut = -math.inf if threshold is None else threshold - margin
        if top_k is not None:  # every exact top-k item scores ≥ (k-th best float16 score) − 2·margin in float16
            kth = float(torch.topk(scores16, min(top_k, n), sorted=False).values.min())
            cut = max(cut, kth - 2 * margin)
        if not math.isfinite(cut):
            return None
        candidates = np.flatnonzero((scores16 >= float16_at_most(cut)).numpy())
        if len(candidates) > _SCREEN_MAX_FRACTION * n:
            return None
        self.last_candidates = len(candidates)
        return finish(data, query, candidates, threshold, top_k, n)
