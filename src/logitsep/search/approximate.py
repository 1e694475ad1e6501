"""Approximate class search: a FAISS inverted-file (IVF) inner-product index over an embedding index's vectors,
for sub-linear search. Needs the ``[search]`` extra (FAISS); its recall against the exact search is measured by
``logitsep bench search``."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from torch import Tensor

from ..core.extras import require
from .exact import candidates, cut_of, finish, float32_margins
from .select import SearchResult, as_queries, limit, search_args

TOP_K_EXTRA = 16  # a top-k search asks FAISS for k + this many, so near-ties of the k-th score are re-ranked exactly


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

    def __init__(self, index: Any, kind: str = "ivf", *, nlist: int | None = None,
                 nprobe: int | None = None, train_size: int | None = None, seed: int = 0) -> None:
        faiss = require("faiss")

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
        ``scanned`` counts the items in those lists. FAISS's float32 scores propose candidates within their proven
        error bound of the cut; the candidates are scored canonically (:mod:`.exact`), so every item found has
        the score the exact search gives it and a tie at the threshold falls the same way: the answer is the exact
        answer restricted to the probed lists (for top-k, among FAISS's ``k + 16`` best there)."""
        q, single = as_queries(queries, self.dim)
        thresholds, k = search_args(threshold, top_k, q.shape[0])
        x = q.numpy()
        dq, iq = self._probe.search(x, self.nprobe)  # the probed lists, chosen once for both searches
        scanned = np.where(iq >= 0, self._list_sizes[np.maximum(iq, 0)], 0).sum(axis=1)
        # FAISS's float32 scores only propose candidates: they are scored again canonically (search.exact), so an
        # item IVF finds has the score the exact search gives it, and a tie at the threshold falls the same way
        data = self.index.vectors
        margins = float32_margins(x, self.index.row_norm_bound())
        results: list[SearchResult] = []
        if k is not None:
            extra = min(k + TOP_K_EXTRA, self.count)  # near-ties of the k-th score, re-ranked canonically
            scores, ids = self.faiss_index.search_preassigned(x, extra, iq, dq)
            for j in range(len(x)):
                keep = ids[j] >= 0
                s, i = scores[j][keep], ids[j][keep]
                i = i[candidates(s, cut_of(s, limit(thresholds, j), k, margins[j]))]
                results.append(finish(data, q[j], np.sort(i), limit(thresholds, j), k, int(scanned[j])))
        else:
            # FAISS keeps inner products strictly above the radius: the float32 just below the lowest cut
            radius = float(np.nextafter(np.float32(float(thresholds.min()) - max(margins)), np.float32(-np.inf)))
            lims, scores, ids = self.faiss_index.range_search_preassigned(x, radius, iq, dq)
            for j in range(len(x)):
                s, i = scores[lims[j]:lims[j + 1]], ids[lims[j]:lims[j + 1]]
                i = i[candidates(s, cut_of(s, limit(thresholds, j), None, margins[j]))]
                results.append(finish(data, q[j], np.sort(i), limit(thresholds, j), None, int(scanned[j])))
        return results[0] if single else results
