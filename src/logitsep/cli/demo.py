"""``logitsep demo`` (what ``make demo`` runs): ce against batch_ce on MNIST, in the paper's table layout."""

from __future__ import annotations

import argparse

from .common import add_threads, apply_threads, print_json

HELP = "train ce and batch_ce on MNIST and print the paper-style table"

# Learning rates of the demo, chosen by validation accuracy from {1, 0.3, 0.1, 0.03} with
# `logitsep reproduce table1 --dataset mnist --losses ce,batch_ce --steps 1500 --lrs 1,0.3,0.1,0.03 --out DIR`
# (batch_ce diverges at 1 and 0.3 with momentum SGD; ce is best at 0.1).
DEMO_LRS = {"ce": 0.1, "batch_ce": 0.03}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    add_threads(p, default=1)  # the demo's small MLP: one thread is fastest and steadiest


def run(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..experiments import Grid, run_losses
    from ..experiments.report import paper_table

    apply_threads(args)
    data = load_dataset("mnist")
    log = (lambda s: None) if args.json else print
    log(f"logitsep demo: the paper's MNIST MLP (2 x 500, batch norm, ReLU) trained on the 60k MNIST training "
        f"images, {args.steps} SGD steps of {args.batch_size} per loss, scored on the 10k test images.")
    rows = []
    for loss, lr in DEMO_LRS.items():
        grid = Grid(dataset="mnist", losses=(loss,), steps=args.steps, lrs=(lr,), batch_size=args.batch_size,
                    seed=args.seed, train_split="train_full")
        rows += run_losses(grid, data=data, log=log)
    if args.json:
        print_json(rows)
        return 0
    print()
    print("Single logit classification on the MNIST test set (1 − metric, lower is better):")
    print(paper_table(rows))
    ce = next(r for r in rows if r["loss"] == "ce")
    print(f"\nFor reference, CE with all 10 logits (softmax): 1−AUPRC {1 - ce['all_logits']['auprc']:.4f}, "
          f"1−P@0.9 {1 - ce['all_logits']['precision@0.9']:.4f}, "
          f"1−P@0.99 {1 - ce['all_logits']['precision@0.99']:.4f}")
    print("Paper (Table I, MNIST, 10^5 steps): ce .008/.005/.203, batch_ce .002/.001/.022; all logits .001/.000/.020")
    return 0
