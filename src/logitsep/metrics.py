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

Large k: :func:`slc_metrics_blocked` takes ``score_block(start, stop)`` (the scores of a block of classes, e.g.
from embeddings and head rows) instead of the ``[n, k]`` matrix and returns exactly what :func:`slc_metrics`
returns on it, keeping ``O(n·block_size)`` scores at a time: the per-class metrics are column by column the
code above, the pooled ones the same formulas on counts accumulated block by block
(:class:`logitsep.core.ranking.PooledCounts`), the accuracy a running argmax. :func:`all_logits_blocks` gives
the "all logits" baseline in the same form.

Also here: :func:`all_logits_scores` (the paper's "all logits" softmax baseline), :func:`one_minus` and
:func:`mean_relative_improvement` (the paper's table layout: 1 - metric and the relative-improvement row).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .core.blocks import ScoreBlock, ScoreBlocks
from .core.checks import check_fraction, check_labels, check_scores, to_numpy
from .core.keys import DEFAULT_RECALLS, METRIC_KEYS, is_metric_key, recall_key
from .core.ranking import PooledCounts, group_starts, recall_position

__all__ = [
    "METRIC_KEYS",
    "all_logits_blocks",
    "all_logits_scores",
    "check_labels",
    "check_scores",
    "mean_relative_improvement",
    "one_minus",
    "per_class_metrics",
    "slc_metrics",
    "slc_metrics_blocked",
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


def sorted_columns(x: np.ndarray) -> np.ndarray:
    """Every class column of ``x`` [n, k] sorted ascending, as the rows of a C-contiguous ``[k, n]`` array."""
    columns = contiguous_transpose(x)  # [k, n], each class's scores contiguous
    columns.sort(axis=1)
    return columns


def _class_stats_sparse(x: np.ndarray, pos_row: np.ndarray, pos_col: np.ndarray,
                        columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(class, TP, G)`` of every positive, sorted by class then score: sort the columns (unless ``columns``,
    :func:`sorted_columns` of ``x``, are given) and the positives, find each positive's place in its column by
    binary search. Cost: the column sort + O(P log n)."""
    n = x.shape[0]
    values = x[pos_row, pos_col]
    order = np.lexsort((values, pos_col))  # by class, then by score ascending
    cls, val = pos_col[order], values[order]
    # TP_c(s_p) = #{positives of class c with score >= s_p}: the class's end minus the start of p's tie group
    class_end = np.cumsum(np.bincount(cls, minlength=x.shape[1]))
    tp = class_end[cls] - group_starts(cls, val)
    # G_c(s_p) = #{examples with score >= s_p in column c}, from the sorted columns
    if columns is None:
        columns = sorted_columns(x)
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
    if y is not None:
        return _per_class_of(x, np.arange(x.shape[0]), y, None, recalls, dense)
    return _per_class_of(x, None, None, labels, recalls, dense)


def _per_class_of(x: np.ndarray, pos_row: np.ndarray | None, pos_col: np.ndarray | None, labels: np.ndarray | None,
                  recalls: tuple[float, ...], dense: bool | None = None,
                  columns: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """:func:`_per_class` with the positives given as ``(pos_row, pos_col)`` pairs (``labels`` None; a pair at
    most once) or as the 0/1 matrix ``labels``; ``columns``: :func:`sorted_columns` of ``x`` if already made."""
    n, k = x.shape
    counts = np.bincount(pos_col, minlength=k) if labels is None else labels.sum(axis=0, dtype=np.int64)
    if dense is None:
        dense = _use_dense(int(counts.sum()), n, k)
    if dense:
        if labels is None:
            labels = np.zeros((n, k), dtype=bool)
            labels[pos_row, pos_col] = True
        cls, tp, g = _class_stats_dense(x, labels)
    else:
        if labels is not None:
            pos_row, pos_col = np.nonzero(labels)
        cls, tp, g = _class_stats_sparse(x, pos_row.astype(np.int64, copy=False), pos_col.astype(np.int64),
                                         columns)
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
    if num_pos == 0:
        return {"pooled_auprc": math.nan, "pooled_auroc": math.nan}
    everything = np.sort(x, axis=None)
    all_below = np.searchsorted(everything, pos, side="left")  # #pairs with score < s_p
    all_upto = np.searchsorted(everything, pos, side="right")  # #pairs with score <= s_p
    return _pooled_from_counts(pos, all_below, all_upto, total)


def _pooled_from_counts(pos: np.ndarray, all_below: np.ndarray, all_upto: np.ndarray, total: int) -> dict[str, float]:
    """The pooled AP and AUROC from the sorted positive scores ``pos`` (at least one), the number of pairs
    scored below each (``all_below``) and at or below each (``all_upto``), of ``total`` pairs in all."""
    num_pos = len(pos)
    num_neg = total - num_pos
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
    accuracy = None if y is None else float(np.mean(np.argmax(x, axis=1) == y))
    return _summary(classes, recalls, _pooled(x, y, labels), accuracy, per_class)


def _summary(classes: dict[str, np.ndarray], recalls: tuple[float, ...], pooled: dict[str, float],
             accuracy: float | None, per_class: bool) -> dict[str, Any]:
    """:func:`slc_metrics`'s result from the per-class arrays, the pooled values and the accuracy."""
    result: dict[str, Any] = {"auprc": _mean_over_present(classes["auprc"])}
    for r in recalls:
        result[recall_key(r)] = _mean_over_present(classes[recall_key(r)])
    result.update(pooled)
    result["accuracy"] = accuracy
    if per_class:
        result["per_class"] = classes
    return result


def slc_metrics_blocked(score_block: ScoreBlock, num_classes: int, target: object, *, block_size: int | None = None,
                        recall_levels: Sequence[float] = DEFAULT_RECALLS, per_class: bool = False,
                        progress: bool | None = None) -> dict[str, Any]:
    """:func:`slc_metrics` of a score matrix too large to hold, read a block of classes at a time: the same keys
    and the same values (bit for bit) as ``slc_metrics(S, target)`` with ``S`` the blocks side by side.

    Args:
        score_block: ``score_block(start, stop)`` returns the scores ``[n, stop - start]`` of the classes
            ``start .. stop - 1`` (numpy array or torch tensor of a floating dtype, e.g. ``head.logits(h,
            range(start, stop))``). Called twice per block (the second pass must see the same values: checked on
            the positives' scores).
        num_classes: k.
        target: ``[n]`` class indices, or an ``[n, k]`` 0/1 matrix (multi-label; it is read a block of columns
            at a time, but is itself ``n·k`` values).
        block_size: classes per block (default :func:`logitsep.core.blocks.default_block_size`: about 4M scores).
        recall_levels, per_class: as in :func:`slc_metrics`.
        progress: a tqdm bar over the blocks of each pass; None: only on a terminal.

    Computation (memory ``O(n·block_size)`` beyond the target, plus ``O(P + k)``): pass 1 gathers the P positives'
    scores and the running argmax (first index on ties, as ``np.argmax``); pass 2 sorts each block's columns
    once (:func:`sorted_columns`) for the per-class metrics of its classes (the in-memory code, column by column
    independent) and counts its scores below and tied with every distinct positive score
    (:class:`~logitsep.core.ranking.PooledCounts`), from which the pooled AP and AUROC follow with the in-memory
    formulas. The blocks are compared in their common dtype, as ``np.concatenate`` of them would be.
    """
    t = to_numpy(target, "target")
    if t.ndim not in (1, 2):
        raise ValueError(f"target must be [n] class indices or an [n, k] 0/1 matrix, got shape {tuple(t.shape)}")
    blocks = ScoreBlocks(score_block, num_classes, t.shape[0], block_size=block_size, progress=progress,
                         where="slc_metrics_blocked")
    n, k = blocks.n, blocks.k
    y, labels = check_labels(t, (n, k))
    recalls = _check_recalls(recall_levels)
    if y is not None:  # the examples of each block's classes: one sort by class
        by_class = np.argsort(y, kind="stable")
        edges = np.searchsorted(y[by_class], [a for a, _ in blocks.ranges] + [k])

    def positives(i: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, columns within the block) of the block's positives; None for multi-label targets."""
        if y is None:
            return None
        rows = np.sort(by_class[edges[i]:edges[i + 1]])
        return rows, y[rows] - start

    # pass 1: the positives' scores and the running top-1
    scores_of_positives, best, top = [], None, None
    for i, (start, stop, x) in enumerate(blocks.scan("SLC metrics, pass 1/2")):
        pos = positives(i, start, stop)
        scores_of_positives.append(x[pos] if pos is not None else x[labels[:, start:stop]])
        if y is not None:
            arg = np.argmax(x, axis=1)
            value = x[np.arange(n), arg]
            if best is None:
                best, top = value, arg
            else:
                better = value > best  # strictly: an earlier class keeps a tie, as np.argmax does
                best, top = np.where(better, value, best), np.where(better, arg + start, top)
    counts = PooledCounts(np.concatenate(scores_of_positives))

    # pass 2: per-class metrics and the pooled counts, from one sort of each block's columns
    parts = []
    for i, (start, stop, x) in enumerate(blocks.scan("SLC metrics, pass 2/2")):
        pos = positives(i, start, stop)
        blocks.same_again(start, stop, scores_of_positives[i], x[pos] if pos is not None
                          else x[labels[:, start:stop]])
        columns = sorted_columns(x)
        if pos is not None:
            parts.append(_per_class_of(x, *pos, None, recalls, columns=columns))
        else:
            parts.append(_per_class_of(x, None, None, labels[:, start:stop], recalls, columns=columns))
        counts.add(columns)
        del x, columns
    classes = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if len(counts.positives) == 0:
        pooled = {"pooled_auprc": math.nan, "pooled_auroc": math.nan}
    else:
        pooled = _pooled_from_counts(counts.positives, *counts.counts(), n * k)
    accuracy = None if y is None else float(np.mean(top == y))
    return _summary(classes, recalls, pooled, accuracy, per_class)


def all_logits_blocks(score_block: ScoreBlock, num_classes: int, n: int, *, block_size: int | None = None,
                      progress: bool | None = None) -> ScoreBlock:
    """The "all logits" softmax of :func:`all_logits_scores` as a ``score_block`` function, for logits read a
    block of classes at a time (``score_block``, ``num_classes`` and ``n`` examples as in
    :func:`slc_metrics_blocked`).

    Two passes over the blocks here find each example's largest logit and ``sum_j exp(z_ij - max)`` (float64,
    summed block by block); the returned function gives ``exp(z_ic - max_i) / sum_i`` for a block of classes,
    float64 ``[n, stop - start]``. The same formula as :func:`all_logits_scores`, equal to it up to the rounding
    of the row sums (summed in another order: not bit for bit).
    """
    blocks = ScoreBlocks(score_block, num_classes, n, block_size=block_size, progress=progress,
                         where="all_logits_blocks")

    def logits(start: int, stop: int, x: np.ndarray) -> np.ndarray:
        if not np.isfinite(x).all():
            raise ValueError(f"score_block({start}, {stop}) contains infinite values; softmax is not defined there")
        return x.astype(np.float64)

    row_max = np.full(blocks.n, -np.inf)
    for start, stop, x in blocks.scan("all logits: maxima"):
        np.maximum(row_max, logits(start, stop, x).max(axis=1), out=row_max)
    row_sum = np.zeros(blocks.n)
    for start, stop, x in blocks.scan("all logits: sums"):
        row_sum += np.exp(logits(start, stop, x) - row_max[:, None]).sum(axis=1)

    def softmax_block(start: int, stop: int) -> np.ndarray:
        return np.exp(logits(start, stop, blocks.read(start, stop)) - row_max[:, None]) / row_sum[:, None]

    return softmax_block


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
