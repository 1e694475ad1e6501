"""Class search over stored embeddings: "which items of a collection belong to class c?"

With a linear head the logit of class ``c`` is ``z_c(h) = W_c·h + b_c = [W_c, b_c]·[h, 1]``: folding the bias in
as an extra dimension makes the logit of every stored item an inner product with one class vector, so "all items
of class c" is an inner-product range query (``score ≥ threshold``) and "the best items of class c" a top-k
query. This is Single Logit Classification (Keren, Sabato & Schuller, "Fast Single-Class Classification and the
Principle of Logit Separation", ICDM 2018) applied to a whole collection: one threshold per class works only if
logits are comparable across examples, which is what PoLS-aligned losses train for.

* :func:`item_vectors` / :func:`class_vectors`: the ``[h, 1]`` and ``[W_c, b_c]`` vectors (a cosine head:
  ``[ĥ, 1]`` and ``[scale·ŵ_c, 0]``) whose inner products are the head's logits.
* :class:`EmbeddingIndex`: ``N × D`` float32 vectors in a folder, memory-mapped; exact search by one chunked
  scan for a whole batch of queries (a batch of classes costs about one scan, not one scan per class), or, for up
  to four queries, by a float16 screen held in memory whose error is bounded, re-scoring in float32 only the
  candidates near the cut (same results, half the bytes read; :class:`_Screen`).
* :class:`ApproximateIndex`: a FAISS inverted-file (IVF) inner-product index over the same vectors, for
  sub-linear search; its recall against the exact search is measured by ``logitsep bench search``.
* :class:`ClassSearch`: search by class index or name with a model's head, refusing an index built by another.
* :func:`build_index`: ``logitsep index RUN``: embed a dataset split with a trained run and store the vectors.

On disk an index is a folder with ``header.json`` (format, version, ``dim``, ``dtype``, ``count``, ``meta``) and
``vectors.f32`` (``count`` rows of ``dim`` little-endian float32). The header's ``count`` is the truth: an append
writes its rows after the committed ones and fsyncs them, then commits by atomically replacing the header
(temporary file, rename, directory fsync). Rows past ``count`` are the remains of an interrupted append: readers
ignore them and the next writable open truncates them, so a crash leaves only whole, committed items.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import secrets
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._io import atomic_write

__all__ = ["ApproximateIndex", "ClassSearch", "EmbeddingIndex", "SearchResult", "build_index", "class_vectors",
           "head_fingerprint", "item_vectors"]

FORMAT = "logitsep-embedding-index"
VERSION = 1
HEADER = "header.json"
DATA = "vectors.f32"
_DTYPE = np.dtype("<f4")
# Rows per step of the exact scan: as many as keep the [q, rows] float32 scores of one step under this bound. The
# rows themselves are a view of the memory map (no copy), so a step costs only its scores: one query scans up to
# 4M rows per matrix-vector product, and the per-step work (threshold, top-k) stays a small part of the scan.
_SCORE_BYTES = 16 << 20
_WRITE_BYTES = 64 << 20  # bytes per write() call when appending


# ----------------------------------------------------------------------------------------- head ↔ vectors


def _head_parts(head: nn.Module) -> tuple[Tensor, Tensor | None, float | None]:
    """``(W [k, d], b [k] or None, scale)``; ``scale`` is None for a linear head, a number for a cosine head."""
    from .heads import CosineHead

    if isinstance(head, CosineHead):
        return head.weight, None, float(head.scale)
    if isinstance(head, nn.Linear):
        return head.weight, head.bias, None
    raise TypeError(f"class search needs a linear head (nn.Linear / LinearHead) or a CosineHead, "
                    f"got {type(head).__name__}")


@torch.no_grad()
def item_vectors(head: nn.Module, h: Tensor) -> Tensor:
    """The stored vector of each embedding, ``[n, d+1]`` float32 on ``h``'s device: ``[h, 1]`` for a linear head,
    ``[ĥ, 1]`` (``ĥ = h/max(‖h‖, 1e-12)``) for a cosine head, so that
    ``item_vectors(head, h) @ class_vectors(head).T`` equals the head's logits up to rounding."""
    weight, _, scale = _head_parts(head)
    d = weight.shape[1]
    if not isinstance(h, Tensor):
        raise TypeError(f"item_vectors: h must be a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"item_vectors: h must be a floating-point tensor, got dtype {h.dtype}")
    if h.dim() != 2 or h.shape[1] != d:
        raise ValueError(f"item_vectors: h must be [n, {d}] (the head's embedding dimension), got {tuple(h.shape)}")
    h = h.detach().float()
    if scale is not None:
        h = F.normalize(h, dim=1, eps=1e-12)
    return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)


def _class_index(classes: object, k: int) -> Tensor:
    """A 1-D int64 tensor of class indices in ``[0, k)`` from an int, a sequence of ints or an integer tensor."""
    if isinstance(classes, (numbers.Integral, np.integer)) and not isinstance(classes, bool):
        classes = [int(classes)]
    if isinstance(classes, np.ndarray):
        classes = torch.from_numpy(classes)
    if not isinstance(classes, Tensor):
        try:
            values = list(classes)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(f"classes must be an int, a sequence of ints or an integer tensor, "
                            f"got {type(classes).__name__}") from None
        if any(isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) for v in values):
            raise TypeError(f"class indices must be integers, got {values!r}")
        classes = torch.tensor([int(v) for v in values], dtype=torch.long)
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise TypeError(f"class indices must be integers, got dtype {classes.dtype}")
    classes = classes.reshape(-1) if classes.dim() == 0 else classes
    if classes.dim() != 1:
        raise ValueError(f"classes must be a 1-D list of class indices, got shape {tuple(classes.shape)}")
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= k):
        bad = [int(c) for c in classes if not 0 <= int(c) < k]
        raise ValueError(f"unknown class {bad[0]}: class indices must be in [0, {k})")
    return classes.long().cpu()


@torch.no_grad()
def class_vectors(head: nn.Module, classes: object = None) -> Tensor:
    """The query vector of each class, ``[q, d+1]`` float32 on CPU: ``[W_c, b_c]`` for a linear head (``b_c = 0``
    without a bias), ``[scale·ŵ_c, 0]`` for a cosine head (``ŵ_c = W_c/max(‖W_c‖, 1e-12)``): the inner product
    with ``item_vectors(head, h)`` is the logit ``z_c(h)``. ``classes``: an int, a sequence of ints, a 1-D integer
    tensor, or None for every class."""
    weight, bias, scale = _head_parts(head)
    k = weight.shape[0]
    idx = torch.arange(k) if classes is None else _class_index(classes, k)
    rows = weight.detach()[idx.to(weight.device)].float().cpu()
    if scale is not None:
        return torch.cat([scale * F.normalize(rows, dim=1, eps=1e-12), rows.new_zeros(len(idx), 1)], dim=1)
    b = torch.zeros(len(idx)) if bias is None else bias.detach()[idx.to(bias.device)].float().cpu()
    return torch.cat([rows, b[:, None]], dim=1)


def head_fingerprint(head: nn.Module) -> str:
    """SHA-256 of the head's type, shape, scale and parameters (float32 bytes): an index stores the fingerprint
    of the head that built it, and :class:`ClassSearch` refuses to search it with any other head."""
    weight, bias, scale = _head_parts(head)
    digest = hashlib.sha256(json.dumps({"type": type(head).__name__, "shape": list(weight.shape),
                                        "bias": bias is not None, "scale": scale}).encode())
    for t in (weight, bias):
        if t is not None:
            digest.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- results


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


def _empty_result(scanned: int = 0) -> SearchResult:
    return SearchResult(np.zeros(0, np.int64), np.zeros(0, np.float32), scanned)


def _sorted_result(ids: np.ndarray, scores: np.ndarray, scanned: int, top_k: int | None = None) -> SearchResult:
    order = np.lexsort((ids, -scores))[:top_k]
    return SearchResult(np.ascontiguousarray(ids[order], np.int64), np.ascontiguousarray(scores[order], np.float32),
                        int(scanned))


# ------------------------------------------------------------------------------------------ argument checks


def _as_queries(queries: object, dim: int) -> tuple[Tensor, bool]:
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


def _as_thresholds(threshold: object, q: int) -> Tensor | None:
    """None, one number for every query, or one per query (a sequence/array/tensor of length q)."""
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


def _as_top_k(top_k: object) -> int | None:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (numbers.Integral, np.integer)) or int(top_k) < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    return int(top_k)


def _as_rows(vectors: object, dim: int) -> np.ndarray:
    """Vectors to store: ``[n, dim]`` (or one ``[dim]``) finite floats → C-contiguous little-endian float32."""
    if isinstance(vectors, Tensor):
        if not vectors.is_floating_point():
            raise TypeError(f"vectors must be floating-point, got dtype {vectors.dtype}")
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    if not isinstance(vectors, np.ndarray):
        raise TypeError(f"vectors must be a torch.Tensor or a numpy array, got {type(vectors).__name__}")
    if vectors.dtype.kind != "f":
        raise TypeError(f"vectors must be floating-point, got dtype {vectors.dtype}")
    rows = vectors[None] if vectors.ndim == 1 else vectors
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"vectors must be [n, {dim}] (the index stores {dim}-dimensional vectors), "
                         f"got shape {vectors.shape}")
    with np.errstate(over="ignore"):
        rows = np.ascontiguousarray(rows, dtype=_DTYPE)
    if not np.isfinite(rows).all():
        raise ValueError("vectors contain NaN or infinite values (or values too large for float32)")
    return rows


# ----------------------------------------------------------------------------------------------- exact scan


def _matrix_vector(block: Tensor, query: Tensor) -> Tensor:
    """The float32 scores ``block @ query`` of one query, through numpy's BLAS on CPU.

    numpy's wheels bring OpenBLAS, whose multi-threaded ``sgemv`` streams a memory-mapped ``10⁶ × 513`` matrix at
    77–118% of the speed of a two-thread ``tensor.sum`` on this project's 2-core AMD VM (runs of 2026-12-02), while
    ``torch.mv`` (MKL here) runs on one core at about 15 GB/s whatever torch's threads: a third of the bandwidth.
    Its threads follow OpenBLAS's own settings (``OPENBLAS_NUM_THREADS``; all cores by default). Scores are float32
    dot products, as with ``torch.mv``; the order of the sum differs, so a score may differ from torch's in its
    last bits.
    """
    if block.device.type != "cpu":
        return torch.mv(block, query)
    return torch.from_numpy(np.dot(block.numpy(), query.contiguous().numpy()))


def _scan(data: Tensor, queries: Tensor, thresholds: Tensor | None, top_k: int | None,
          chunk_rows: int | None = None) -> list[SearchResult]:
    """Exact search of every query in one pass over ``data`` ``[n, dim]``, chunk by chunk.

    Each chunk's scores ``[q, rows]`` come from one matrix product (a matrix-vector product for one query)
    over a view of the memory map; a threshold keeps the items with ``score ≥ threshold``; ``top_k`` keeps a
    running top-k per query, merged exactly with ties broken by the lower id (stable sorts), so the result equals
    a brute-force sort by ``(score descending, id ascending)``. Memory is bounded by one chunk's scores (16 MiB)
    plus the results, whatever ``n``.
    """
    n, dim = data.shape
    q = queries.shape[0]
    if n == 0:
        return [_empty_result() for _ in range(q)]
    if chunk_rows is None:
        chunk_rows = max(1024, _SCORE_BYTES // (4 * q))
    hits: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (query, id, score) per chunk
    best_s = torch.empty(q, 0)
    best_i = torch.empty(q, 0, dtype=torch.long)
    qt = queries.T
    limits = None if thresholds is None else thresholds.numpy()
    for start in range(0, n, chunk_rows):
        block = data[start:start + chunk_rows]
        s = _matrix_vector(block, queries[0])[None] if q == 1 else torch.mm(block, qt).T.contiguous()  # [q, rows]
        if top_k is None:
            # numpy's flatnonzero: ~1 ns per score against ~7 for torch.nonzero, a few % of the scan
            scores = s.numpy()
            flat = np.flatnonzero(scores >= limits[:, None])
            qi, ri = np.divmod(flat, scores.shape[1])
            hits.append((qi, ri + start, scores[qi, ri]))
            continue
        kk = min(top_k, s.shape[1])
        vals, idx = torch.topk(s, kk, dim=1, sorted=False)
        kth = vals.min(dim=1).values
        for j in ((s >= kth[:, None]).sum(dim=1) > kk).nonzero().flatten().tolist():
            # more items tie with the k-th score than fit: keep the lowest ids (a stable sort keeps id order)
            idx[j] = torch.sort(s[j], descending=True, stable=True).indices[:kk]
            vals[j] = s[j, idx[j]]
        idx, perm = idx.sort(dim=1)  # candidates in id order, so the stable merge below breaks ties by id
        vals = vals.gather(1, perm)
        merged_s = torch.cat([best_s, vals], dim=1)
        merged_i = torch.cat([best_i, idx + start], dim=1)
        order = torch.sort(merged_s, dim=1, descending=True, stable=True).indices[:, :top_k]
        best_s, best_i = merged_s.gather(1, order), merged_i.gather(1, order)
    if top_k is not None:
        results = []
        for j in range(q):
            keep = slice(None) if thresholds is None else best_s[j] >= thresholds[j]
            results.append(SearchResult(best_i[j][keep].numpy().astype(np.int64),
                                        best_s[j][keep].numpy().astype(np.float32), n))
        return results
    qs, ids, scores = (np.concatenate(parts) for parts in zip(*hits, strict=True))
    order = np.lexsort((ids, -scores, qs))
    qs, ids, scores = qs[order], ids[order].astype(np.int64), scores[order].astype(np.float32)
    bounds = np.searchsorted(qs, np.arange(q + 1))
    return [SearchResult(ids[a:b], scores[a:b], n) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ------------------------------------------------------------------------------------- float16 screen

_U16 = 2.0 ** -11  # unit roundoff of float16 (round to nearest)
_U32 = 2.0 ** -24  # unit roundoff of float32
_E16 = 2.0 ** -25  # half the spacing of float16's subnormal numbers: the absolute rounding error below 2^-14
_F16_ENTRY_LIMIT = 65000.0  # a row or query with a larger entry is not screened (float16 overflows at 65504)
_F16_SCORE_LIMIT = 60000.0  # nor a query whose scores could leave float16's range
_SCREEN_MAX_QUERIES = 4  # more queries in one call: one float32 matrix product beats one float16 pass per query
_SCREEN_MAX_FRACTION = 0.1  # more candidates than this fraction of the rows: the plain scan is about as fast
_SCREEN_BLOCK_ROWS = 16384  # rows converted to float16 per step (bounded temporaries)
_FP16_MV_CHECKED: list[bool] = []


def _fp16_mv_accumulates_in_fp32() -> bool:
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


def _float16_at_most(cut: float) -> Tensor:
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


class _Screen:
    """A float16 copy of an index's rows, in memory, that answers an exact search at half the bytes read.

    An exact query reads the float16 rows once (torch's float16 matrix-vector product on CPU streams them faster
    than float32 per byte, and there are half as many bytes), keeps the candidates whose float16 score is within
    :func:`screen_margin` of the cut (the threshold, or the k-th best float16 score minus a second margin), and
    re-scores only those from the float32 rows. No item of the exact answer can be left out by the screen: the
    result is that of a float32 scan (the same float32 dot products; summed in another order than one long
    matrix-vector product, a score may differ from the plain scan's in its last bit, and so may the order of two
    items within a rounding error of each other). Rows are converted when first searched
    (about 0.3 s per 10⁶ × 513 here) and extended as the index grows; memory: 2 bytes per stored number.
    Falls back to the plain float32 scan when it cannot help or cannot bound its error: an entry beyond float16's
    range, a threshold of −inf, too many candidates, or a float16 product that does not accumulate in float32.
    """

    def __init__(self, dim: int) -> None:
        self.rows = torch.empty(0, dim, dtype=torch.float16)
        self.count = 0
        self.max_norm = 0.0
        self.usable = _fp16_mv_accumulates_in_fp32()
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
            if float(block.abs().max()) >= _F16_ENTRY_LIMIT:
                self.usable, self.rows = False, torch.empty(0, dim, dtype=torch.float16)
                return
            # ‖v‖ computed in float32 errs by at most (d + 2)·u32 relative: inflate it by that much
            norm = float(torch.linalg.vector_norm(block, dim=1).max()) * (1 + (dim + 4) * _U32)
            self.max_norm = max(self.max_norm, norm)
            self.rows[start:start + len(block)] = block
        self.count = n

    def search(self, data: Tensor, query: Tensor, threshold: float | None,
               top_k: int | None) -> SearchResult | None:
        """The exact answer for one float32 ``query`` ``[dim]`` (see the class), or None where the plain scan
        must answer."""
        n, dim = data.shape
        self.last_candidates = -1  # until the screen answers
        query_norm = float(torch.linalg.vector_norm(query.double()))
        if (not self.usable or self.count != n or n == 0 or float(query.abs().max()) >= _F16_ENTRY_LIMIT
                or 1.01 * self.max_norm * query_norm >= _F16_SCORE_LIMIT):
            return None
        margin = screen_margin(dim, self.max_norm, query_norm)
        scores16 = torch.mv(self.rows[:n], query.half())
        cut = -math.inf if threshold is None else threshold - margin
        if top_k is not None:  # every exact top-k item scores ≥ (k-th best float16 score) − 2·margin in float16
            kth = float(torch.topk(scores16, min(top_k, n), sorted=False).values.min())
            cut = max(cut, kth - 2 * margin)
        if not math.isfinite(cut):
            return None
        candidates = np.flatnonzero((scores16 >= _float16_at_most(cut)).numpy())
        if len(candidates) > _SCREEN_MAX_FRACTION * n:
            return None
        self.last_candidates = len(candidates)
        exact = torch.mv(data.index_select(0, torch.from_numpy(candidates)), query).numpy()
        if threshold is not None:
            keep = exact >= np.float32(threshold)
            candidates, exact = candidates[keep], exact[keep]
        return _sorted_result(candidates.astype(np.int64), exact, n, top_k)


def _check_search_args(threshold: object, top_k: object, q: int) -> tuple[Tensor | None, int | None]:
    thresholds, k = _as_thresholds(threshold, q), _as_top_k(top_k)
    if thresholds is None and k is None:
        raise ValueError("give a threshold (items with score >= threshold), top_k (the k best items), or both")
    return thresholds, k


# --------------------------------------------------------------------------------------------- on-disk index


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_header(folder: Path, header: dict[str, Any]) -> None:
    """Atomically replace ``folder/header.json``: temporary file, fsync, rename, fsync of the folder."""
    text = json.dumps(header, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(folder / HEADER, write)
    _fsync_dir(folder)


def _read_header(folder: Path) -> dict[str, Any]:
    """The validated header of the index in ``folder``; FileNotFoundError / ValueError naming the file."""
    path = folder / HEADER
    if not folder.is_dir():
        raise FileNotFoundError(f"no embedding index at {folder}: not a folder")
    if not path.is_file():
        raise FileNotFoundError(f"no embedding index at {folder}: {HEADER} is missing")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"corrupt embedding index: {path} is empty")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt embedding index: {path} is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"corrupt embedding index: {path} is not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported index format version {header.get('version')!r} (this is {VERSION})")
    for key in ("dim", "count"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "dim" else 0):
            raise ValueError(f"corrupt embedding index: {path} has an invalid {key!r}: {value!r}")
    if header.get("dtype") != "float32":
        raise ValueError(f"{path}: unsupported dtype {header.get('dtype')!r} (only float32)")
    if not isinstance(header.get("meta", {}), dict):
        raise ValueError(f"corrupt embedding index: {path} has a 'meta' that is not an object")
    return header


class EmbeddingIndex:
    """``N × dim`` float32 vectors in a folder, memory-mapped, with durable appends and exact batched search.

    Make one with :meth:`create`, open one with :meth:`open`. Item ids are row numbers, ``0 .. len(index)-1``,
    in the order the rows were appended. One writer at a time (an exclusive ``flock`` on the data file); any
    number of readers, each of which sees a committed prefix and picks up new rows when it :meth:`refresh` es
    (:meth:`search` does so first).
    """

    def __init__(self, path: str | os.PathLike, writable: bool = False, screen: bool = True) -> None:
        """Use :meth:`open` (or :meth:`create`)."""
        self.path = Path(path)
        self.writable = bool(writable)
        self._fd: int | None = None
        self._screen: _Screen | None = None
        self._use_screen = bool(screen)
        self._header = _read_header(self.path)
        data_path = self.path / DATA
        if not data_path.is_file():
            raise FileNotFoundError(f"corrupt embedding index: {data_path} is missing")
        if self.writable:
            self._fd = os.open(data_path, os.O_RDWR)
            try:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                self._fd = None
                raise ValueError(f"{self.path} is already open for writing (one writer at a time)") from None
            except ImportError:  # no flock on this platform: single writer by convention
                pass
            self._header = _read_header(self.path)  # re-read under the lock
        try:
            self._check_data(self._header["count"])
        except BaseException:
            self.close()
            raise
        self._data = self._map(self._header["count"])

    # ---------------------------------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, meta: dict[str, Any] | None = None,
               screen: bool = True) -> EmbeddingIndex:
        """A new, empty index of ``dim``-dimensional vectors at ``path`` (which must not exist, or be an empty
        folder), opened writable. ``meta``: JSON-serialisable facts kept in the header (e.g. the run it came from).
        The folder appears complete or not at all (built beside it, then renamed). ``screen``: as in :meth:`open`."""
        if isinstance(dim, bool) or not isinstance(dim, (numbers.Integral, np.integer)) or int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        path = Path(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise ValueError(f"{path} already exists; an index is created in a new (or empty) folder")
        header = {"format": FORMAT, "version": VERSION, "dim": int(dim), "dtype": "float32", "count": 0,
                  "meta": json.loads(json.dumps(meta or {}))}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir(mode=0o777)  # the umask applies, as for any new folder
        try:
            with open(tmp / DATA, "wb") as f:
                os.fsync(f.fileno())
            _write_header(tmp, header)
            os.replace(tmp, path)  # replaces an empty folder, fails on a non-empty one
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, writable=True, screen=screen)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False, screen: bool = True) -> EmbeddingIndex:
        """Open the index at ``path``. Read-only by default; ``writable=True`` takes the writer's lock and cuts
        off the uncommitted rows of an interrupted append. A missing header → FileNotFoundError; an empty,
        corrupt or truncated index → ValueError naming the file (nothing on disk is changed).

        ``screen`` (default True): exact searches of up to four queries read a float16 copy of the rows held in
        memory (half the bytes; built at the first search, 2 bytes per stored number) and re-score the few
        candidates near the cut in float32 (:class:`_Screen`); the results are those of the float32 scan.
        ``screen=False`` scans the float32 memory map only (no extra memory)."""
        return cls(path, writable=writable, screen=screen)

    def close(self) -> None:
        """Drop the memory map and the writer's lock. Results already returned stay valid (they are copies)."""
        self._data = torch.empty(0, self.dim)
        self._screen = None
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"EmbeddingIndex({str(self.path)!r}, dim={self.dim}, count={len(self)}, writable={self.writable})"

    # ----------------------------------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (``d + 1`` for embeddings with the bias folded in)."""
        return int(self._header["dim"])

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` object of the header (a copy)."""
        return json.loads(json.dumps(self._header.get("meta", {})))

    @property
    def row_bytes(self) -> int:
        return 4 * self.dim

    def __len__(self) -> int:
        return int(self._header["count"])

    @property
    def vectors(self) -> Tensor:
        """The committed vectors, ``[len(self), dim]``, a float32 view of the memory map (do not modify it)."""
        return self._data

    # ------------------------------------------------------------------------------------------ internals

    def _check_data(self, count: int) -> None:
        """The data file must hold ``count`` rows; a longer one (an interrupted append) is cut back to ``count``
        when writable, left alone when read-only."""
        data_path = self.path / DATA
        size = os.stat(data_path).st_size
        need = count * self.row_bytes
        if size < need:
            raise ValueError(f"corrupt embedding index: {data_path} holds {size} bytes but {self.path / HEADER} "
                             f"records {count} vectors of {self.row_bytes} bytes ({need} bytes): truncated")
        if size > need and self._fd is not None:
            os.ftruncate(self._fd, need)
            os.fsync(self._fd)

    def _map(self, count: int) -> Tensor:
        if count == 0:
            return torch.empty(0, self.dim)
        array = np.memmap(self.path / DATA, dtype=_DTYPE, mode="r", shape=(count, self.dim))
        with warnings.catch_warnings():  # read-only memory map: torch warns that it cannot write to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)

    # -------------------------------------------------------------------------------------------- writing

    def append(self, vectors: Tensor | np.ndarray) -> int:
        """Store ``vectors`` (``[n, dim]`` or one ``[dim]``, finite floats, converted to float32) after the
        existing rows; return the new total. Durable: the rows are written and fsynced, then the header's count
        is committed atomically; if anything fails before the commit the index keeps its old rows."""
        if self._fd is None:
            raise ValueError(f"{self.path} is open read-only; open it with writable=True to append")
        rows = _as_rows(vectors, self.dim)
        if len(rows) == 0:
            return len(self)
        old, new = len(self), len(self) + len(rows)
        view = memoryview(rows).cast("B")
        offset = old * self.row_bytes
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:done + _WRITE_BYTES], offset + done)
            os.fsync(self._fd)
        except BaseException:
            self._cut(old)
            raise
        try:
            self._commit(new)
        except BaseException:
            try:  # the rename may have happened before the failure (e.g. in the folder's fsync)
                committed = _read_header(self.path)["count"] == new
            except (OSError, ValueError):
                committed = False
            if committed:
                self._header = {**self._header, "count": new}
                self._data = self._map(new)
            else:
                self._cut(old)
            raise
        self._data = self._map(new)
        return new

    def _cut(self, count: int) -> None:
        """Best effort: drop uncommitted rows after a failed append (readers ignore them anyway)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, count * self.row_bytes)

    def _commit(self, count: int) -> None:
        header = {**self._header, "count": int(count)}
        _write_header(self.path, header)
        self._header = header

    def refresh(self) -> int:
        """Re-read the header (another process may have appended) and map the new rows; return the number of
        items. The header is small (reading it takes microseconds) and is always read whole, never trusted from
        file timestamps, which are too coarse to see two appends in a row."""
        header = _read_header(self.path)
        if header["dim"] != self.dim:
            raise ValueError(f"{self.path / HEADER} changed its dimension from {self.dim} to {header['dim']}")
        if header["count"] != len(self):
            self._check_data(header["count"])
            self._data = self._map(header["count"])
        self._header = header
        return len(self)

    # ------------------------------------------------------------------------------------------- searching

    def search(self, queries: Tensor | np.ndarray, threshold: object = None, top_k: int | None = None, *,
               chunk_rows: int | None = None) -> SearchResult | list[SearchResult]:
        """Exact inner-product search: for each query ``x``, the items ``i`` with ``v_i·x ≥ threshold``, or the
        ``top_k`` items of largest ``v_i·x`` (with both: the top-k among those over the threshold), sorted by
        score descending, ties by id.

        ``queries``: one ``[dim]`` vector (returns one :class:`SearchResult`) or ``[q, dim]`` (returns a list of
        ``q``). ``threshold``: a number, or one per query. All queries are answered in a single pass over the
        vectors (chunks of ``chunk_rows`` rows; memory stays bounded), so a batch of classes costs about one
        scan. New rows appended by another process are picked up first (:meth:`refresh`).
        """
        q, single = _as_queries(queries, self.dim)
        thresholds, k = _check_search_args(threshold, top_k, q.shape[0])
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if self._fd is None:
            self.refresh()
        if chunk_rows is not None or not self._use_screen or not 1 <= q.shape[0] <= _SCREEN_MAX_QUERIES:
            results = _scan(self._data, q, thresholds, k, chunk_rows)
        else:
            if self._screen is None:
                self._screen = _Screen(self.dim)
            self._screen.extend(self._data)
            results = []
            for j in range(q.shape[0]):
                limit = None if thresholds is None else float(thresholds[j])
                found = self._screen.search(self._data, q[j], limit, k)
                results.append(found if found is not None else
                               _scan(self._data, q[j:j + 1], None if thresholds is None else thresholds[j:j + 1],
                                     k)[0])
        return results[0] if single else results

    def approximate(self, kind: str = "ivf", **params: Any) -> ApproximateIndex:
        """A FAISS index over the current vectors for sub-linear search (:class:`ApproximateIndex`)."""
        return ApproximateIndex(self, kind=kind, **params)


# ----------------------------------------------------------------------------------------- approximate (FAISS)


class ApproximateIndex:
    """An approximate inner-product index over an :class:`EmbeddingIndex`'s vectors: FAISS ``IndexIVFFlat`` with
    ``METRIC_INNER_PRODUCT``. k-means, trained on a sample of ``train_size`` vectors (default
    ``max(40·nlist, 10000)``), splits the items into ``nlist`` lists (default ``√N``); a query scans only the
    ``nprobe`` lists whose centroids (the means of their items) have the largest inner product with it, i.e. the
    lists whose items score highest on average: about ``nprobe/nlist`` of the data.

    :meth:`search` has the semantics of :meth:`EmbeddingIndex.search` (``score ≥ threshold``, top-k, ids and
    scores sorted by score then id) but may miss items in lists it does not probe: measure its recall against the
    exact search (``logitsep bench search`` does). With ``nprobe = nlist`` it is exact. Ids are the rows of the
    embedding index; rows appended to it later are added by :meth:`update`.

    (HNSW is not offered: FAISS's HNSW range search only reports in-range items among the few candidates it
    visits, and an inner-product HNSW graph misses most of a class's items; measured recall 0.44 on clustered data
    where IVF reaches 1.0.)
    """

    def __init__(self, index: EmbeddingIndex, kind: str = "ivf", *, nlist: int | None = None,
                 nprobe: int | None = None, train_size: int | None = None, seed: int = 0) -> None:
        import faiss

        if kind != "ivf":
            raise ValueError(f"unknown approximate index kind {kind!r}; valid kinds: ivf")
        index.refresh()
        n = len(index)
        if n == 0:
            raise ValueError(f"cannot build an approximate index over {index.path}: it holds no vectors")
        self.index, self.kind, self.dim, self.count = index, kind, index.dim, 0
        nlist = int(nlist) if nlist is not None else max(1, min(round(math.sqrt(n)), n // 39))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}] (the number of vectors), got {nlist}")
        # Lists come from plain (L2) k-means on the items, scores within a list are inner products, and a query
        # probes the lists whose centroid (the mean of their items) has the largest inner product with it: the
        # lists whose items score highest on average. (FAISS's default for inner product, spherical k-means,
        # normalises the centroids, which suits unit vectors; ours are not: [h, 1] with the bias folded in.)
        self._quantizer = faiss.IndexFlatL2(self.dim)
        self.faiss_index = faiss.IndexIVFFlat(self._quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self.faiss_index.cp.spherical = False
        size = min(n, int(train_size) if train_size is not None else max(40 * nlist, 10_000))
        if size < nlist:
            raise ValueError(f"train_size must be at least nlist ({nlist}), got {size}")
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        self.faiss_index.cp.seed = seed
        self.faiss_index.train(np.ascontiguousarray(index.vectors.numpy()[rows]))
        self._probe = faiss.IndexFlatIP(self.dim)  # ranks the lists by inner product with their centroids
        self._probe.add(self._quantizer.reconstruct_n(0, nlist))
        self.nprobe = nprobe if nprobe is not None else min(nlist, 16)
        self.update()

    @property
    def nlist(self) -> int:
        return int(self.faiss_index.nlist)

    @property
    def nprobe(self) -> int:
        """Lists scanned per query (more: slower, higher recall)."""
        return int(self.faiss_index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) \
                or not 1 <= int(value) <= self.nlist:
            raise ValueError(f"nprobe must be an integer in [1, {self.nlist}] (nlist), got {value!r}")
        self.faiss_index.nprobe = int(value)

    def params(self) -> dict[str, Any]:
        """The settings that decide speed and recall, for reports."""
        return {"kind": self.kind, "nlist": self.nlist, "nprobe": self.nprobe}

    def __len__(self) -> int:
        return self.count

    def update(self, batch_rows: int = 65536) -> int:
        """Add the rows appended to the embedding index since this index was built; return the number held."""
        total = self.index.refresh()
        data = self.index.vectors.numpy()
        for start in range(self.count, total, batch_rows):
            self.faiss_index.add(np.ascontiguousarray(data[start:min(start + batch_rows, total)]))
        self.count = total
        invlists = self.faiss_index.invlists
        self._list_sizes = np.array([invlists.list_size(i) for i in range(self.nlist)], np.int64)
        return self.count

    def search(self, queries: Tensor | np.ndarray, threshold: object = None,
               top_k: int | None = None) -> SearchResult | list[SearchResult]:
        """Approximate :meth:`EmbeddingIndex.search`: a threshold is a FAISS range search (inner product
        ``≥ threshold``), ``top_k`` a k-nearest search, both over the ``nprobe`` lists chosen once per query;
        ``scanned`` counts the items in those lists."""
        q, single = _as_queries(queries, self.dim)
        thresholds, k = _check_search_args(threshold, top_k, q.shape[0])
        x = q.numpy()
        dq, iq = self._probe.search(x, self.nprobe)  # the probed lists, chosen once for both searches
        scanned = np.where(iq >= 0, self._list_sizes[np.maximum(iq, 0)], 0).sum(axis=1)
        results: list[SearchResult] = []
        if k is not None:
            scores, ids = self.faiss_index.search_preassigned(x, min(k, self.count), iq, dq)
            for j in range(len(x)):
                keep = ids[j] >= 0
                if thresholds is not None:
                    keep &= scores[j] >= float(thresholds[j])
                results.append(_sorted_result(ids[j][keep], scores[j][keep], int(scanned[j]), k))
        else:
            # FAISS keeps inner products strictly above the radius: the float32 just below the threshold gives >=
            radius = float(np.nextafter(np.float32(thresholds.min()), np.float32(-np.inf)))
            lims, scores, ids = self.faiss_index.range_search_preassigned(x, radius, iq, dq)
            for j in range(len(x)):
                s, i = scores[lims[j]:lims[j + 1]], ids[lims[j]:lims[j + 1]]
                keep = s >= float(thresholds[j])
                results.append(_sorted_result(i[keep], s[keep], int(scanned[j])))
        return results[0] if single else results


# ------------------------------------------------------------------------------------------ search by class


class ClassSearch:
    """Search an :class:`EmbeddingIndex` by class with a model's head: the query of class ``c`` is
    ``class_vectors(head, c)``, so the scores are the logits ``z_c`` of the stored items.

    The index must hold vectors of the head's dimension ``d + 1``, and, when its header records the fingerprint
    of the head that built it (``logitsep index`` does), that fingerprint must be this head's: scores of one
    model's class vectors against another model's embeddings mean nothing.
    """

    def __init__(self, index: EmbeddingIndex, head: nn.Module, class_names: Sequence[str] | None = None) -> None:
        weight, _, _ = _head_parts(head)
        self.index, self.head = index, head
        self.num_classes, d = int(weight.shape[0]), int(weight.shape[1])
        if index.dim != d + 1:
            raise ValueError(f"{index.path} holds {index.dim}-dimensional vectors but this head's class vectors have "
                             f"{d + 1} (embedding dimension {d} + the bias): built with another model")
        expected = index.meta.get("head_sha256")
        if expected is not None and expected != head_fingerprint(head):
            raise ValueError(f"{index.path} was built with a different model head (fingerprint {expected[:12]}…, "
                             f"this head's is {head_fingerprint(head)[:12]}…); rebuild it with `logitsep index`")
        names = class_names if class_names is not None else index.meta.get("class_names")
        self.class_names = list(names) if names else [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a head of {self.num_classes} classes")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, index_dir: str | os.PathLike, device: str = "cpu") -> ClassSearch:
        """The head of the run in ``run_dir`` (``logitsep train``) over the index in ``index_dir``."""
        model, _, _ = _load_run(run_dir, device)
        return cls(EmbeddingIndex.open(index_dir), model.head)

    def class_index(self, c: object) -> int:
        """The index of class ``c`` (an int in ``[0, k)`` or one of ``class_names``); ValueError if unknown."""
        if isinstance(c, str):
            if c in self.class_names:
                return self.class_names.index(c)
            if c.lstrip("-").isdigit():
                c = int(c)
            else:
                raise ValueError(f"unknown class {c!r}; classes are 0..{self.num_classes - 1} or the names "
                                 f"{', '.join(self.class_names[:20])}{' ...' if self.num_classes > 20 else ''}")
        return int(_class_index(c, self.num_classes)[0])

    def search(self, classes: object, threshold: object = None,
               top_k: int | None = None) -> SearchResult | list[SearchResult]:
        """Items of class ``classes`` (one class: int or name → one result) or of each of several classes (a
        list → a list of results, answered in one scan): scores ``z_c`` of the stored items, ``≥ threshold``
        and/or the ``top_k`` best. ``threshold``: one number, or one per class."""
        if isinstance(classes, bool):
            raise TypeError("a class is an int or a class name, got a bool")
        if isinstance(classes, Tensor) and classes.dim() == 0:
            classes = classes.item()
        single = isinstance(classes, (str, numbers.Integral, np.integer))
        items = [classes] if single else list(classes)  # type: ignore[call-overload]
        idx = [self.class_index(c) for c in items]
        queries = class_vectors(self.head, idx)
        results = self.index.search(queries, threshold=threshold, top_k=top_k)
        return results[0] if single else results


# ---------------------------------------------------------------------------------- building from a trained run


def _load_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, Any, int]:
    from .train import load_run

    try:
        return load_run(run_dir, device=device)
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shape mismatches
        raise ValueError(f"the checkpoint in {run_dir} does not match its model: {err}") from err


@torch.no_grad()
def build_index(run_dir: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None, split: str = "test",
                batch_size: int = 1024, device: str = "cpu", progress: bool | None = None,
                overwrite: bool = False) -> EmbeddingIndex:
    """Embed ``split`` of ``dataset`` (default: the run's) with the run's model (eval mode, batches) and store
    ``item_vectors(model.head, h)`` as an :class:`EmbeddingIndex` at ``out``; item ``i`` is example ``i`` of the
    split. The header records the run, dataset, split, class names and the head's fingerprint. The folder is
    built beside ``out`` and renamed into place, so ``out`` is never half-written; an existing ``out`` is
    refused unless ``overwrite``. Returns the index, opened read-only."""
    from tqdm.auto import tqdm

    from .data import load_dataset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
    model, config, step = _load_run(run_dir, device)
    data = load_dataset(dataset or config.dataset)
    trained_on = data if data.name == config.dataset else load_dataset(config.dataset)
    if data.input_shape != trained_on.input_shape:
        raise ValueError(f"{data.name} inputs have shape {data.input_shape} but the run was trained on "
                         f"{config.dataset} inputs of shape {trained_on.input_shape}")
    x, _ = data.split(split)
    head = model.head
    names = list(getattr(data, "class_names", None) or [])
    weight = _head_parts(head)[0]
    meta = {"run": str(Path(run_dir).resolve()), "dataset": data.name, "split": split, "model": config.model,
            "loss": config.loss, "step": step, "head": type(head).__name__, "num_classes": int(weight.shape[0]),
            "embedding_dim": int(weight.shape[1]), "head_sha256": head_fingerprint(head),
            "class_names": names if len(names) == weight.shape[0] <= 1000 else None}  # the header stays small
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".build", dir=out.parent))
    try:
        index = EmbeddingIndex.create(tmp / "index", int(weight.shape[1]) + 1, meta=meta)
        model.eval()
        pending: list[Tensor] = []
        rows = 0
        bar = tqdm(range(0, len(x), batch_size), desc=f"embedding {data.name}/{split}", unit="batch", leave=False,
                   disable=(None if progress is None else not progress), dynamic_ncols=True)
        for start in bar:
            pending.append(item_vectors(head, model.embed(x[start:start + batch_size].to(device))).cpu())
            rows += len(pending[-1])
            if rows >= 65536:
                index.append(torch.cat(pending))
                pending, rows = [], 0
        if pending:
            index.append(torch.cat(pending))
        index.close()
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "index")
            os.replace(tmp / "index", out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "index", out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddingIndex.open(out)
