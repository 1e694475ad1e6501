"""Mean and spread over seeds of ``logitsep reproduce table2`` runs.

One seed says little about the tails: on MNIST's 10,000 test images, 1 − precision@0.99 of a class hangs on its
ten or so hardest examples. This module reads the ``table2.json`` of several runs (the same dataset, model, steps
and batch size; different seeds), groups their per-loss rows by (loss, scoring), and reports for every metric the
per-seed values of 1 − metric, their mean and sample standard deviation, and the ratio of the means of two methods
(by default batch CE's single logit over CE with all logits, the comparison of the paper's Table II)::

    logitsep summarize results/mnist/steps100000 results/mnist/steps100000/seeds/* --out results/mnist/steps100000

writes ``OUT/table2_seeds.{json,csv,md,png}``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.files import write_csv, write_json, write_text
from ..core.keys import HEADERS, SETTING_DEFAULTS, SLC_KEYS
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table

METRICS = SLC_KEYS
SAME = ("dataset", "model", "steps", "batch_size", "weight_decay")  # settings every summarised run must share
DEFAULT_PAIR = (("batch_ce", "single logit"), ("ce", "all logits"))


def load_rows(folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The per-loss rows of ``folder/table2.json`` for every folder, each with its ``folder``.

    Raises ``FileNotFoundError`` for a folder without ``table2.json``, ``ValueError`` when the runs differ in
    one of ``SAME`` or when two rows have the same loss, scoring and seed (the same run counted twice)."""
    if not folders:
        raise ValueError("summarize: give at least one folder with a table2.json")
    rows: list[dict[str, Any]] = []
    for folder in folders:
        path = Path(folder) / "table2.json"
        if not path.is_file():
            raise FileNotFoundError(f"summarize: {path} does not exist (run `logitsep reproduce table2 ... "
                                    f"--out {folder}` first)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"summarize: {path} is not valid JSON ({err})") from None
        mine = [r for r in data if isinstance(r, dict) and r.get("group") == "per_loss"]
        if not mine:
            raise ValueError(f"summarize: {path} has no per-loss rows (is it a table2.json?)")
        rows += [{**r, "folder": str(folder)} for r in mine]
    for key in SAME:
        values = {r.get(key, SETTING_DEFAULTS.get(key)) for r in rows}
        if len(values) > 1:
            try:
                listed = sorted(values)
            except TypeError:  # mixed types in a hand-edited file
                listed = sorted(values, key=str)
            raise ValueError(f"summarize: the runs differ in {key} ({listed}); "
                             "only runs of one setting can be summarised together")
    seen: dict[tuple[str, str, int], str] = {}
    for r in rows:
        key = (r["loss"], r["scoring"], r["seed"])
        if key in seen:
            raise ValueError(f"summarize: {r['loss']} ({r['scoring']}), seed {r['seed']}, appears in both "
                             f"{seen[key]} and {r['folder']}")
        seen[key] = r["folder"]
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (loss, scoring): ``seeds``, ``lrs``, and per metric ``values`` (1 − metric, seed order),
    ``mean``, ``std`` (sample standard deviation; 0 for one seed), ``min``, ``max``; mean test accuracy."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["loss"], r["scoring"]), []).append(r)
    out = []
    for (loss, scoring), members in groups.items():
        members = sorted(members, key=lambda r: r["seed"])
        row: dict[str, Any] = {"loss": loss, "scoring": scoring, "pols_aligned": members[0].get("pols_aligned"),
                               "seeds": [r["seed"] for r in members], "lrs": [r["lr"] for r in members],
                               "accuracy": statistics.fmean(r["accuracy"] for r in members)}
        for key in METRICS:
            values = [1.0 - r[key] for r in members]
            row[key] = {"values": values, "mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values), "max": max(values)}
        out.append(row)
    return out


def compare(summary: Sequence[dict[str, Any]],
            pair: tuple[tuple[str, str], tuple[str, str]] = DEFAULT_PAIR) -> dict[str, Any] | None:
    """Ratio of the mean 1 − metric of ``pair[0]`` over ``pair[1]`` (1 = on par), and whether the two methods'
    per-seed ranges overlap; None when either method is missing."""
    find = {(r["loss"], r["scoring"]): r for r in summary}
    a, b = (find.get(p) for p in pair)
    if a is None or b is None:
        return None
    result: dict[str, Any] = {"numerator": list(pair[0]), "denominator": list(pair[1])}
    for key in METRICS:
        ma, mb = a[key]["mean"], b[key]["mean"]
        result[key] = {"ratio_of_means": ma / mb if mb > 0 else math.inf,
                       "ranges_overlap": a[key]["min"] <= b[key]["max"] and b[key]["min"] <= a[key]["max"]}
    return result


def _method(row: dict[str, Any]) -> str:
    return f"{row['loss']} ({row['scoring']})"


def markdown(summary: Sequence[dict[str, Any]], comparison: dict[str, Any] | None, folders: Sequence[str],
             settings: dict[str, Any], command: str) -> str:
    """``table2_seeds.md``: every method's mean ± sd and per-seed values, the comparison, how it was made."""
    header = ["method", "seeds", *(f"{HEADERS[k]} mean ± sd" for k in METRICS),
              *(f"{HEADERS[k]} per seed" for k in METRICS), "accuracy"]
    body = [[_method(r), ",".join(map(str, r["seeds"])),
             *(f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS),
             *(" / ".join(f"{v:.4f}" for v in r[k]["values"]) for k in METRICS), f"{r['accuracy']:.4f}"]
            for r in summary]
    lines = ["# Table II over seeds", "", text_table(body, header, markdown=True), ""]
    if comparison is not None:
        num, den = (f"{loss} ({scoring})" for loss, scoring in (comparison["numerator"], comparison["denominator"]))
        cells = [f"{HEADERS[k]} ×{comparison[k]['ratio_of_means']:.2f} (per-seed ranges "
                 f"{'overlap' if comparison[k]['ranges_overlap'] else 'do not overlap'})" for k in METRICS]
        lines += [f"{num} over {den}, ratio of mean 1 − metric (1 = on par): " + "; ".join(cells) + ".", ""]
    lines += ["Values are 1 − metric on the test set (lower is better); sd is the sample standard deviation over "
              "seeds. Learning rate per run: " + "; ".join(
                  f"{_method(r)} " + ",".join(f"{x:g}" for x in r["lrs"]) for r in summary) + ".", "",
              f"Settings shared by every run: {settings}.", "",
              "Runs: " + ", ".join(f"`{f}`" for f in folders) + " (each folder's table2.md gives its command).", "",
              f"Command: `{command}`", "", "![per-seed values](table2_seeds.png)", ""]
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per metric: every seed's 1 − metric as a dot, the mean as a bar, per method (log scale)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.8))
    names = [_method(r) for r in summary]
    for ax, key in zip(axes, METRICS, strict=True):
        for i, r in enumerate(summary):
            colour = "C0" if r["scoring"] == "single logit" else "C1"
            ax.bar(i, r[key]["mean"], color=colour, alpha=0.35, width=0.6)
            ax.plot([i] * len(r[key]["values"]), r[key]["values"], "o", color=colour, ms=5)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{HEADERS[key]} (lower is better)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_summary(folders: Sequence[str | Path], out: str | Path, command: str,
                  pair: tuple[tuple[str, str], tuple[str, str]] = DEFAULT_PAIR) -> dict[str, Any]:
    """Summarise the runs in ``folders``; write ``out/table2_seeds.{json,csv,md,png}``; return the JSON object."""
    folders = [str(f) for f in folders]
    rows = load_rows(folders)
    summary = summarize(rows)
    comparison = compare(summary, pair)
    out = Path(out)
    settings = {k: rows[0].get(k, SETTING_DEFAULTS.get(k)) for k in SAME}
    result = {"command": command, "folders": folders, "settings": settings,
              "methods": summary, "comparison": comparison}
    write_json(out / "table2_seeds.json", result)
    write_csv(out / "table2_seeds.csv", [
        {"loss": r["loss"], "scoring": r["scoring"], "seed": seed, "lr": lr,
         **{f"1-{k}": r[k]["values"][i] for k in METRICS}}
        for r in summary for i, (seed, lr) in enumerate(zip(r["seeds"], r["lrs"], strict=True))])
    write_text(out / "table2_seeds.md", markdown(summary, comparison, folders, result["settings"], command))
    s = result["settings"]
    plot(summary, out / "table2_seeds.png", f"{s['dataset']}, {s['model']}, {s['steps']} steps: 1 − metric per seed")
    return result
