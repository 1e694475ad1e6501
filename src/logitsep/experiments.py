"""The paper's experiments on one dataset: train each loss, pick the learning rate by validation accuracy,
report test SLC metrics (Keren, Sabato & Schuller, ICDM 2018, Section VI-A/B, Tables I and II).

``run_losses`` is shared by ``logitsep reproduce table1|table2|alignment`` and the demo.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_json, write_text
from .bench._common import command_line, environment
from .data import Splits, load_dataset
from .losses import LOSSES
from .report import bar_plot, paper_table, separation_plot, text_table
from .train import TrainConfig, predict, train

PAPER_LOSSES = ("ce", "max_margin", "self_norm", "nce", "bce", "batch_ce", "batch_max_margin")
ROW_KEYS = ("auprc", "precision@0.9", "precision@0.99", "pooled_auprc", "pooled_auroc", "accuracy")


def run_losses(dataset: str, losses: Sequence[str], steps: int, lrs: Sequence[float], batch_size: int = 128,
               model: str = "mlp", seed: int = 0, data: Splits | None = None, train_split: str = "train",
               progress: bool | None = None, log: Callable[[str], None] = print,
               test_scores: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Train every loss at every learning rate; keep, per loss, the run with the best validation accuracy
    (when there is a single rate, no validation is needed) and return its test metrics as one row.
    ``test_scores``, when given, receives each kept model's test scores ``[n, k]`` under the loss name."""
    data = data if data is not None else load_dataset(dataset)
    select = len(lrs) > 1
    rows = []
    for loss in losses:
        best: dict[str, Any] | None = None
        for lr in lrs:
            config = TrainConfig(dataset=dataset, model=model, loss=loss, steps=steps, lr=lr, batch_size=batch_size,
                                 seed=seed, train_split=train_split)
            splits = ("valid", "test") if select else ("test",)
            try:
                trained, result = train(config, data=data, progress=progress, eval_splits=splits)
            except FloatingPointError as err:  # a diverging learning rate is a legitimate outcome of the grid
                log(f"  {loss} lr={lr}: diverged ({err})")
                continue
            valid_acc = result["valid"]["accuracy"] if select else math.nan
            valid = f"valid acc={valid_acc:.4f}  " if select else ""
            log(f"  {loss:>18} lr={lr:<6g} {valid}test acc={result['test']['accuracy']:.4f}  "
                f"({result['train_seconds']:.0f}s)")
            if best is None or (select and valid_acc > best["valid_accuracy"]):
                best = {"result": result, "lr": lr, "valid_accuracy": valid_acc}
                if test_scores is not None:
                    test_scores[loss] = predict(trained, data.test_x).numpy()
        if best is None:
            raise FloatingPointError(f"{loss}: every learning rate in {list(lrs)} diverged")
        test = best["result"]["test"]
        rows.append({"loss": loss, "pols_aligned": LOSSES[loss].pols_aligned, "lr": best["lr"],
                     **{k: test[k] for k in ROW_KEYS},
                     "valid_accuracy": None if not select else best["valid_accuracy"],
                     "all_logits": {k: test["all_logits"][k] for k in ROW_KEYS},
                     "train_seconds": best["result"]["train_seconds"]})
    return rows


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
