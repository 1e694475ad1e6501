"""The exact float32 scan: every query against every stored row, in one pass over the rows, chunk by chunk."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .select import SearchResult, empty_result, limit, select

# Rows per step of the exact scan: as many as keep the [q, rows] float32 scores of one step under this bound. The
# rows themselves are a view of the memory map (no copy), so a step costs only its scores: one query scans up to
# 4M rows per matrix-vector product, and the per-step work (threshold, top-k) stays a small part of the scan.
SCORE_BYTES = 16 << 20


def matrix_vector(block: Tensor, query: Tensor) -> Tensor:
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


def scan(data: Tensor, queries: Tensor, thresholds: Tensor | None, top_k: int | None,
         chunk_rows: int | None = None) -> list[SearchResult]:
    """Exact search of every query in one pass over ``data`` ``[n, dim]``, chunk by chunk.

    Each chunk's scores ``[q, rows]`` come from one matrix product (a matrix-vector product for one query) over a
    view of the memory map; each query keeps the chunk's :func:`~.select.select` (items over its threshold and/or
    its top_k, ties by id), and the union of a query's chunk selections is selected once more: the result equals
    a brute-force sort by ``(score descending, id ascending)``. Memory is bounded by one chunk's scores (16 MiB)
    plus what is kept, whatever ``n``.
    """
    n = data.shape[0]
    q = queries.shape[0]
    if n == 0:
        return [empty_result() for _ in range(q)]
    if chunk_rows is None:
        chunk_rows = max(1024, SCORE_BYTES // (4 * q))
    kept: list[list[SearchResult]] = [[] for _ in range(q)]
    qt = queries.T
    for start in range(0, n, chunk_rows):
        block = data[start:start + chunk_rows]
        s = matrix_vector(block, queries[0])[None] if q == 1 else torch.mm(block, qt).T.contiguous()  # [q, rows]
        scores = s.numpy()
        for j in range(q):
            found = select(scores[j], limit(thresholds, j), top_k)
            kept[j].append(SearchResult(found.ids + start, found.scores, 0))
    return [select(np.concatenate([r.scores for r in parts]), None, top_k,
                   ids=np.concatenate([r.ids for r in parts]), scanned=n)
            for parts in kept]
