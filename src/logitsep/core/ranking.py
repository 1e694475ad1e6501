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
  vectorised per-class metrics use to give tied scores one threshold.
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
