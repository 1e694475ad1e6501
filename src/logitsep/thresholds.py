"""Decision thresholds for single-logit classification: the calibration rule and the ``thresholds.json`` format.

"Is x of class c?" is answered by ``z_c(x) ≥ T``. :func:`calibrate_scores` picks ``T`` on held-out scores, one per
class and one **global** threshold for every class (meaningful only for a model whose logits follow the
Principle of Logit Separation, Keren, Sabato & Schuller, ICDM 2018); :class:`Thresholds` holds them with what
they target and what they reached, and is saved as ``RUN/thresholds.json``, tied to its checkpoint by SHA-256.

Calibration rule (scores ``s``, prediction "positive" when ``s ≥ T``, ``T`` running over the distinct scores so
tied examples enter together; counts from :func:`logitsep.core.ranking.ranked_counts`, precision and recall as in
:mod:`logitsep.metrics`):

* target precision ``p``: the **lowest** ``T`` whose precision is ``≥ p`` (the most recall at that precision;
  precision is not monotone in ``T``, so higher thresholds may fall below ``p``). When no threshold reaches
  ``p`` the threshold is the next float above the largest score: nothing seen in calibration is accepted.
* target recall ``r``: the **highest** ``T`` whose recall is ``≥ r``: the m-th largest positive score with
  ``m = min{j : j/P ≥ r}`` (:func:`logitsep.core.ranking.recall_position`, the rule of ``precision@r``).
* per class ``c``: the ``n`` scores ``s_c(x_i)``, positives the examples of class ``c``. A class without
  positives in the calibration data gets the global threshold.
* global: one ranking of all ``n·k`` (example, class) pairs, positives the pairs ``(i, y_i)``.

Large k: :func:`calibrate_blocked` reads the scores a block of classes at a time (``score_block(start, stop)``,
as :func:`logitsep.metrics.slc_metrics_blocked` does) and gives exactly what :func:`calibrate_scores` gives on the
whole matrix. The per-class thresholds are column by column the same code; the global one is found from counts
(:class:`logitsep.core.ranking.PooledCounts`): precision and recall only change their "tp" at positive scores, so
the counts of all pairs below and tied with each distinct positive score decide the threshold for a recall target
and, for a precision target, the tie group of positives it falls under; when the lowest threshold reaching the
precision lies below that positive score (at some negative's score), a third pass selects it exactly among the
``r`` largest scores under that positive score (``r ≤ P·(1 − p)/p + 1``: memory ``O(P/p)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .core.blocks import ScoreBlock, ScoreBlocks
from .core.checks import check_fraction, check_labels, check_positive_int, check_scores, to_numpy
from .core.files import check_versioned, invalid, read_json, write_json
from .core.ranking import PooledCounts, ranked_counts, recall_position

__all__ = ["Thresholds", "calibrate_blocked", "calibrate_scores", "check_target"]

_FORMAT = "logitsep-thresholds"
_VERSION = 1


@dataclass
class Thresholds:
    """Calibrated decision thresholds: ``predict = logit ≥ threshold``.

    ``global_threshold``: one threshold for every class; ``per_class[c]``: the threshold of class ``c``;
    ``target``: what they were calibrated for, ``{"metric": "precision" | "recall", "value": v, ...}`` (plus
    ``split`` and ``examples`` when known); ``global_stats`` / ``class_stats``: what each threshold reached on the
    calibration data (``threshold``, ``positives``, ``precision``, ``recall``, ``source``: ``"class"``,
    ``"pooled"``, ``"global"`` for a class without positives, ``"unreachable"`` when no threshold met a
    precision target); ``model``: ``{"sha256", "step"}`` of the checkpoint they belong to (None if unknown).
    """

    global_threshold: float
    per_class: list[float]
    target: dict[str, Any]
    global_stats: dict[str, Any] = field(default_factory=dict)
    class_stats: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        classes = [{"class": c, **(self.class_stats[c] if c < len(self.class_stats) else {}), "threshold": t}
                   for c, t in enumerate(self.per_class)]
        return {"format": _FORMAT, "version": _VERSION, "model": self.model, "target": self.target,
                "global": {**self.global_stats, "threshold": self.global_threshold}, "classes": classes}

    @classmethod
    def from_dict(cls, obj: object, where: str = "thresholds") -> Thresholds:
        """Parse :meth:`to_dict`'s layout; ``ValueError`` naming ``where`` and the problem when it is not."""
        def bad(problem: str) -> ValueError:
            return invalid(where, "thresholds file", problem)

        obj = check_versioned(obj, _FORMAT, _VERSION, where, "thresholds file")
        target, glob, classes, model = obj.get("target"), obj.get("global"), obj.get("classes"), obj.get("model")
        if not isinstance(target, dict) or target.get("metric") not in ("precision", "recall"):
            raise bad("target must be an object with metric 'precision' or 'recall'")
        if not isinstance(glob, dict) or not _is_finite(glob.get("threshold")):
            raise bad("global.threshold must be a finite number")
        if not isinstance(classes, list) or not classes:
            raise bad("classes must be a non-empty list")
        for c, entry in enumerate(classes):
            if not isinstance(entry, dict) or entry.get("class") != c or not _is_finite(entry.get("threshold")):
                raise bad(f"classes[{c}] must be an object with class {c} and a finite threshold")
        if model is not None and not (isinstance(model, dict) and isinstance(model.get("sha256"), str)):
            raise bad("model must be null or an object with a sha256 string")
        stats = [{k: v for k, v in e.items() if k not in ("class", "threshold")} for e in classes]
        return cls(float(glob["threshold"]), [float(e["threshold"]) for e in classes], dict(target),
                   {k: v for k, v in glob.items() if k != "threshold"}, stats, model)

    def with_classes(self, names: Sequence[str], keep: int | None = None) -> Thresholds:
        """A copy with the first ``keep`` classes (default: all) and then one class per name of ``names`` at the
        global threshold (enrolled classes, :mod:`logitsep.enrollment`)."""
        keep = len(self.per_class) if keep is None else keep
        stats = [dict(s) for s in self.class_stats[:keep]]
        stats += [{"source": "enrolled", "name": str(n)} for n in names]
        return Thresholds(self.global_threshold, [*self.per_class[:keep], *[self.global_threshold] * len(names)],
                          dict(self.target), dict(self.global_stats), stats, self.model)

    def save(self, path: str | Path) -> Path:
        """Write the thresholds as JSON, atomically (a temporary file renamed over ``path``)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no thresholds file {path}")
        obj = read_json(path, "thresholds file")
        return cls.from_dict(obj, where=str(path))


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_target(precision: object, recall: object) -> tuple[str, float]:
    """The calibration target: exactly one of precision / recall, a number in (0, 1]; neither means precision
    0.99. Returns ``(metric, value)``."""
    if precision is not None and recall is not None:
        raise ValueError("give a target precision or a target recall, not both")
    metric, value = ("recall", recall) if recall is not None else ("precision", 0.99 if precision is None
                                                                    else precision)
    return metric, check_fraction(value, f"target {metric}")


def _reached(threshold: np.generic, p_total: int, tp: np.integer, taken: np.integer) -> dict[str, Any]:
    """What a threshold reaches: ``tp`` of the ``p_total`` positives among the ``taken`` items at or above it."""
    return {"threshold": float(threshold), "positives": p_total, "precision": float(tp / taken),
            "recall": float(tp / p_total)}


def _unreachable(top: np.generic, p_total: int) -> dict[str, Any]:
    """No threshold reaches the target precision: the next float above the largest score ``top`` (in its dtype)."""
    above = np.nextafter(top, np.asarray(np.inf, dtype=top.dtype))
    return {"threshold": float(above), "positives": p_total, "precision": None, "recall": 0.0,
            "source": "unreachable"}


def _calibrate_one(scores: np.ndarray, positive: np.ndarray, metric: str, value: float) -> dict[str, Any]:
    """Threshold of one ranking (see the module docstring), with the precision and recall it reaches."""
    thresholds, tp, taken = ranked_counts(scores, positive)
    p_total = int(tp[-1])
    if metric == "precision":
        ok = np.flatnonzero(tp / taken >= value)
        if ok.size == 0:
            return _unreachable(thresholds[0], p_total)
        j = int(ok[-1])
    else:
        j = int(np.searchsorted(tp, recall_position(value, np.array([p_total]))[0]))  # first T with TP ≥ m
    return _reached(thresholds[j], p_total, tp[j], taken[j])


def _check_y(y: object, n: int | None, k: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """``y`` of :func:`calibrate_scores` for ``n`` examples (None: as many as ``y`` has) and ``k`` classes:
    ``(n, class indices or None, 0/1 matrix or None)``."""
    t = to_numpy(y, "y")
    if t.ndim not in (1, 2) or (n is not None and t.shape[0] != n):
        rows = "n" if n is None else str(n)
        raise ValueError(f"y must be [{rows}] class indices (one per row of scores) or an [{rows}, {k}] 0/1 "
                         f"matrix, got shape {tuple(t.shape)}")
    n = t.shape[0]
    return (n, *check_labels(t, (n, k)))


def _class_entry(column: np.ndarray, positive: np.ndarray, metric: str, value: float) -> dict[str, Any] | None:
    """The threshold of one class from its column of scores; None for a class without positives."""
    if not positive.any():
        return None
    entry = _calibrate_one(np.ascontiguousarray(column), positive, metric, value)
    entry.setdefault("source", "class")
    return entry


def _thresholds(pooled: dict[str, Any], entries: Sequence[dict[str, Any] | None], metric: str, value: float,
                n: int, class_names: Sequence[str] | None) -> Thresholds:
    """The :class:`Thresholds` of the global result ``pooled`` and the class entries (None: no positives, the
    class gets the global threshold)."""
    pooled.setdefault("source", "pooled")
    stats = []
    for c, entry in enumerate(entries):
        if entry is None:
            entry = {"threshold": pooled["threshold"], "positives": 0, "precision": None, "recall": None,
                     "source": "global"}
        if class_names is not None:
            entry = {"name": str(class_names[c]), **entry}
        stats.append(entry)
    return Thresholds(global_threshold=pooled.pop("threshold"), per_class=[e.pop("threshold") for e in stats],
                      target={"metric": metric, "value": value, "examples": n}, global_stats=pooled,
                      class_stats=stats)


def calibrate_scores(scores: Tensor | np.ndarray, y: Tensor | np.ndarray | Sequence[int],
                     precision: float | None = None, recall: float | None = None,
                     class_names: Sequence[str] | None = None) -> Thresholds:
    """Per-class and global thresholds for scores ``[n, k]`` of examples with classes ``y [n]``, or with
    multi-label 0/1 targets ``y [n, k]`` (module docstring).

    Exactly one target: ``precision`` or ``recall`` in (0, 1]; neither means ``precision=0.99``.
    """
    metric, value = check_target(precision, recall)
    s = check_scores(scores)
    n, k = s.shape
    _, t, onehot = _check_y(y, n, k)
    if onehot is None:
        onehot = np.zeros((n, k), dtype=bool)
        onehot[np.arange(n), t] = True
    pooled = _calibrate_one(s.ravel(), onehot.ravel(), metric, value)
    entries = [_class_entry(s[:, c], onehot[:, c], metric, value) for c in range(k)]
    return _thresholds(pooled, entries, metric, value, n, class_names)


def _most_taken(tp: int, value: float) -> int:
    """The largest count ``t`` with ``tp / t >= value`` (the float64 comparison of ``_calibrate_one``); tp ≥ 1."""
    t = max(1, int(tp / value))
    while t > 1 and tp / t < value:
        t -= 1
    while tp / (t + 1) >= value:
        t += 1
    return t


def calibrate_blocked(score_block: ScoreBlock, num_classes: int, y: Tensor | np.ndarray | Sequence[int],
                      precision: float | None = None, recall: float | None = None,
                      class_names: Sequence[str] | None = None, *, block_size: int | None = None,
                      progress: bool | None = None) -> Thresholds:
    """:func:`calibrate_scores` of scores read a block of classes at a time: the same thresholds, reached
    precisions and recalls, to the bit (module docstring).

    ``score_block(start, stop)`` returns the scores ``[n, stop - start]`` of the classes ``start .. stop - 1``
    (numpy or torch, e.g. ``head.logit_columns(h, range(start, stop))``); it is called two or three times per
    block and must return the same values each time. ``y``: ``[n]`` class indices or an ``[n, k]`` 0/1 matrix;
    ``block_size``: classes per block (default about 4M scores); ``progress``: a tqdm bar per pass (None: only on
    a terminal). Memory: ``O(n·block_size)`` scores, ``O(n + k)`` besides, and ``O(P/p)`` scores for a precision
    target ``p`` when the global threshold falls between two positive scores.
    """
    metric, value = check_target(precision, recall)
    k = check_positive_int(num_classes, "num_classes", "calibrate_blocked")
    n, t, labels = _check_y(y, None, k)
    blocks = ScoreBlocks(score_block, k, n, block_size=block_size, progress=progress, where="calibrate_blocked")

    def positive(start: int, stop: int) -> np.ndarray:
        return labels[:, start:stop] if labels is not None else t[:, None] == np.arange(start, stop)

    # pass 1: the thresholds of the classes, the positives' scores, the largest score and how often it occurs
    entries: list[dict[str, Any] | None] = []
    scores_of_positives, top, top_count = [], None, 0
    for start, stop, x in blocks.scan("calibration, pass 1"):
        onehot = positive(start, stop)
        entries += [_class_entry(x[:, c], onehot[:, c], metric, value) for c in range(stop - start)]
        scores_of_positives.append(x[onehot])
        block_top = x.max()
        if top is None or block_top > top:
            top, top_count = block_top, 0
        top_count += int(np.count_nonzero(x == top)) if block_top == top else 0
    top = np.asarray(top, dtype=blocks.dtype)[()]
    counts = PooledCounts(np.concatenate(scores_of_positives))

    # pass 2: the pairs below and tied with every distinct positive score
    for i, (start, stop, x) in enumerate(blocks.scan("calibration, pass 2")):
        blocks.same_again(start, stop, scores_of_positives[i], x[positive(start, stop)])
        counts.add(x)
    total, p_total = n * k, len(counts.positives)
    values, below, _ = counts.by_value()  # ascending
    tp = p_total - np.searchsorted(counts.positives, values, side="left")  # positives at or above each value
    taken = total - below  # pairs at or above each value

    if p_total == 0:  # as calibrate_scores: precision never reached; recall: the top score, tp = 0
        pooled = _unreachable(top, 0) if metric == "precision" else _reached(top, 0, np.int64(0), np.int64(top_count))
    elif metric == "recall":
        m = int(recall_position(value, np.array([p_total]))[0])
        j = int(np.searchsorted(values, counts.positives[p_total - m]))  # the m-th largest positive score
        pooled = _reached(values[j], p_total, tp[j], taken[j])
    else:
        ok = np.flatnonzero(tp / taken >= value)  # precision is highest at a positive score within its tp
        if ok.size == 0:
            pooled = _unreachable(top, p_total)
        else:
            j = int(ok[0])  # the lowest positive score reaching it (below it down to the next one, tp stays)
            pooled = _lowest_reaching(blocks, values, below, tp, taken, j, value, total)
    return _thresholds(pooled, entries, metric, value, n, class_names)


def _lowest_reaching(blocks: ScoreBlocks, values: np.ndarray, below: np.ndarray, tp: np.ndarray, taken: np.ndarray,
                     j: int, value: float, total: int) -> dict[str, Any]:
    """The lowest threshold at or below the positive score ``values[j]`` (and above the next lower positive
    score) whose precision ``tp[j] / taken`` is ``>= value``: it accepts at most ``c`` pairs, so it lies above the
    ``r``-th largest score below ``values[j]`` (``r = c + 1 - taken[j]``), selected in a third pass."""
    p_total = int(tp[0])  # tp at the lowest positive score: every positive
    most = _most_taken(int(tp[j]), value)
    r = most + 1 - int(taken[j])
    if r == 1 or below[j] == 0:  # the next lower score would take too many, or there is none
        return _reached(values[j], p_total, tp[j], taken[j])
    v = values[j]
    kept = np.empty(0, dtype=blocks.dtype)  # the (at most r) largest scores below v seen so far
    for _, _, x in blocks.scan("calibration, pass 3"):
        kept = np.concatenate([kept, _largest(x[x < v], r)])
        kept = _largest(kept, r)
    kept = -np.sort(-kept)  # descending
    if len(kept) < r:  # every pair may be taken: the threshold is the lowest score
        return _reached(kept[-1], p_total, tp[j], np.int64(total))
    above = kept[kept > kept[r - 1]]
    if above.size == 0:
        return _reached(v, p_total, tp[j], taken[j])
    return _reached(above[-1], p_total, tp[j], taken[j] + above.size)


def _largest(x: np.ndarray, r: int) -> np.ndarray:
    """The ``r`` largest values of 1-D ``x`` (all of them when fewer), in no order."""
    return x if x.size <= r else np.partition(x, x.size - r)[x.size - r:]
