"""The paper's tables on one dataset, written with their figures and how they were made:
``logitsep reproduce table1 | table2 | alignment`` (Keren, Sabato & Schuller, ICDM 2018, Tables I and II).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write, write_csv, write_json, write_text
from ..core.keys import ROW_KEYS, SETTING_DEFAULTS, SETTING_KEYS, SLC_KEYS
from ..core.provenance import command_line, environment
from ..core.tables import text_table
from ..data import Splits, load_dataset
from ..metrics import all_logits_scores, slc_metrics
from .grid import Grid, run_losses
from .paper import PAPER_IMPROVEMENT, PAPER_TABLE1, PAPER_TABLE2
from .report import (
    bar_plot,
    comparison_plot,
    paper_table,
    pr_plot,
    separation_plot,
    table1_markdown,
    table2_markdown,
)


def measured_alignment(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """For losses whose alignment is not established (``pols_aligned is None``): nearest-centroid rule on the
    log PoLS violation rate ``log(1 − pooled_auroc)`` between the established aligned and non-aligned losses.

    Returns ``{loss: "behaves aligned" | "behaves non-aligned"}``; empty when either reference group is missing.
    """
    def log_violation(r: dict[str, Any]) -> float:
        return math.log(max(1.0 - r["pooled_auroc"], 1e-12))

    aligned = [log_violation(r) for r in rows if r["pols_aligned"] is True]
    others = [log_violation(r) for r in rows if r["pols_aligned"] is False]
    if not aligned or not others:
        return {}
    ca, cn = float(np.mean(aligned)), float(np.mean(others))
    return {r["loss"]: ("behaves aligned" if abs(log_violation(r) - ca) < abs(log_violation(r) - cn)
                        else "behaves non-aligned")
            for r in rows if r["pols_aligned"] is None}


def table2_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paper Table II: mean of the PoLS-aligned losses (SLC), batch CE (SLC), CE with all logits (softmax)."""
    aligned = [r for r in rows if r["pols_aligned"] is True]
    out = []
    if aligned:
        out.append({"method": "Mean PoLS methods (SLC)", **{k: float(np.mean([r[k] for r in aligned]))
                                                            for k in ROW_KEYS}})
    for r in rows:
        if r["loss"] == "batch_ce":
            out.append({"method": "batch CE (SLC)", **{k: r[k] for k in ROW_KEYS}})
        if r["loss"] == "ce":
            out.append({"method": "CE with all logits", **r["all_logits"]})
    return out


def write_report(out: str | Path, name: str, rows: list[dict[str, Any]], title: str, settings: dict[str, Any],
                 verdicts: dict[str, str] | None = None, test_scores: dict[str, np.ndarray] | None = None,
                 test_target: np.ndarray | None = None) -> dict[str, Path]:
    """``out/name.json`` (the rows), ``out/name.md`` (paper layout + how it was made), ``out/name.png`` (bars);
    with test scores also ``out/name_logits.png`` (true vs false logit distributions per loss)."""
    out = Path(out)
    env = environment()
    paths = {"json": write_json(out / f"{name}.json", rows)}
    lines = [f"# {title}", "", paper_table(rows, markdown=True), ""]
    if verdicts:
        lines += ["Measured alignment of the losses the sources do not classify (nearest centroid of "
                  "log(1 − pooled AUROC) between the established aligned and non-aligned losses):", ""]
        lines += [text_table([[k, v] for k, v in verdicts.items()], ["loss", "measured"], markdown=True), ""]
    table2 = table2_rows(rows)
    if table2 and any(r["method"] == "CE with all logits" for r in table2):
        lines += ["SLC vs all logits (paper Table II layout, 1 − metric):", ""]
        lines += [text_table([[r["method"], *(1 - r[k] for k in ROW_KEYS[:3])] for r in table2],
                             ["method", "1−AUPRC", "1−P@0.9", "1−P@0.99"], markdown=True), ""]
    lines += ["Values are 1 − metric on the test set (lower is better); the PoLS-violation column is "
              "1 − pooled AUROC: the fraction of (true logit, false logit) pairs across the test set in the wrong "
              "order. Learning rate per loss: " + ", ".join(f"{r['loss']}={r['lr']:g}" for r in rows) + ".", "",
              f"Command: `{command_line()}`", "",
              f"Settings: {settings}", "",
              f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
              f"CUDA device: {env['cuda']}; {env['date']}.", "",
              f"![{name}]({name}.png)", ""]
    if test_scores and test_target is not None:
        paths["logits_png"] = separation_plot(test_scores, test_target, [r["loss"] for r in rows],
                                              {r["loss"]: r["pols_aligned"] for r in rows}, out / f"{name}_logits.png")
        lines += ["True and false test logits of each loss (PoLS: the two histograms should not overlap):", "",
                  f"![{name} logits]({name}_logits.png)", ""]
    paths["md"] = write_text(out / f"{name}.md", "\n".join(lines))
    paths["png"] = bar_plot(rows, out / f"{name}.png", title)
    return paths


# ----------------------------------------------------------------------------------------------------------
# logitsep reproduce table1 | table2
# ----------------------------------------------------------------------------------------------------------

def reproduce_command(table: str, settings: Mapping[str, Any], losses: Sequence[str], out: str | Path,
                      jobs: int = 1) -> str:
    """The ``logitsep reproduce`` command line that makes these files again, every setting spelled out
    (``--weight-decay`` and ``--jobs`` only when they are not their defaults)."""
    parts = ["logitsep", "reproduce", table, "--dataset", settings["dataset"], "--model", settings["model"],
             "--losses", ",".join(losses), "--steps", str(settings["steps"]),
             "--lrs", ",".join(f"{x:g}" for x in settings["lr_grid"]), "--batch-size", str(settings["batch_size"]),
             "--seed", str(settings["seed"])]
    if settings.get("weight_decay", 0.0):
        parts += ["--weight-decay", f"{settings['weight_decay']:g}"]
    if jobs > 1:
        parts += ["--jobs", str(jobs)]
    parts += ["--out", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def _save_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row for CSV: nested mappings as ``outer.inner`` columns, lists joined by ";"."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            out[key] = ";".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        else:
            out[key] = value
    return out


_MODEL_WORDS = {"mlp": " (the paper's MLP: two fully connected layers of 500 units, batch norm then ReLU after each, "
                       "then one logit per class)",
                "cnn": " (the paper's CNN: six conv layers and a dense layer of 1024, batch norm then ReLU)"}


def _how_made(command: str, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], n_test: int) -> list[str]:
    env = environment()
    grid = ", ".join(f"{x:g}" for x in settings["lr_grid"])
    chosen = ", ".join(f"{r['loss']}={r['lr']:g}" for r in rows)
    return ["## How this was made", "",
            f"- Command: `{command}`",
            f"- Model: {settings['model']}{_MODEL_WORDS.get(settings['model'], '')}, trained on the "
            f"{settings['train_split']} split with SGD (momentum 0.9, cosine decay, weight decay "
            f"{settings.get('weight_decay', 0.0):g}), batch {settings['batch_size']}, "
            f"seed {settings['seed']}.",
            f"- Steps: {settings['steps']} per run (the paper trains 10^5).",
            f"- Learning-rate grid: {grid}; the rate of each loss is chosen by validation classification accuracy "
            f"(a diverging rate is skipped). Chosen: {chosen}.",
            f"- Test set: {n_test} examples; every metric is on it.",
            f"- Machine: {env['processor']}, {env['cpu_count']} CPUs (shared), torch {env['torch']}, "
            f"CUDA device: {env['cuda']}.",
            f"- Date: {env['date']}.", ""]


def write_table1(out: str | Path, rows: list[dict[str, Any]], scores: Mapping[str, np.ndarray],
                 target: np.ndarray, command: str) -> dict[str, Path]:
    """``table1.{json,csv,md}``, the figures (``table1.png`` bars, ``table1_logits.png`` true vs false logit
    histograms, ``table1_pr.png`` precision-recall curves) and the selected runs' test scores
    (``scores/<loss>.npy`` float32 [n, k], ``scores/labels.npy`` int64 [n]) that ``table2`` can reuse."""
    out = Path(out)
    dataset = rows[0]["dataset"]
    paths: dict[str, Path] = {"labels": _save_npy(out / "scores" / "labels.npy", np.asarray(target, dtype=np.int64))}
    for loss, s in scores.items():
        paths[f"scores_{loss}"] = _save_npy(out / "scores" / f"{loss}.npy", np.asarray(s, dtype=np.float32))
    paths["json"] = write_json(out / "table1.json", rows)
    paths["csv"] = write_csv(out / "table1.csv", [_flat(r) for r in rows])
    aligned = {r["loss"]: r["pols_aligned"] for r in rows}
    order = [r["loss"] for r in sorted(rows, key=lambda r: {False: 0, True: 1, None: 2}[r["pols_aligned"]])]
    title = f"SLC metrics per loss on {dataset} (paper Table I protocol)"
    paths["png"] = bar_plot(rows, out / "table1.png", title)
    paths["logits_png"] = separation_plot(scores, target, order, aligned, out / "table1_logits.png", density=False)
    paths["pr_png"] = pr_plot(scores, target, order, aligned, out / "table1_pr.png",
                              f"Precision-recall of single logits on the {dataset} test set")
    lines = [f"# {title}", "",
             table1_markdown(rows, PAPER_TABLE1.get(dataset), PAPER_IMPROVEMENT.get(dataset)), "",
             "Values are 1 − metric on the test set (lower is better). AUPRC and P@r (precision at the highest "
             "threshold reaching recall r) are per class c, scoring every test example by its logit z_c alone, "
             "averaged over classes. 1 − pooled AUPRC ranks all (example, class) pairs with one threshold; the PoLS "
             "violation rate 1 − pooled AUROC is the fraction of (true logit, false logit) pairs across the test set "
             "in the wrong order. Mean relative improvement = (mean of the non-aligned losses − mean of the aligned "
             "ones) / mean of the non-aligned, on the 1 − metric values.", "",
             "\"paper\": Keren, Sabato & Schuller (ICDM 2018) Table I after 10^5 steps; \"—\" where the paper has no "
             "clean number (its binary-CE row is garbled in the extracted text; only MNIST of these datasets is in "
             "it). Its improvement row includes binary CE.", "",
             *_how_made(command, rows[0], rows, len(target)),
             "## Figures", "",
             "Per loss, the true logits z_y(x) and the false logits z_j(x), j ≠ y, of every test example (counts on a "
             "log axis; PoLS: one threshold separates the two):", "",
             "![true vs false logits](table1_logits.png)", "",
             "Precision-recall curves of the single logits (pooled over classes, and the per-class mean):", "",
             "![precision-recall](table1_pr.png)", "",
             "1 − metric per loss:", "", "![table1](table1.png)", ""]
    paths["md"] = write_text(out / "table1.md", "\n".join(lines))
    return paths


def reproduce_table1(out: str | Path, grid: Grid, data: Splits | None = None, progress: bool | None = None,
                     log: Callable[[str], None] = print, jobs: int = 1) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Paper Table I: train every loss over the learning-rate grid (:func:`~.grid.run_losses`) and write
    :func:`write_table1`'s files into ``out``. Returns the rows and the paths written."""
    data = data if data is not None else load_dataset(grid.dataset)
    scores: dict[str, np.ndarray] = {}
    rows = run_losses(grid, data=data, progress=progress, log=log, test_scores=scores, jobs=jobs)
    command = reproduce_command("table1", grid.settings(), grid.losses, out, jobs=jobs)
    return rows, write_table1(out, rows, scores, data.test_y.numpy(), command)


def reusable_runs(out: str | Path, settings: Mapping[str, Any], losses: Sequence[str], target: np.ndarray,
                  log: Callable[[str], None] = print) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    """The runs of ``out/table1.json`` that ``table2`` can reuse: loss in ``losses``, every ``SETTING_KEYS`` equal
    to ``settings``, ``scores/labels.npy`` equal to ``target`` and ``scores/<loss>.npy`` giving back the row's own
    test metrics (so the scores are that run's, not a stale file). Anything else is skipped with a log line."""
    out = Path(out)
    try:
        rows = json.loads((out / "table1.json").read_text())
        labels = np.load(out / "scores" / "labels.npy", allow_pickle=False)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log(f"  not reusing {out}/table1.json: {err}")
        return {}
    if not isinstance(rows, list) or labels.shape != target.shape or not np.array_equal(labels, target):
        log(f"  not reusing {out}/table1.json: not a list of rows, or its labels are not this test set's")
        return {}
    found: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
    for row in rows:
        loss = row.get("loss") if isinstance(row, dict) else None
        if loss not in losses or any(row.get(k, SETTING_DEFAULTS.get(k)) != settings[k] for k in SETTING_KEYS):
            continue
        try:
            s = np.load(out / "scores" / f"{loss}.npy", allow_pickle=False)
            metrics = slc_metrics(s, target)
        except (OSError, ValueError, TypeError) as err:
            log(f"  not reusing the {loss} run: {err}")
            continue
        if all(math.isclose(metrics[k], row[k], rel_tol=0, abs_tol=1e-9) for k in ROW_KEYS):
            found[loss] = (row, s)
        else:
            log(f"  not reusing the {loss} run: scores/{loss}.npy does not give table1.json's metrics")
    return found


def table2_summary(per_loss: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Paper Table II rows: the mean of the PoLS-aligned losses' single logits, batch CE's single logit, and CE
    with all logits (softmax over every logit); each row only when its losses are present."""
    out: list[dict[str, Any]] = []
    aligned = [r for r in per_loss if r["pols_aligned"] is True]
    if aligned:
        out.append({"method": "Mean PoLS methods (SLC)", "losses": [r["loss"] for r in aligned],
                    "scoring": "single logit",
                    **{k: float(np.mean([r["single_logit"][k] for r in aligned])) for k in ROW_KEYS}})
    for r in per_loss:
        if r["loss"] == "batch_ce":
            out.append({"method": "batch CE (SLC)", "losses": ["batch_ce"], "scoring": "single logit",
                        **r["single_logit"]})
    for r in per_loss:
        if r["loss"] == "ce":
            out.append({"method": "CE with all logits", "losses": ["ce"], "scoring": "all logits", **r["all_logits"]})
    return out


def reproduce_table2(out: str | Path, grid: Grid, data: Splits | None = None, progress: bool | None = None,
                     log: Callable[[str], None] = print, jobs: int = 1) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Paper Table II: each loss's single logit (SLC) against the softmax of all its logits, on the test set.
    Reuses ``out``'s table1 runs made with the same settings (:func:`reusable_runs`), trains the others. Writes
    ``table2.json`` (rows: the paper-layout rows, then one row per loss and scoring), ``table2.csv``,
    ``table2.md`` and ``table2.png``. Returns the JSON rows and the paths."""
    data = data if data is not None else load_dataset(grid.dataset)
    target = data.test_y.numpy()
    settings, losses, dataset = grid.settings(), grid.losses, grid.dataset
    runs = reusable_runs(out, settings, losses, target, log=log)
    missing = [loss for loss in losses if loss not in runs]
    if runs:
        log(f"  reusing {len(runs)} run(s) of {out}/table1.json: {', '.join(runs)}")
    if missing:
        scores: dict[str, np.ndarray] = {}
        for row in run_losses(grid.with_losses(missing), data=data, progress=progress, log=log, test_scores=scores,
                              jobs=jobs):
            runs[row["loss"]] = (row, scores[row["loss"]])
    per_loss = []
    for loss in losses:
        row, s = runs[loss]
        per_loss.append({"loss": loss, "pols_aligned": row["pols_aligned"], "lr": row["lr"],
                         "single_logit": slc_metrics(s, target),
                         "all_logits": slc_metrics(all_logits_scores(np.asarray(s, np.float64) * row["softmax_scale"]),
                                                   target),
                         "reused": loss not in missing})
    summary = table2_summary(per_loss)
    json_rows = [{"group": "paper_layout", **r} for r in summary]
    for r in per_loss:
        for kind, scoring in (("single_logit", "single logit"), ("all_logits", "all logits")):
            json_rows.append({"group": "per_loss", "method": f"{r['loss']} ({scoring})", "loss": r["loss"],
                              "scoring": scoring, "pols_aligned": r["pols_aligned"], "lr": r["lr"],
                              **{k: r[kind][k] for k in ROW_KEYS}, "reused_table1_run": r["reused"], **settings})
    out = Path(out)
    paths = {"json": write_json(out / "table2.json", json_rows),
             "csv": write_csv(out / "table2.csv", [_flat(r) for r in json_rows])}
    title = f"SLC vs all logits on {dataset} (paper Table II protocol)"
    paths["png"] = comparison_plot(per_loss, out / "table2.png", title)
    command = reproduce_command("table2", settings, losses, out, jobs=jobs)
    lines = [f"# {title}", "", table2_markdown(summary, per_loss, PAPER_TABLE2.get(dataset)), ""]
    by_method = {r["method"]: r for r in summary}
    if "batch CE (SLC)" in by_method and "CE with all logits" in by_method:
        b, c = by_method["batch CE (SLC)"], by_method["CE with all logits"]
        ratios = ", ".join(f"{_ratio(1 - b[k], 1 - c[k])} ({k})" for k in SLC_KEYS)
        lines += [f"batch CE's single logit vs CE with all logits, ratio of 1 − metric: {ratios}.", ""]
    reused = [r["loss"] for r in per_loss if r["reused"]]
    lines += ["Values are 1 − metric on the test set (lower is better), as in table1.md. \"single logit\" scores "
              "example x for class c by z_c(x) alone (SLC); \"all logits\" by softmax(z(x))_c, which needs every "
              "logit. The first table is the paper's layout: the mean over the PoLS-aligned losses' single logits, "
              "batch CE's single logit, and cross-entropy with all logits. \"paper\": Keren, Sabato & Schuller "
              "(ICDM 2018) Table II after 10^5 steps; \"—\" where it has none.", "",
              _runs_line(reused, missing), "",
              *_how_made(command, settings, [runs[loss][0] for loss in losses], len(target)),
              "## Figure", "", "![single logit vs all logits](table2.png)", ""]
    paths["md"] = write_text(out / "table2.md", "\n".join(lines))
    return json_rows, paths


def _ratio(a: float, b: float) -> str:
    return f"×{a / b:.2f}" if b > 0 else ("equal (both 0)" if a == 0 else f"{a:.4f} vs 0")


def _runs_line(reused: Sequence[str], trained: Sequence[str]) -> str:
    parts = []
    if reused:
        parts.append("reused from table1.json (same settings; its saved test scores give back its metrics) for "
                     + ", ".join(reused))
    if trained:
        parts.append("trained here for " + ", ".join(trained))
    return "Runs: " + "; ".join(parts) + "."


def reproduce_alignment(out: str | Path, grid: Grid, data: Splits | None = None, progress: bool | None = None,
                        log: Callable[[str], None] = print,
                        jobs: int = 1) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Every loss of the grid measured (``logitsep reproduce alignment``): the paper's Table I layout with the
    losses whose alignment is not established placed by :func:`measured_alignment`, written by
    :func:`write_report` as ``out/alignment.{json,md,png}`` and ``alignment_logits.png``."""
    data = data if data is not None else load_dataset(grid.dataset)
    scores: dict[str, np.ndarray] = {}
    rows = run_losses(grid, data=data, progress=progress, log=log, test_scores=scores, jobs=jobs)
    settings = {"dataset": grid.dataset, "model": grid.model, "steps": grid.steps, "lrs": list(grid.lrs),
                "batch_size": grid.batch_size, "seed": grid.seed,
                "optimizer": f"SGD momentum 0.9, cosine decay, weight decay {grid.weight_decay:g}"}
    title = f"Measured logit separation of every registered loss on {grid.dataset}"
    paths = write_report(out, "alignment", rows, title, settings, measured_alignment(rows), test_scores=scores,
                         test_target=data.test_y.numpy())
    return rows, paths
