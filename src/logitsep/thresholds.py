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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from .core.checks import check_fraction, check_labels, check_scores, to_numpy
from .core.files import check_versioned, invalid, read_json, write_json
from .core.ranking import ranked_counts, recall_position

__all__ = ["Thresholds", "calibrate_scores", "check_target"]

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


def _calibrate_one(scores: np.ndarray, positive: np.ndarray, metric: str, value: float) -> dict[str, Any]:
    """Threshold of one ranking (see the module docstring), with the precision and recall it reaches."""
    thresholds, tp, taken = ranked_counts(scores, positive)
    p_total = int(tp[-1])
    prec, rec = tp / taken, tp / p_total
    if metric == "precision":
        ok = np.flatnonzero(prec >= value)
        if ok.size == 0:
            above = np.nextafter(thresholds[0], np.asarray(np.inf, dtype=thresholds.dtype))
            return {"threshold": float(above), "positives": p_total, "precision": None, "recall": 0.0,
                    "source": "unreachable"}
        j = int(ok[-1])
    else:
        j = int(np.searchsorted(tp, recall_position(value, np.array([p_total]))[0]))  # first T with TP ≥ m
    return {"threshold": float(thresholds[j]), "positives": p_total, "precision": float(prec[j]),
            "recall": float(rec[j])}


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
    t = to_numpy(y, "y")
    if t.ndim not in (1, 2) or t.shape[0] != n:
        raise ValueError(f"y must be [{n}] class indices (one per row of scores) or an [{n}, {k}] 0/1 matrix, got "
                         f"shape {tuple(t.shape)}")
    t, onehot = check_labels(t, (n, k))
    if onehot is None:
        onehot = np.zeros((n, k), dtype=bool)
        onehot[np.arange(n), t] = True
    pooled = _calibrate_one(s.ravel(), onehot.ravel(), metric, value)
    pooled.setdefault("source", "pooled")
    stats = []
    for c in range(k):
        if onehot[:, c].any():
            entry = _calibrate_one(np.ascontiguousarray(s[:, c]), onehot[:, c], metric, value)
            entry.setdefault("source", "class")
        else:
            entry = {"threshold": pooled["threshold"], "positives": 0, "precision": None, "recall": None,
                     "source": "global"}
        if class_names is not None:
            entry = {"name": str(class_names[c]), **entry}
        stats.append(entry)
    return Thresholds(global_threshold=pooled.pop("threshold"), per_class=[e.pop("threshold") for e in stats],
                      target={"metric": metric, "value": value, "examples": n}, global_stats=pooled,
                      class_stats=stats)
