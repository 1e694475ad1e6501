"""``logitsep reproduce table1|table2|alignment``: the paper's tables (and the alignment of every loss);
``logitsep reproduce openset|enroll``: classes the model never saw (:mod:`logitsep.experiments.openset`)."""

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

HELP = "the paper's tables (and the alignment table of every loss); open-set rejection and enrollment"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", choices=["table1", "table2", "alignment", "openset", "enroll"])
    add_dataset(p)
    p.add_argument("--model", default="mlp", help=MODEL_HELP)
    p.add_argument("--losses", help="comma-separated registry names (default: the paper's seven; all for alignment)")
    p.add_argument("--steps", type=int, default=2000,
                   help="SGD steps per run (default 2000: what results/mnist and results/fashion-mnist used)")
    p.add_argument("--lrs", default=None,
                   help="learning-rate grid, chosen by validation accuracy (default 1,0.1,0.01,0.001); openset and "
                        "enroll take one rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay of every run (default 0; the paper states none)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many runs of the grid at once, in worker processes that share --threads "
                        "(default 1)")
    g = p.add_argument_group("openset and enroll")
    g.add_argument("--known", help="known classes: a number K (drawn per split) or a comma list of indices or names "
                                   "(openset and enroll: required)")
    g.add_argument("--splits", type=int, default=5, help="openset: seeded splits (default 5)")
    g.add_argument("--shots", default="1,5,10,20,all",
                   help="enroll: examples per enrolled class; 'all': every training example, the features' ceiling "
                        "(default 1,5,10,20,all)")
    g.add_argument("--draws", type=int, default=10, help="enroll: seeded draws per number of examples (default 10)")
    g.add_argument("--rules", default="imprint,fit", help="enroll: enrollment rules to compare (default imprint,fit)")
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
    if args.table in ("openset", "enroll"):
        return _run_unseen(args)
    default = loss_names() if args.table == "alignment" else PAPER_LOSSES
    losses = loss_list(args.parser, args.losses, default)
    lrs = float_list(args.parser, args.lrs or "1,0.1,0.01,0.001")
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


def _run_unseen(args: argparse.Namespace) -> int:
    from ..experiments.openset import DEFAULT_LOSSES, enrollment_study, reproduce_openset

    if not args.known:
        args.parser.error(f"reproduce {args.table} needs --known (a number of classes or a comma list)")
    lrs = float_list(args.parser, args.lrs or "0.1")
    if len(lrs) != 1:
        args.parser.error(f"reproduce {args.table} trains at one learning rate; got --lrs {args.lrs}")
    for name in ("splits", "draws", "steps", "batch_size"):
        if getattr(args, name) < 1:
            args.parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    common = {"steps": args.steps, "lr": lrs[0], "model": args.model, "batch_size": args.batch_size,
              "seed": args.seed, "log": log}
    if args.table == "openset":
        losses = loss_list(args.parser, args.losses, list(DEFAULT_LOSSES))
        rows, paths = reproduce_openset(args.out, dataset_of(args), args.known, args.splits, losses, **common)
    else:
        losses = loss_list(args.parser, args.losses, ["batch_ce"])
        if len(losses) != 1:
            args.parser.error("reproduce enroll takes one loss (--losses L)")
        try:
            shots = [0 if x.strip() == "all" else int(x) for x in args.shots.split(",") if x.strip()]
        except ValueError:
            shots = []
        if not shots or any(s < 0 for s in shots) or shots.count(0) > 1:
            args.parser.error(f"--shots must be positive integers or 'all', got {args.shots}")
        rules = [r.strip() for r in args.rules.split(",") if r.strip()]
        rows, paths = enrollment_study(args.out, dataset_of(args), args.known, shots, args.draws, losses[0], rules,
                                       **common)
    if args.json:
        print_json({"rows": rows, "files": {k: str(v) for k, v in paths.items()}})
    else:
        print(paths["md"].read_text(encoding="utf-8").split("\n\n")[1])
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
