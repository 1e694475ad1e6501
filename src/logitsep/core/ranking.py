"""The ranking core that every curve, metric and threshold of logitsep is built on (as torchmetrics'
``_binary_clf_curve`` is for its curve metrics).

A *ranking* is a score per item and whether the item is a positive. A threshold ``T`` accepts the items with
``score >= T``; ``T`` runs over the **distinct** scores, so tied items enter together. At each threshold:
``TP(T)`` = positives accepted, ``taken(T)`` = items accepted; ``recall = TP/P`` and ``precision = TP/taken``.

* :func:`ranked_counts`: ``(T, TP(T), taken(T))`` at every distinct score, highest first: what precision-recall
  curves (``experiments.report.pr_curve``) and calibrated thresholds (``logitsep.thresholds``) read;
* :func:`recall_position`: the rule "the **highest** threshold whose recall is at least r" as a position among
  the positives, shared by ``precision@r`` (``logitsep.metrics``) and the recall targets of calibration;
* :func:`group_starts`: where each run of equal keys starts in sorted arrays (tied scores, classes), which the
  vectorised per-class metrics use to give tied scores one threshold;
* :class:`PooledCounts`: for a ranking too large to hold (the pooled ranking of ``n·k`` scores read a block of
  classes at a time), the number of items below and tied with every positive's score, counted chunk by chunk:
  the pooled metrics and the global threshold follow from these counts exactly.
"""

from __future__ import annotations

import numpy as np


def ranked_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, tp, taken)`` of one ranking, one entry per distinct score, highest first.

    ``scores`` and ``positive`` are 1-D of one length (already validated). ``thresholds`` keep the scores' dtype;
    ``tp`` and ``taken`` are int64 counts. Cost: one stable argsort.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    last = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # the last position of each tied group
    tp = np.cumsum(positive[order], dtype=np.int64)[last]
    return ranked[last], tp, last + 1


def recall_position(recall: float, positives: np.ndarray) -> np.ndarray:
    """``m = min{j : j / P >= recall}`` for every count ``P >= 1`` (an array): the highest threshold reaching
    recall ``r`` is the m-th largest positive score. Decided with the float64 comparison ``j / P >= r`` itself
    (``ceil(r·P)`` alone can be off by one where ``r·P`` rounds)."""
    p = np.asarray(positives).astype(np.float64)
    m = np.ceil(recall * p)
    m = np.where((m - 1) / p >= recall, m - 1, m)  # correct a rounding-up of recall * P ...
    m = np.where(m / p < recall, m + 1, m)  # ... or a rounding-down
    return np.clip(m, 1, p).astype(np.int64)


def group_starts(*keys: np.ndarray) -> np.ndarray:
    """For arrays sorted by ``keys``: the index of the first element of each element's run of equal keys."""
    size = len(keys[0])
    new_group = np.zeros(size, dtype=bool)
    new_group[:1] = True
    for key in keys:
        new_group[1:] |= key[1:] != key[:-1]
    return np.maximum.accumulate(np.where(new_group, np.arange(size), 0))


# Items per counting step of PooledCounts.add: bounds its scratch memory (a few tens of bytes per item).
_COUNT_CHUNK = 1 << 20


class PooledCounts:
    """Counts of one ranking whose items arrive in chunks, relative to its positives given up front.

    ``PooledCounts(positive_scores)``, then :meth:`add` every item of the ranking once (positives included, any
    order, any number of chunks), then :meth:`counts`: for each positive score ``s_p`` (in ``positives``, sorted
    ascending) ``#items < s_p`` and ``#items <= s_p``, exact int64 -- what ``np.searchsorted`` of the positives in
    the sorted items would give, without ever holding all items. Each item is placed among the ``m`` distinct
    positive scores by one binary search (cheaper on chunks whose rows are sorted) and counted with ``bincount``;
    memory ``O(P + chunk)``. Items and positives are compared as numpy compares them (the common dtype).
    """

    def __init__(self, positive_scores: np.ndarray) -> None:
        self.positives = np.sort(np.asarray(positive_scores).reshape(-1))
        self.values = np.unique(self.positives)  # the m distinct positive scores, ascending
        m = len(self.values)
        self._between = np.zeros(m + 1, dtype=np.int64)  # [j]: items strictly between values[j-1] and values[j]
        self._equal = np.zeros(m, dtype=np.int64)  # [j]: items equal to values[j]
        self.total = 0

    def add(self, scores: np.ndarray) -> None:
        """Count the items ``scores`` (any shape; NaN-free, as every score validated by logitsep is)."""
        flat = np.asarray(scores).reshape(-1)
        self.total += flat.size
        m = len(self.values)
        if m == 0:
            return
        for i in range(0, flat.size, _COUNT_CHUNK):
            part = flat[i:i + _COUNT_CHUNK]
            where = np.searchsorted(self.values, part, side="left")  # #distinct positive scores < item
            tied = self.values[np.minimum(where, m - 1)] == part  # where == m: above every value, never tied
            self._equal += np.bincount(where[tied], minlength=m)
            self._between += np.bincount(where[~tied], minlength=m + 1)

    def by_value(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(values, below, equal)``: the distinct positive scores ascending, ``#items < value`` and
        ``#items == value``."""
        below = np.cumsum(self._between[:-1])
        below[1:] += np.cumsum(self._equal[:-1])
        return self.values, below, self._equal.copy()

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(below, upto)`` per positive of ``positives`` (ascending): ``#items < s_p`` and ``#items <= s_p``."""
        _, below, equal = self.by_value()
        j = np.searchsorted(self.values, self.positives)  # each positive's distinct value
        return below[j], below[j] + equal[j]
