"""Tables and plots in the paper's layout: "1 − metric" (lower is better) and the mean relative improvement
of PoLS-aligned losses over the others (Keren, Sabato & Schuller, ICDM 2018, Table I)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._io import atomic_write
from .metrics import mean_relative_improvement

SLC_KEYS = ("auprc", "precision@0.9", "precision@0.99")
HEADERS = {"auprc": "1−AUPRC", "precision@0.9": "1−P@0.9", "precision@0.99": "1−P@0.99",
           "pooled_auprc": "1−pooled AUPRC", "pooled_auroc": "PoLS violations (1−pooled AUROC)",
           "accuracy": "accuracy"}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str], markdown: bool = False) -> str:
    """A plain aligned table for terminals, or a GitHub markdown table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.35 * len(rows) + 1.6), sharey=True)
    names = [r["loss"] for r in rows]
    for ax, key in zip(axes, keys, strict=True):
        values = [max(1 - r[key], 1e-5) for r in rows]
        ax.barh(names, values, color=[colours[r.get("pols_aligned")] for r in rows])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels overlap
        ax.set_xlabel(HEADERS[key] + " (lower is better)")
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    fig.legend(handles, ["PoLS-aligned", "not aligned", "not established"], loc="lower center", ncol=3,
               frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def separation_plot(scores: Mapping[str, Any], target: Any, order: Sequence[str], aligned: Mapping[str, bool | None],
                    path: str | Path) -> Path:
    """Small multiples, one per loss: histograms of the true logits (z_y(x)) and the false logits (z_j(x), j ≠ y)
    over the test set, each normalised to unit area. Under the PoLS the two do not overlap: one threshold
    separates them for every class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    target = np.asarray(target)
    names = [n for n in order if n in scores]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.5 * rows), squeeze=False)
    word = {True: "aligned", False: "not aligned", None: "not established"}
    for ax, name in zip(axes.flat, names, strict=False):
        s = np.asarray(scores[name], dtype=np.float64)
        true_mask = np.zeros_like(s, dtype=bool)
        true_mask[np.arange(len(target)), target] = True
        lo, hi = np.percentile(s, [0.05, 99.95])
        bins = np.linspace(lo, hi, 80)
        ax.hist(s[~true_mask], bins=bins, density=True, alpha=0.6, color="tab:red", label="false logits")
        ax.hist(s[true_mask], bins=bins, density=True, alpha=0.6, color="tab:blue", label="true logits")
        ax.set_yscale("log")
        ax.set_title(f"{name} ({word[aligned.get(name)]})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
