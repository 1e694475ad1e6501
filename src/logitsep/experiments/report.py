"""Tables and plots in the paper's layout: "1 − metric" (lower is better) and the mean relative improvement
of PoLS-aligned losses over the others (Keren, Sabato & Schuller, ICDM 2018, Table I)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.keys import HEADERS, SLC_KEYS
from ..core.plots import decade_below, pyplot, save_figure
from ..core.ranking import ranked_counts
from ..core.tables import text_table
from ..metrics import mean_relative_improvement, per_class_metrics


def paper_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False,
                extra: Sequence[str] = ("pooled_auroc", "accuracy")) -> str:
    """Rows ``{"loss", "pols_aligned", metric: value}`` as the paper prints them: 1 − each SLC metric, the
    non-aligned losses first, then the aligned ones, then the mean relative improvement row."""
    order = sorted(rows, key=lambda r: {False: 0, True: 1, None: 2}[r.get("pols_aligned")])
    header = ["loss", "PoLS-aligned", *(HEADERS[k] for k in SLC_KEYS), *(HEADERS[k] for k in extra)]
    body: list[list[Any]] = []
    for r in order:
        aligned = {True: "yes", False: "no", None: "?"}[r.get("pols_aligned")]
        extras = [(1 - r[k]) if k.startswith("pooled") else r.get(k) for k in extra]
        body.append([r["loss"], aligned, *(1 - r[k] for k in SLC_KEYS), *extras])
    improvement = relative_improvement_row(rows)
    if improvement is not None:
        body.append(["mean relative improvement", "",
                     *("–" if math.isnan(improvement[k]) else f"{100 * improvement[k]:.1f}%" for k in SLC_KEYS),
                     *("" for _ in extra)])
    return text_table(body, header, markdown=markdown)


def relative_improvement_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Mean relative improvement per SLC metric (on 1 − metric) of aligned over non-aligned losses."""
    aligned = [r for r in rows if r.get("pols_aligned") is True]
    others = [r for r in rows if r.get("pols_aligned") is False]
    if not aligned or not others:
        return None
    return {k: mean_relative_improvement([1 - r[k] for r in others], [1 - r[k] for r in aligned]) for k in SLC_KEYS}


def bar_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str,
             keys: Sequence[str] = ("auprc", "precision@0.99", "pooled_auroc")) -> Path:
    """One panel per metric, 1 − metric on a log axis, bars coloured by PoLS alignment."""
    plt = pyplot()
    import matplotlib.ticker

    colours = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.35 * len(rows) + 1.6), sharey=True)
    names = [r["loss"] for r in rows]
    for ax, key in zip(axes, keys, strict=True):
        values = [max(1 - r[key], 1e-5) for r in rows]
        ax.barh(names, values, color=[colours[r.get("pols_aligned")] for r in rows])
        ax.set_xscale("log")
        ax.set_xlim(left=decade_below(values))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
        ax.set_xlabel(HEADERS[key] + " (lower is better)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["PoLS-aligned", "not aligned", "not established"], loc="lower center", ncol=3,
               frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return save_figure(fig, path, dpi=120)


def _true_mask(shape: tuple[int, int], target: np.ndarray) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[np.arange(shape[0]), target] = True
    return mask


def separation_plot(scores: Mapping[str, Any], target: Any, order: Sequence[str], aligned: Mapping[str, bool | None],
                    path: str | Path, density: bool = True) -> Path:
    """Small multiples, one per loss: histograms of the true logits (z_y(x)) and the false logits (z_j(x), j ≠ y)
    over the test set on a log axis. ``density=True`` normalises each histogram to unit area; ``False`` keeps the
    raw counts (k − 1 false logits per example), so a handful of overlapping pairs still shows, as in the
    paper's Figure 2. Under the PoLS the two do not overlap: one threshold separates them for every class."""
    plt = pyplot()
    target = np.asarray(target)
    names = [n for n in order if n in scores]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        s = np.asarray(scores[name], dtype=np.float64)
        true_mask = _true_mask(s.shape, target)
        # the range of the bulk of the false logits and of the true ones: with thousands of classes the true logits
        # are the top 0.03% of all logits, and a range from the pooled percentiles would cut them off
        lo = min(np.percentile(s[~true_mask], 0.05), np.percentile(s[true_mask], 0.05))
        hi = max(np.percentile(s[~true_mask], 99.95), np.percentile(s[true_mask], 99.95))
        bins = np.linspace(lo, hi, 80)
        ax.hist(s[~true_mask], bins=bins, density=density, alpha=0.6, color="tab:red", label="false logits")
        ax.hist(s[true_mask], bins=bins, density=density, alpha=0.6, color="tab:blue", label="true logits")
        ax.set_yscale("log")
        ax.set_title(f"{name} ({_WORD[aligned.get(name)]})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("density" if density else "count", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path)


_WORD = {True: "aligned", False: "not aligned", None: "not established"}


def pr_curve(scores: Any, positive: Any) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall points of one ranking, one point per distinct score threshold T (highest first):
    ``recall(T) = TP(T) / P`` and ``precision(T) = TP(T) / #{score >= T}`` (tied scores enter together, the
    points of scikit-learn's ``precision_recall_curve`` without its final (recall 0, precision 1) point).

    ``scores`` and ``positive`` are 1-D of the same length; at least one positive is required.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.ndim != 1 or s.shape != pos.shape:
        raise ValueError(f"scores and positive must be 1-D of one length, got shapes {s.shape} and {pos.shape}")
    if not pos.any():
        raise ValueError("pr_curve needs at least one positive")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    _, tp, taken = ranked_counts(s, pos)
    return tp / tp[-1], tp / taken


def precision_at_recalls(scores: Any, target: Any, recalls: Sequence[float]) -> np.ndarray:
    """Per class c and recall level r: the precision at the highest threshold whose recall is at least r, i.e.
    :func:`logitsep.metrics.per_class_metrics`'s ``precision@r``. Returns ``[k, len(recalls)]``, NaN rows for
    classes without positives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(target)
    if s.ndim != 2 or y.shape != (s.shape[0],):
        raise ValueError(f"scores must be [n, k] and target [n], got shapes {s.shape} and {y.shape}")
    per_class = per_class_metrics(s, y, recall_levels=tuple(float(r) for r in recalls))
    return np.stack([per_class[f"precision@{float(r):g}"] for r in recalls], axis=1)


def pr_plot(scores: Mapping[str, Any], target: Any, order: Sequence[str], aligned: Mapping[str, bool | None],
            path: str | Path, title: str) -> Path:
    """Precision-recall curves of every loss in one figure, drawn as 1 − precision on a symmetric-log axis (the
    paper's "lower is better"; 0 stays visible). Left: the pooled curve (one threshold for all n·k
    (example, class) pairs: the PoLS view). Right: the mean over classes of the per-class precision at each
    recall (the per-class SLC view behind the AUPRC and precision@r columns). Aligned losses solid, others dashed."""
    plt = pyplot()
    target = np.asarray(target)
    names = [n for n in order if n in scores]
    grid = np.linspace(0.5, 1.0, 201)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        s = np.asarray(scores[name], dtype=np.float64)
        style = {"color": colours(i % 10), "lw": 1.3, "ls": "-" if aligned.get(name) else "--",
                 "label": f"{name} ({_WORD[aligned.get(name)]})"}
        recall, precision = pr_curve(s.ravel(), _true_mask(s.shape, target).ravel())
        keep = recall >= grid[0]
        axes[0].plot(recall[keep], 1 - precision[keep], **style)
        axes[1].plot(grid, 1 - np.nanmean(precision_at_recalls(s, target, grid), axis=0), **style)
    axes[0].set_title("pooled: one threshold for every class", fontsize=10)
    axes[1].set_title("per class, mean over classes", fontsize=10)
    axes[0].set_ylabel("1 − precision (symlog; lower is better)")
    for ax in axes:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(0, 1)
        ax.set_xlabel("recall")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def comparison_plot(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Paper Table II as bars: per loss, 1 − metric of its single logit next to 1 − metric of the softmax of all
    its logits (log axis). ``rows``: ``{"loss", "single_logit": {metric: value}, "all_logits": {...}}``."""
    import matplotlib.ticker

    plt = pyplot()
    fig, axes = plt.subplots(1, len(SLC_KEYS), figsize=(4.2 * len(SLC_KEYS), 0.5 * len(rows) + 1.8), sharey=True)
    y = np.arange(len(rows))
    for ax, key in zip(axes, SLC_KEYS, strict=True):
        lowest = []
        for offset, kind, colour, label in ((-0.2, "single_logit", "tab:blue", "single logit (SLC)"),
                                            (0.2, "all_logits", "tab:orange", "softmax of all logits")):
            values = [max(1 - r[kind][key], 1e-5) for r in rows]
            ax.barh(y + offset, values, height=0.4, color=colour, label=label)
            lowest += values
        ax.set_yticks(y, [r["loss"] for r in rows])
        ax.set_xscale("log")
        ax.set_xlim(left=decade_below(lowest))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
        ax.set_xlabel(HEADERS[key] + " (lower is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return save_figure(fig, path, dpi=120)


def _paper_value(paper: Mapping[str, Sequence[float]] | None, name: str, i: int) -> str:
    """A number as the paper prints it (three decimals), "—" where the paper has none."""
    values = (paper or {}).get(name)
    return "—" if values is None else f"{values[i]:.3f}"


def table1_markdown(rows: Sequence[Mapping[str, Any]], paper: Mapping[str, Sequence[float]] | None = None,
                    paper_improvement: Sequence[float] | None = None, markdown: bool = True) -> str:
    """Paper Table I layout: 1 − metric per loss (lower is better), the non-aligned losses, then the aligned
    ones (then losses whose alignment is not established), then the mean relative improvement row
    (:func:`relative_improvement_row`). Each SLC column is followed by the paper's number (``paper``: loss →
    (1−AUPRC, 1−P@0.9, 1−P@0.99) as printed; "—" where it has none); then 1 − pooled AUPRC, the PoLS violation
    rate 1 − pooled AUROC, accuracy and the chosen learning rate."""
    header = ["loss"]
    for key in SLC_KEYS:
        header += [HEADERS[key], "paper"]
    header += [HEADERS["pooled_auprc"], HEADERS["pooled_auroc"], "accuracy", "lr"]
    body: list[list[Any]] = []
    groups = ((False, "not PoLS-aligned"), (True, "PoLS-aligned"), (None, "alignment not established"))
    for flag, label in groups:
        members = [r for r in rows if r.get("pols_aligned") is flag]
        if not members:
            continue
        body.append([f"**{label}**" if markdown else f"[{label}]", *([""] * (len(header) - 1))])
        for r in members:
            cells: list[Any] = [r["loss"]]
            for i, key in enumerate(SLC_KEYS):
                cells += [1 - r[key], _paper_value(paper, r["loss"], i)]
            cells += [1 - r["pooled_auprc"], 1 - r["pooled_auroc"], r["accuracy"], f"{r['lr']:g}"]
            body.append(cells)
    improvement = relative_improvement_row(rows)
    if improvement is not None:
        cells = ["mean relative improvement"]
        for i, key in enumerate(SLC_KEYS):
            ours = "–" if math.isnan(improvement[key]) else f"{100 * improvement[key]:.1f}%"
            cells += [ours, "—" if paper_improvement is None else f"{100 * paper_improvement[i]:.1f}%"]
        body.append([*cells, "", "", "", ""])
    return text_table(body, header, markdown=markdown)


def table2_markdown(summary: Sequence[Mapping[str, Any]], per_loss: Sequence[Mapping[str, Any]],
                    paper: Mapping[str, Sequence[float]] | None = None, markdown: bool = True) -> str:
    """Paper Table II layout (``summary``: rows ``{"method", metric: value}``, 1 − metric with the paper's
    numbers beside them), then every loss's single logit next to the softmax of all its logits
    (``per_loss``: rows ``{"loss", "pols_aligned", "lr", "single_logit": {...}, "all_logits": {...}}``)."""
    header = ["method"]
    for key in SLC_KEYS:
        header += [HEADERS[key], "paper"]
    body = [[r["method"], *(c for i, k in enumerate(SLC_KEYS) for c in (1 - r[k], _paper_value(paper, r["method"], i)))]
            for r in summary]
    top = text_table(body, header, markdown=markdown)
    header = ["loss", "PoLS-aligned", "lr"]
    for key in SLC_KEYS:
        header += [f"{HEADERS[key]} single logit", f"{HEADERS[key]} all logits"]
    body = [[r["loss"], {True: "yes", False: "no", None: "?"}[r.get("pols_aligned")], f"{r['lr']:g}",
             *(1 - r[kind][k] for k in SLC_KEYS for kind in ("single_logit", "all_logits"))] for r in per_loss]
    return top + "\n\n" + text_table(body, header, markdown=markdown)
