"""The distillation table of issue 19: three CE teachers, then students that convert them into single-logit
classifiers, each scored by its single logit (and all logits) on the test split.

    .venv/bin/python tools/distill_table.py --dataset mnist --runs /work/runs/distill-mnist \\
        --out results/distill/mnist [--steps 2000] [--head-steps 200,400,1000,2000] [--threads 1]

Rows: the three teachers (CE, seeds 0-2) and their ensemble's mean logits; students: CE from scratch (seed 3),
batch_ce from scratch, ``--head-only`` batch_ce on teacher 0 (``--head-steps`` steps, the rate of ``--head-lrs`` with
the best validation AUPRC at the first length), meal_v2 (objective alone),
meal_v2 + batch_ce, kd + batch_ce, logit_match (objective alone). Learning rates: the ones Table I chose on MNIST
(results/mnist/table1.json: ce 0.1, batch_ce 0.01); distilled students 0.1 (0.01 when batch_ce is in the sum).
Columns: 1 − AUPRC / 1 − P@0.9 / 1 − P@0.99 of the single logit, pooled AUROC, accuracy, all-logits
AUPRC, training steps. Writes ``OUT/distill.json``, ``.csv``, ``.md`` and ``distill.png``; run folders go to
``--runs`` (reused when complete).

On glyphs (resnet_small, every rate 0.1: the rate of the glyphs comparisons in results/glyphs):

    .venv/bin/python tools/distill_table.py --dataset glyphs --model resnet_small --lr-ce 0.1 --lr-aligned 0.1 \
        --runs /work/runs/distill-glyphs --out results/distill/glyphs --head-steps 200,1000

``--lane A`` / ``--lane B`` trains only that lane's runs (two processes on two cores; a lane waits for the runs it
depends on, e.g. the teachers); a last call without ``--lane`` trains what is left and writes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from logitsep.core.files import write_csv, write_json, write_text
from logitsep.core.plots import pyplot, save_figure
from logitsep.core.provenance import command_line, environment
from logitsep.core.tables import text_table
from logitsep.data import load_dataset
from logitsep.runs import load_run
from logitsep.train import TrainConfig, distill, metrics_of_scores, predict, train

KEYS = ("auprc", "precision@0.9", "precision@0.99", "pooled_auroc", "accuracy")


def done(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def row(name: str, run: Path | None, scores: np.ndarray | None, y: np.ndarray, steps: int) -> dict:
    if scores is None:
        m = json.loads((run / "metrics.json").read_text())["test"]
    else:
        m = metrics_of_scores(scores, torch.as_tensor(y))
    seconds = json.loads((run / "metrics.json").read_text())["train_seconds"] if run else None
    return {"model": name, **{k: float(m[k]) for k in KEYS}, "all_logits_auprc": float(m["all_logits"]["auprc"]),
            "steps": steps, "train_seconds": seconds, "run": str(run) if run else None}


LANES = {"A": {"teacher0", "teacher1", "teacher2", "meal_v2", "kd+batch_ce", "head-steps"},
         "B": {"ce", "batch_ce", "head-lr", "meal_v2+batch_ce", "logit_match"}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--model", default="mlp")
    p.add_argument("--runs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--head-steps", type=lambda t: [int(v) for v in t.split(",")], default=[200, 400, 1000, 2000],
                   help="head-only refits of these lengths (the rate chosen at the first)")
    p.add_argument("--head-lrs", type=lambda t: [float(v) for v in t.split(",")],
                   default=[0.1, 0.03, 0.01, 0.003, 0.001],
                   help="head-only learning rates; the one with the best validation AUPRC is kept")
    p.add_argument("--lr-ce", type=float, default=0.1, help="rate of CE runs and of students without batch_ce")
    p.add_argument("--lr-aligned", type=float, default=0.01,
                   help="rate of batch_ce from scratch and of students with batch_ce in their sum")
    p.add_argument("--lane", choices=sorted(LANES), help="train only this lane's runs (see above); no table")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.out)
    data = load_dataset(args.dataset)
    y = np.asarray(data.test_y)
    common = {"dataset": args.dataset, "model": args.model, "steps": args.steps, "batch_size": 128}
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    def mine(group: str) -> bool:
        return args.lane is None or group in LANES[args.lane]

    def need(run: Path) -> Path:  # a run another lane trains: wait for it
        while args.lane and not done(run):
            time.sleep(20)
        return run

    def fit(name: str, config: TrainConfig) -> Path:
        run = runs / name
        if not done(run) and mine(name):
            log(f"training {name}")
            train(config, data=data, out=run, progress=False, eval_splits=("valid", "test"))
        return run

    teachers = [fit(f"teacher{s}", TrainConfig(loss="ce", lr=args.lr_ce, seed=s, **common)) for s in range(3)]
    fit("ce", TrainConfig(loss="ce", lr=args.lr_ce, seed=3, **common))
    fit("batch_ce", TrainConfig(loss="batch_ce", lr=args.lr_aligned, seed=3, **common))
    head_lr, head_runs = None, []
    first = args.head_steps[0]
    for lr in args.head_lrs:  # the rate by validation AUPRC of the single logit (the test split stays unseen)
        run = runs / f"head-lr{lr:g}"
        if not mine("head-lr"):
            need(run)
        elif not done(run):
            need(teachers[0])
            log(f"head-only refit at lr {lr:g}")
            distill([str(teachers[0])], "batch_ce", "", out=run, head_only=True, steps=first, lr=lr, seed=3,
                    data=data, progress=False)
        valid = json.loads((run / "metrics.json").read_text())["valid"]["auprc"]
        head_runs.append({"lr": lr, "valid_auprc": valid, "run": str(run)})
        if head_lr is None or valid > head_lr[1]:
            head_lr = (lr, valid, run)
    head_rows = [{**row(f"head-only batch_ce (teacher 0), lr {head_lr[0]:g}, {first} steps", head_lr[2], None, y,
                        first), "lr_grid": head_runs}]
    for steps in args.head_steps[1:]:
        run = runs / f"head-{steps}"
        if not done(run) and mine("head-steps"):
            log(f"head-only refit, {steps} steps")
            distill([str(teachers[0])], "batch_ce", "", out=run, head_only=True, steps=steps, lr=head_lr[0], seed=3,
                    data=data, progress=False)
        if done(run):
            head_rows.append(row(f"head-only batch_ce (teacher 0), lr {head_lr[0]:g}, {steps} steps", run, None, y,
                                 steps))
    students = [("meal_v2", "meal_v2", "ce", "meal_v2", 0.0, False, args.steps, args.lr_ce),
                ("meal_v2 + batch_ce", "meal_v2+batch_ce", "batch_ce", "meal_v2", 1.0, False, args.steps,
                 args.lr_aligned),
                ("kd + batch_ce", "kd+batch_ce", "batch_ce", "kd", 1.0, False, args.steps, args.lr_aligned),
                ("logit_match", "logit_match", "ce", "logit_match", 0.0, False, args.steps, args.lr_ce)]
    student_rows = []
    for name, folder, loss, objective, alpha, head_only, steps, lr in students:
        run = runs / folder
        if not done(run) and mine(folder):
            for t in teachers:
                need(t)
            log(f"distilling {name}")
            chosen = [str(teachers[0])] if head_only else [str(t) for t in teachers]
            distill(chosen, loss, objective, out=run, alpha=alpha, head_only=head_only, steps=steps, lr=lr, seed=3,
                    data=data, progress=False)
        if done(run):
            student_rows.append(row(name, run, None, y, steps))
    if args.lane:
        return 0
    rows = [row(f"teacher {i} (CE)", t, None, y, args.steps) for i, t in enumerate(teachers)]
    ensemble = np.mean([predict(load_run(t).model, data.test_x).numpy() for t in teachers], axis=0)
    rows.append(row("teachers' ensemble (mean logits)", None, ensemble, y, 3 * args.steps))
    rows.append(row("CE from scratch", runs / "ce", None, y, args.steps))
    rows.append(row("batch_ce from scratch", runs / "batch_ce", None, y, args.steps))
    rows += head_rows + student_rows
    env = environment()
    meta = {"command": command_line(), "environment": env, "settings": vars(args)}
    write_json(out / "distill.json", {**meta, "rows": rows})
    write_csv(out / "distill.csv", [{k: v for k, v in r.items() if k != "lr_grid"} for r in rows])
    header = ["model", "1−AUPRC", "1−P@0.9", "1−P@0.99", "1−pooled AUROC", "accuracy", "all-logits 1−AUPRC",
              "steps", "train s"]
    table = [[r["model"], *(f"{1 - r[k]:.4f}" for k in KEYS[:4]), f"{r['accuracy']:.4f}",
              f"{1 - r['all_logits_auprc']:.4f}", r["steps"],
              "–" if r["train_seconds"] is None else f"{r['train_seconds']:.1f}"] for r in rows]
    scratch = {r["model"]: r for r in rows}
    ce, bce = 1 - scratch["CE from scratch"]["auprc"], 1 - scratch["batch_ce from scratch"]["auprc"]
    recover = [[r["model"], f"{(ce - (1 - r['auprc'])) / (ce - bce):.0%}" if ce != bce else "–", r["steps"]]
               for r in rows if r["model"] not in ("CE from scratch", "batch_ce from scratch")]
    lines = [f"# Converting CE classifiers into single-logit classifiers: {args.dataset}", "",
             text_table(table, header, markdown=True), "",
             "Single-logit metrics on the test split (1 − metric: lower is better). The share of batch_ce-from-"
             "scratch's improvement over CE-from-scratch in 1 − AUPRC each model recovers (100% = as good as "
             "batch_ce from scratch; > 100% better):", "",
             text_table(recover, ["model", "recovered", "steps"], markdown=True), "",
             f"Command: `{command_line()}`", "",
             f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}; {env['date']}.", "",
             "![distillation](distill.png)", ""]
    write_text(out / "distill.md", "\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = [r["model"] for r in rows]
    ax.barh(names, [1 - r["auprc"] for r in rows],
            color=["#888"] * 4 + ["#c44", "#2a7"] + ["#36c"] * (len(rows) - 6))
    ax.set_xscale("log")
    ax.set_xlabel("1 − AUPRC of the single logit (test)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, out / "distill.png")
    print("\n".join(lines[:3]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
