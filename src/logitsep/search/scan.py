"""The exact scan over the float32 rows: a BLAS kernel scores the rows chunk by chunk, each query keeps the rows
within the proven float32 error bound of its cut, and the candidates are scored canonically (:mod:`.exact`).

Three kernels compute the same float32 dot products in different orders at different speeds on different machines
(:mod:`.paths` measures them): ``numpy`` (numpy's BLAS, OpenBLAS in its wheels: multi-threaded ``sgemv``), ``torch``
(``torch.mv`` / ``torch.mm``: MKL on x86 wheels), ``faiss`` (FAISS's SIMD ``fvec_inner_products_ny``, one query at a
time, when the ``[search]`` extra is installed). The answer does not depend on the kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .exact import RowNorms, candidates, cut_of, finish, float32_margins
from .select import SearchResult, empty_result, limit

# Rows per step of the exact scan: as many as keep the [q, rows] float32 scores of one step under this bound. The
# rows themselves are a view of the memory map (no copy), so a step costs only its scores: one query scans up to
# 4M rows per matrix-vector product, and the per-step work (threshold, top-k) stays a small part of the scan.
SCORE_BYTES = 16 << 20


def numpy_scores(block: Tensor, queries: Tensor) -> np.ndarray:
    """``[q, rows]`` float32 scores by numpy's BLAS (``sgemv`` for one query, ``sgemm`` for several)."""
    b, qs = block.numpy(), queries.numpy()
    return np.dot(b, qs[0])[None] if len(qs) == 1 else qs @ b.T


def torch_scores(block: Tensor, queries: Tensor) -> np.ndarray:
    """``[q, rows]`` float32 scores by torch (``torch.mv`` / ``torch.mm``)."""
    with torch.inference_mode():
        return (torch.mv(block, queries[0])[None] if len(queries) == 1 else torch.mm(queries, block.T)).numpy()


def faiss_scores(block: Tensor, queries: Tensor) -> np.ndarray:
    """``[q, rows]`` float32 scores by FAISS's ``fvec_inner_products_ny`` (reads the memory map in place)."""
    import faiss

    b, qs = np.ascontiguousarray(block.numpy()), np.ascontiguousarray(queries.numpy())
    out = np.empty((len(qs), len(b)), np.float32)
    for j in range(len(qs)):
        faiss.fvec_inner_products_ny(faiss.swig_ptr(out[j]), faiss.swig_ptr(qs[j]), faiss.swig_ptr(b), b.shape[1],
                                     len(b))
    return out


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


KERNELS: dict[str, Callable[[Tensor, Tensor], np.ndarray]] = {
    "numpy": numpy_scores, "torch": torch_scores, "faiss": faiss_scores}


def matrix_vector(block: Tensor, query: Tensor) -> Tensor:
    """The float32 scores ``block @ query`` of one query by numpy's BLAS (the ``numpy`` kernel), as a tensor."""
    return torch.from_numpy(numpy_scores(block, query[None])[0])


def scan(data: Tensor, queries: Tensor, thresholds: Tensor | None, top_k: int | None,
         chunk_rows: int | None = None, kernel: str = "numpy", max_norm: float | None = None) -> list[SearchResult]:
    """Exact search of every query in one pass over ``data`` ``[n, dim]``, chunk by chunk, scored by ``kernel``.

    Each chunk's float32 scores ``[q, rows]`` come from one BLAS call over a view of the memory map; each query
    keeps the chunk's rows within :func:`~.exact.float32_margin` of its cut (the threshold; for top-k, the chunk's
    k-th best score, a cut no higher than the whole index's), the union of a query's candidates is cut once more
    and scored canonically (:func:`~.exact.finish`): the result equals a brute-force sort of the canonical scores by
    ``(score descending, id ascending)``, whatever the kernel. ``max_norm``: a bound on the rows' norms (computed
    here when not given). Memory: one chunk's scores (16 MiB) plus the candidates, whatever ``n``.
    """
    n = data.shape[0]
    q = queries.shape[0]
    if n == 0:
        return [empty_result() for _ in range(q)]
    if chunk_rows is None:
        chunk_rows = max(1024, SCORE_BYTES // (4 * q))
    if max_norm is None:
        max_norm = RowNorms().extend(data)
    scores_of = KERNELS[kernel]
    margins = float32_margins(queries, max_norm)
    kept: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(q)]
    for start in range(0, n, chunk_rows):
        scores = scores_of(data[start:start + chunk_rows], queries)
        for j in range(q):
            pos = candidates(scores[j], cut_of(scores[j], limit(thresholds, j), top_k, margins[j]))
            kept[j].append((pos + start, scores[j][pos]))
    results = []
    for j in range(q):
        ids = np.concatenate([i for i, _ in kept[j]])
        if top_k is not None and len(kept[j]) > 1:  # the union's k-th best: the whole index's cut
            fast = np.concatenate([s for _, s in kept[j]])
            ids = ids[candidates(fast, cut_of(fast, limit(thresholds, j), top_k, margins[j]))]
        results.append(finish(data, queries[j], ids, limit(thresholds, j), top_k, n))
    return results
