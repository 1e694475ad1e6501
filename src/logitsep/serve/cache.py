"""The service's per-class score cache: logit columns of the classes searched lately, extended as items arrive."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from ..search.exact import canonical_scores


class ScoreCache:
    """Logit columns ``z_c(item)`` of the classes searched lately, over the committed items of the index.

    An exact search for class ``c`` scores every stored item: ``n·(d+1)`` multiply-adds, reading the whole index
    (~200 MB for 10⁵ MNIST items). The items only grow and a class vector never changes, so the column of
    scores is kept and extended by the rows appended since (``O(new·d)``); a search then reads ``4n`` bytes.
    Memory is bounded by ``budget`` bytes (4 bytes per item and class): least recently used columns go first,
    and an index too large for one column is always scanned.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._columns: OrderedDict[int, list] = OrderedDict()  # class -> [lock, values, count]
        self._lock = threading.Lock()

    def column(self, class_id: int, vector: np.ndarray, data: torch.Tensor) -> tuple[np.ndarray, bool] | None:
        """The scores of the rows of ``data`` (the committed vectors ``[n, dim]``) for the class vector, and whether
        the column was cached before; None when one column would not fit the budget."""
        n = len(data)
        if 4 * max(n, 1) > self.budget:
            return None
        with self._lock:
            entry = self._columns.get(class_id)
            cached = entry is not None
            if entry is None:
                entry = self._columns[class_id] = [threading.Lock(), np.empty(0, np.float32), 0]
            self._columns.move_to_end(class_id)
        with entry[0]:
            _, values, count = entry
            if count < n:
                if len(values) < n:  # grow by doubling, so appends cost O(1) amortised
                    grown = np.empty(max(n, 2 * len(values)), np.float32)
                    grown[:count] = values[:count]
                    entry[1] = values = grown
                # the scores every exact search path returns (search.exact), so a cached answer equals a scanned one
                values[count:n] = canonical_scores(data[count:n], vector)
                entry[2] = n
            column = values[:n]  # rows < n are never written again: safe to read while others extend it
        with self._lock:
            while sum(4 * len(e[1]) for e in self._columns.values()) > self.budget and len(self._columns) > 1:
                self._columns.popitem(last=False)
        return column, cached
