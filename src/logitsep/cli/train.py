"""``logitsep train``: train one model; checkpoint, log.csv, metrics.json, model.json and thresholds.json in --out.

Data-parallel: ``torchrun --nproc-per-node N -m logitsep train ...``.
"""

from __future__ import annotations

import argparse

from ..core.tables import text_table
from .common import (
    MODEL_HELP,
    add_dataset,
    add_threads,
    apply_threads,
    dataset_of,
    loss_kwargs,
    loss_names,
    print_json,
    summary_rows,
)

HELP = "train one model and write a checkpoint and metrics.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset(p)
    p.add_argument("--model", default="mlp", help=MODEL_HELP)
    p.add_argument("--loss", required=True, choices=loss_names(), metavar="LOSS",
                   help="one of: " + ", ".join(loss_names()))
    p.add_argument("--loss-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of the loss, e.g. --loss-arg alpha=0.1 (repeatable)")
    p.add_argument("--sampled", type=int, default=0, metavar="N",
                   help="train with the loss's sampled form (bce, nce, batch_ce): score the batch's classes plus N "
                        "drawn ones, update only those head rows; a step's cost does not grow with the number of "
                        "classes (default 0: exact, every logit)")
    p.add_argument("--shard-head", action="store_true",
                   help="under torchrun: split the head's rows over the processes (for heads too large for one "
                        "device; ce, self_norm, batch_ce, bce, exact nce); the run folder is that of one process")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-split", default="train", choices=["train", "train_full"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD heavy-ball momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning rate: cosine decay from --lr to 0 over --steps (default), or constant")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="linear warm-up: the rate grows from lr/N to the schedule's over the first N steps "
                        "(default 0: none)")
    p.add_argument("--out", required=True, help="run folder (checkpoint, log.csv, metrics.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (same settings; --steps may grow)")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=50, metavar="N", help="a row of --out/log.csv every N steps")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to --out/tensorboard (needs the tensorboard package)")
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    from ..distributed import rank
    from ..train import TrainConfig, train

    apply_threads(args)
    config = TrainConfig(dataset=dataset_of(args), model=args.model, loss=args.loss, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, device=args.device,
                         loss_kwargs=loss_kwargs(args.parser, args.loss_arg), train_split=args.train_split,
                         momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                         warmup=args.warmup, sampled=args.sampled, shard_head=args.shard_head)
    _, result = train(config, out=args.out, resume=args.resume, eval_splits=("valid", "test"),
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, tensorboard=args.tensorboard)
    if rank() != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print_json(result)
    else:
        print(f"trained {config.loss} on {config.dataset} for {config.steps} steps "
              f"({result['train_seconds']:.0f}s); run folder: {args.out}")
        print(text_table(summary_rows(result["test"]), ["test metric", "single logit", "all logits"]))
    return 0
