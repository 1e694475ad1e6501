"""``logitsep reproduce table1|table2|alignment``: the paper's tables (and the alignment of every loss)."""

from __future__ import annotations

import argparse
import math
import sys

from .common import (
    MODEL_HELP,
    add_dataset,
    add_threads,
    apply_threads,
    dataset_of,
    float_list,
    loss_list,
    loss_names,
    print_json,
)

HELP = "the paper's tables (and the alignment table of every loss)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", choices=["table1", "table2", "alignment"])
    add_dataset(p)
    p.add_argument("--model", default="mlp", help=MODEL_HELP)
    p.add_argument("--losses", help="comma-separated registry names (default: the paper's seven; all for alignment)")
    p.add_argument("--steps", type=int, default=2000,
                   help="SGD steps per run (default 2000: what results/mnist and results/fashion-mnist used)")
    p.add_argument("--lrs", default="1,0.1,0.01,0.001", help="learning-rate grid, chosen by validation accuracy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay of every run (default 0; the paper states none)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many runs of the grid at once, in worker processes that share --threads "
                        "(default 1)")
    p.add_argument("--out", required=True)
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    from ..experiments import (
        PAPER_IMPROVEMENT,
        PAPER_LOSSES,
        PAPER_TABLE1,
        Grid,
        measured_alignment,
        reproduce_alignment,
        reproduce_table1,
        reproduce_table2,
    )
    from ..experiments.report import paper_table, table1_markdown

    apply_threads(args)
    default = loss_names() if args.table == "alignment" else PAPER_LOSSES
    losses = loss_list(args.parser, args.losses, default)
    lrs = float_list(args.parser, args.lrs)
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        args.parser.error(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if args.jobs < 1:
        args.parser.error(f"--jobs must be >= 1, got {args.jobs}")
    grid = Grid(dataset=dataset_of(args), losses=tuple(losses), steps=args.steps, lrs=tuple(lrs),
                batch_size=args.batch_size, model=args.model, seed=args.seed, weight_decay=args.weight_decay)
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    make = {"table1": reproduce_table1, "table2": reproduce_table2, "alignment": reproduce_alignment}[args.table]
    rows, paths = make(args.out, grid, log=log, jobs=args.jobs)
    verdicts = measured_alignment(rows) if args.table == "alignment" else None
    if args.json:
        print_json({"rows": rows, **({"verdicts": verdicts} if verdicts is not None else {}),
                    "files": {k: str(v) for k, v in paths.items()}})
    elif args.table == "alignment":
        print(paper_table(rows))
        for loss, verdict in verdicts.items():
            print(f"{loss}: {verdict}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    else:
        if args.table == "table1":
            print(table1_markdown(rows, PAPER_TABLE1.get(grid.dataset), PAPER_IMPROVEMENT.get(grid.dataset),
                                  markdown=False))
        else:
            print(paths["md"].read_text(encoding="utf-8").split("\n## ")[0])
        print(f"wrote {paths['md']}, {paths['json']}, {paths['csv']} and the figures in {args.out}")
    return 0
