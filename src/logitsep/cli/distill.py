"""``logitsep distill --teacher RUN [--teacher RUN ...] --loss L --objective O --out DIR``: a student trained from
the classifiers you have (:mod:`logitsep.losses.distill`), or ``--head-only``: the teacher's head refit on its frozen
features with a PoLS-aligned loss. The run folder is a ``logitsep train`` run folder (resume, checkpoints, DDP)."""

from __future__ import annotations

import argparse

from ..core.tables import text_table
from .common import add_dataset, add_threads, apply_threads, dataset_of, loss_names, print_json, summary_rows

HELP = "turn existing classifiers into a single-logit classifier: distillation, or refit the head (--head-only)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..losses.distill import OBJECTIVES

    p.add_argument("--teacher", action="append", required=True, metavar="RUN",
                   help="a teacher run folder (repeatable: an ensemble, soft labels averaged)")
    p.add_argument("--loss", required=True, choices=loss_names(), metavar="LOSS",
                   help="the loss on the hard labels, weighted by --alpha (a PoLS-aligned one, e.g. batch_ce)")
    p.add_argument("--objective", choices=[*OBJECTIVES, "none"], default="none",
                   help="distillation term: kd (Hinton: KL at --temperature, times T^2), meal_v2 (soft CE on the "
                        "teachers' mean softmax + a logit discriminator), logit_match (MSE on logits), or none")
    p.add_argument("--alpha", type=float, default=1.0,
                   help="weight of --loss on the hard labels (default 1; 0: the objective alone)")
    p.add_argument("--temperature", type=float, default=4.0, help="kd's temperature (default 4)")
    p.add_argument("--head-only", action="store_true",
                   help="keep the first teacher's features frozen and train only the head (the cheapest conversion)")
    add_dataset(p, required=False, help="default: the first teacher's")
    p.add_argument("--model", help="the student's model (default: the first teacher's architecture)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="the student's run folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    from ..distributed import rank
    from ..train import distill

    apply_threads(args)
    model, result = distill(args.teacher, args.loss, "" if args.objective == "none" else args.objective,
                            out=args.out, alpha=args.alpha, temperature=args.temperature, head_only=args.head_only,
                            dataset=dataset_of(args), model=args.model, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, seed=args.seed, device=args.device, resume=args.resume)
    if rank() != 0:
        return 0
    if args.json:
        print_json(result)
    else:
        what = "head refit" if args.head_only else f"student ({args.objective} + {args.alpha:g}·{args.loss})"
        print(f"{what} from {len(args.teacher)} teacher(s) in {result['steps']} steps "
              f"({result['train_seconds']:.0f}s); run folder: {args.out}")
        print(text_table(summary_rows(result["test"]), ["test metric", "single logit", "all logits"]))
    return 0
