"""Single Logit Classification (SLC) metrics, the pooled PoLS metrics and the paper's table helpers.

Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of Logit Separation",
ICDM 2018 (arXiv:1705.10246), Section VI. In SLC the question "is example x of class c?" is answered from
the single score ``s_c(x)`` by a threshold, so each class is a binary ranking problem over all n examples.

Definitions (``scores`` S of shape [n, k], positives of class c = the examples of class c):

* Per class c, with the threshold T running over the **distinct** values of column c,
  ``TP_c(T) = #{positives i: S[i, c] >= T}``, ``G_c(T) = #{i: S[i, c] >= T}``, ``P_c = TP_c(-inf)``,
  recall ``R_c(T) = TP_c(T) / P_c`` and precision ``Prec_c(T) = TP_c(T) / G_c(T)``.

  - ``auprc`` (average precision): ``AP_c = sum_t (R_t - R_{t-1}) * Prec_t`` over the distinct thresholds in
    decreasing order (scikit-learn's ``average_precision_score``; tied scores enter together). Recall only
    moves at thresholds equal to a positive's score, so ``AP_c = (1/P_c) * sum_{positives p} TP_c(s_p) /
    G_c(s_p)`` with ``s_p = S[p, c]`` -- the form computed here.
  - ``precision@r``: ``Prec_c(T*)`` at the **highest** threshold ``T*`` with ``R_c(T*) >= r``. ``T*`` is the
    m-th largest positive score with ``m = min{j : j / P_c >= r}`` (the comparison made in float64).

  The reported value is the mean over the classes with at least one positive; classes without positives
  get NaN in the per-class arrays and are left out of the means.

* Pooled (one threshold for every class, the direct test of the Principle of Logit Separation): all n*k
  (example, class) pairs form one ranking, a pair is positive when the example belongs to the class.

  - ``pooled_auprc``: the average precision of that ranking (same formula as above).
  - ``pooled_auroc``: ``P(true logit > false logit) + 1/2 * P(tie)`` for a random true and a random false
    pair = ``sum_{positives p} (#neg < s_p + 1/2 * #neg == s_p) / (P * N)`` (scikit-learn's
    ``roc_auc_score`` on the flattened pairs). ``1 - pooled_auroc`` is the PoLS violation rate.

* ``accuracy``: top-1 (argmax over classes, first index on ties) accuracy for single-label targets; None for
  multi-label targets.

Undefined values are NaN: a mean over no class with positives, a pooled metric without positives, a pooled
AUROC without negatives.

Computation: validation (``check_scores``, ``check_labels`` of :mod:`logitsep.core.checks`) is kept apart from the
array code, which has no Python loop over thresholds or classes (the only loops: ``ceil(log2(n + 1))`` binary-search
steps, each over all positives at once, and the tiles of a cache-friendly transpose). It costs one sort of
every class column (a contiguous transposed copy sorted along its rows), one sort of all n*k scores for the
pooled ranking (``np.searchsorted`` of the positives in it gives the pooled counts), and work over the P
positives (P = n for single-label targets). Two per-class paths give identical results:

- sparse (P*log2(n) <= 1.5*n*k, e.g. every single-label target with k >= 10 classes): the positives are
  sorted by (class, score) and ``G_c(s_p)`` comes from a binary search of ``s_p`` in its sorted column;
- dense (many positives, e.g. multi-label targets with a few % of ones): an argsort of the columns, the
  labels gathered into the sorted order and cumulative sums along the columns.

Counts are integers, sums of ratios float64. ``python -m logitsep.bench.metrics`` times it against one
``np.sort`` of the same scores (results/bench/metrics_speed.*: about 2x for n = 10^4, k = 10^3).

Also here: :func:`all_logits_scores` (the paper's "all logits" softmax baseline), :func:`one_minus` and
:func:`mean_relative_improvement` (the paper's table layout: 1 - metric and the relative-improvement row).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .core.checks import check_fraction, check_labels, check_scores, to_numpy
from .core.keys import DEFAULT_RECALLS, METRIC_KEYS, is_metric_key, recall_key
from .core.ranking import group_starts, recall_position

__all__ = [
    "METRIC_KEYS",
    "all_logits_scores",
    "check_labels",
    "check_scores",
    "mean_relative_improvement",
    "one_minus",
    "per_class_metrics",
    "slc_metrics",
]



# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------

def _check_recalls(recall_levels: Iterable[float]) -> tuple[float, ...]:
    return tuple(check_fraction(r, "recall levels") for r in recall_levels)


# ----------------------------------------------------------------------------------------------------------
# computation (inputs already validated)
# ----------------------------------------------------------------------------------------------------------

def _count_below_in_rows(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``#{j: sorted_rows[rows[i], j] < values[i]}`` for every i: a binary search per query, vectorised over
    the queries (``np.searchsorted(sorted_rows[r], v, "left")`` without a loop over rows)."""
    n = sorted_rows.shape[1]
    flat = sorted_rows.reshape(-1)
    base = rows * n
    lo = np.zeros(len(values), dtype=np.int64)
    hi = np.full(len(values), n, dtype=np.int64)
    for _ in range(n.bit_length()):  # ceil(log2(n + 1)) halvings close every interval [lo, hi)
        mid = (lo + hi) >> 1
        # where lo == hi the search is over (mid may be n): read a valid cell and keep the interval
        go_right = (flat[base + np.minimum(mid, n - 1)] < values) & (lo < hi)
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(go_right, hi, mid)
    return lo


def contiguous_transpose(x: np.ndarray, tile: tuple[int, int] = (256, 64)) -> np.ndarray:
    """A C-contiguous copy of ``x.T`` (never a view, even for Fortran-ordered ``x``), copied tile by tile.

    ``np.ascontiguousarray(x.T)`` walks one side of the copy with a stride of a whole row and costs about as
    much as sorting the matrix (measured: 55-130 ms for 10^7 float32 on the 2-core benchmark machine);
    tiles of 256 x 64 that stay in the cache bring it to 15-30 ms. The loop is over tiles (about
    n*k / 16384 of them), not over classes or thresholds.
    """
    n, k = x.shape
    if x.size <= tile[0] * tile[1] or x.flags.f_contiguous:
        return np.array(x.T, order="C", copy=True)  # always a copy: the caller sorts it in place
    out = np.empty((k, n), dtype=x.dtype)
    rows, cols = tile
    for i in range(0, n, rows):
        for j in range(0, k, cols):
            out[j:j + cols, i:i + rows] = x[i:i + rows, j:j + cols].T
    return out


def _use_dense(num_pos: int, n: int, k: int) -> bool:
    """The sparse path costs ~ P*log2(n) gathers on top of the column sort, the dense one an argsort of the
    columns and a few passes over all n*k entries; measured break-even near P*log2(n) = 1.2-1.7 n*k."""
    return num_pos * n.bit_length() > 1.5 * n * k


def _class_stats_sparse(x: np.ndarray, pos_row: np.ndarray,
                        pos_col: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(class, TP, G)`` of every positive, sorted by class then score: sort the columns and the positives,
    find each positive's place in its column by binary search. Cost: the column sort + O(P log n)."""
    n = x.shape[0]
    values = x[pos_row, pos_col]
    order = np.lexsort((values, pos_col))  # by class, then by score ascending
    cls, val = pos_col[order], values[order]
    # TP_c(s_p) = #{positives of class c with score >= s_p}: the class's end minus the start of p's tie group
    class_end = np.cumsum(np.bincount(cls, minlength=x.shape[1]))
    tp = class_end[cls] - group_starts(cls, val)
    # G_c(s_p) = #{examples with score >= s_p in column c}, from the sorted columns
    columns = contiguous_transpose(x)  # [k, n], each class's scores contiguous
    columns.sort(axis=1)
    g = n - _count_below_in_rows(columns, cls, val)
    return cls, tp, g


def _class_stats_dense(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(class, TP, G)`` of every positive, sorted by class then score, from an argsort of the columns and
    cumulative sums over them: cost independent of the number of positives."""
    n, k = x.shape
    columns = contiguous_transpose(x)
    order = np.argsort(columns, axis=1)
    ranked = np.take_along_axis(columns, order, axis=1)  # each column ascending
    del columns
    hit = np.take_along_axis(contiguous_transpose(labels), order, axis=1)  # positives in the same order
    del order
    new_group = np.empty((k, n), dtype=bool)
    new_group[:, 0] = True
    np.not_equal(ranked[:, 1:], ranked[:, :-1], out=new_group[:, 1:])
    del ranked
    index = np.int32 if n < 2**31 else np.int64
    start = np.where(new_group, np.arange(n, dtype=index), 0)  # first position of each tie group
    np.maximum.accumulate(start, axis=1, out=start)  # (= the number of scores below it)
    up_to = np.cumsum(hit, axis=1, dtype=index)  # #positives at positions <= j
    cls, where = np.nonzero(hit)  # class-major, ascending score within a class
    first = start[cls, where].astype(np.int64)
    below = up_to[cls, first] - hit[cls, first]  # #positives of the class scored below the tie group
    return cls, up_to[cls, -1].astype(np.int64) - below, n - first


def _per_class(x: np.ndarray, y: np.ndarray | None, labels: np.ndarray | None, recalls: tuple[float, ...],
               dense: bool | None = None) -> dict[str, np.ndarray]:
    """Per-class AP and precision@r (NaN for classes without positives) and the positive counts."""
    n, k = x.shape
    counts = np.bincount(y, minlength=k) if y is not None else labels.sum(axis=0, dtype=np.int64)
    if dense is None:
        dense = _use_dense(int(counts.sum()), n, k)
    if dense:
        if labels is None:
            labels = np.zeros((n, k), dtype=bool)
            labels[np.arange(n), y] = True
        cls, tp, g = _class_stats_dense(x, labels)
    else:
        pos_row, pos_col = (np.arange(n), y) if y is not None else np.nonzero(labels)
        cls, tp, g = _class_stats_sparse(x, pos_row.astype(np.int64, copy=False), pos_col.astype(np.int64))
    precision = tp / g

    has = counts > 0
    class_end = np.cumsum(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(cls, weights=precision, minlength=k) / counts
    out: dict[str, np.ndarray] = {"auprc": np.where(has, ap, np.nan)}
    for r in recalls:
        at_r = np.full(k, np.nan)
        m = recall_position(r, counts[has])
        at_r[has] = precision[class_end[has] - m]  # the m-th largest positive score of each class
        out[recall_key(r)] = at_r
    out["num_positives"] = counts
    return out


def _pooled(x: np.ndarray, y: np.ndarray | None, labels: np.ndarray | None) -> dict[str, float]:
    """AP and AUROC of the single ranking of all n*k (example, class) pairs."""
    pos = np.sort(x[np.arange(x.shape[0]), y] if y is not None else x[labels])
    total, num_pos = x.size, len(pos)
    num_neg = total - num_pos
    if num_pos == 0:
        return {"pooled_auprc": math.nan, "pooled_auroc": math.nan}
    everything = np.sort(x, axis=None)
    all_below = np.searchsorted(everything, pos, side="left")  # #pairs with score < s_p
    all_upto = np.searchsorted(everything, pos, side="right")  # #pairs with score <= s_p
    pos_below = group_starts(pos)  # #positives with score < s_p
    pos_upto = num_pos - group_starts(pos[::-1])[::-1]  # #positives with score <= s_p
    auprc = float(np.mean((num_pos - pos_below) / (total - all_below)))
    if num_neg == 0:
        return {"pooled_auprc": auprc, "pooled_auroc": math.nan}
    neg_below = all_below - pos_below
    neg_tied = (all_upto - all_below) - (pos_upto - pos_below)
    twice_wins = 2 * int(neg_below.sum()) + int(neg_tied.sum())  # exact integers
    return {"pooled_auprc": auprc, "pooled_auroc": twice_wins / (2 * num_pos * num_neg)}


def _mean_over_present(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------

def per_class_metrics(scores: object, target: object, *,
                      recall_levels: Sequence[float] = DEFAULT_RECALLS) -> dict[str, np.ndarray]:
    """Per-class SLC metrics: ``{"auprc": [k], "precision@0.9": [k], "precision@0.99": [k],
    "num_positives": [k]}`` (float64 arrays, NaN for classes without positives; int64 counts).

    ``scores`` [n, k] and ``target`` ([n] class indices or an [n, k] 0/1 matrix) as in :func:`slc_metrics`,
    where the formulas are given.
    """
    x = check_scores(scores)
    y, labels = check_labels(target, x.shape)
    recalls = _check_recalls(recall_levels)
    return _per_class(x, y, labels, recalls)


def slc_metrics(scores: object, target: object, *, per_class: bool = False,
                recall_levels: Sequence[float] = DEFAULT_RECALLS) -> dict[str, Any]:
    """SLC metrics of a score matrix (Keren, Sabato & Schuller, ICDM 2018, Section VI).

    Args:
        scores: [n, k] scores (logits, or any score where higher means "more likely this class"): a numpy
            array or a torch tensor of any floating dtype, on any device (moved to the CPU).
        target: [n] integer class indices, or an [n, k] 0/1 (bool / int / float) matrix for multi-label data.
        per_class: also return ``"per_class"``: the arrays of :func:`per_class_metrics`.
        recall_levels: the r of the ``"precision@r"`` keys (default 0.9 and 0.99, the paper's).

    Returns:
        ``{"auprc", "precision@0.9", "precision@0.99"}``: means over the classes that have positives of the
        per-class average precision and precision at recall r; ``{"pooled_auprc", "pooled_auroc"}``: AP and
        AUROC of the one ranking of all n*k (example, class) pairs; ``"accuracy"``: top-1 accuracy (None for
        multi-label targets). Values are Python floats, NaN where undefined. The formulas are in the module
        docstring.

    Raises:
        TypeError: scores not floating-point, target not integer (1-D) or not numeric (2-D).
        ValueError: wrong rank or shape, empty input, NaN scores, target out of [0, k) or not 0/1.
    """
    x = check_scores(scores)
    y, labels = check_labels(target, x.shape)
    recalls = _check_recalls(recall_levels)

    classes = _per_class(x, y, labels, recalls)
    result: dict[str, Any] = {"auprc": _mean_over_present(classes["auprc"])}
    for r in recalls:
        result[recall_key(r)] = _mean_over_present(classes[recall_key(r)])
    result.update(_pooled(x, y, labels))
    result["accuracy"] = None if y is None else float(np.mean(np.argmax(x, axis=1) == y))
    if per_class:
        result["per_class"] = classes
    return result


def all_logits_scores(logits: object) -> np.ndarray | torch.Tensor:
    """The paper's "all logits" baseline (Table II): ``softmax(z_i)_c = exp(z_ic - max_j z_ij) /
    sum_j exp(z_ij - max_j z_ij)``, every logit of the example normalising the score of class c.

    Computed in float64 (the max is subtracted, so nothing overflows): in float32 the probabilities of a
    confident model round to exactly 1.0 once the logit gap passes ~17, which would create artificial ties
    in the rankings. Returns a float64 numpy array for numpy input and a float64 tensor on the input's device
    for torch input.
    """
    if isinstance(logits, torch.Tensor):
        if not logits.is_floating_point():
            raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
        _check_logits_shape(tuple(logits.shape))
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or infinite values; softmax is not defined there")
        return torch.softmax(logits.detach().double(), dim=1)
    z = to_numpy(logits, "logits")
    if not np.issubdtype(z.dtype, np.floating):
        raise TypeError(f"logits must be a floating-point array, got dtype {z.dtype}")
    _check_logits_shape(z.shape)
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values; softmax is not defined there")
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _check_logits_shape(shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ValueError(f"logits must be 2-D [examples, classes], got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"logits are empty (shape {shape})")


def mean_relative_improvement(non_aligned: Sequence[float], aligned: Sequence[float], *,
                              from_metric: bool = False) -> float:
    """The paper's "mean relative improvement" row (Table I): ``(mean(non_aligned) - mean(aligned)) /
    mean(non_aligned)``, the relative reduction of the mean error of PoLS-aligned losses.

    The inputs are **1 - metric** values (the numbers the paper's tables print; lower is better), one per
    loss. With ``from_metric=True`` they are metric values and are turned into 1 - metric first. Example,
    MNIST 1 - precision@0.9: ``mean_relative_improvement([.005, .018], [.001, .002, .000, .001, .001])`` =
    0.913. Returns NaN when ``mean(non_aligned) == 0`` (the non-aligned losses make no error: there is
    nothing to improve on and the ratio is undefined).
    """
    groups = []
    for name, values in (("non_aligned", non_aligned), ("aligned", aligned)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
        array = np.asarray(list(values), dtype=np.float64)
        if array.ndim != 1 or array.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values: {array.tolist()}")
        groups.append(1.0 - array if from_metric else array)
    base, better = float(groups[0].mean()), float(groups[1].mean())
    if base == 0:
        return math.nan
    return (base - better) / base


def one_minus(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``1 - value`` for every metric entry of ``metrics`` (auprc, precision@r, pooled_*, accuracy), as the
    paper's tables print them (lower is better); None stays None, other entries (e.g. "loss", "lr",
    "num_positives") are copied unchanged, and nested mappings such as ``"per_class"`` are converted too."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            out[key] = one_minus(value)
        elif is_metric_key(key) and value is not None:
            out[key] = 1 - (np.asarray(value) if isinstance(value, (list, tuple)) else value)
        else:
            out[key] = value
    return out
