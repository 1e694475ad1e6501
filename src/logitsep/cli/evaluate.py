"""``logitsep evaluate RUN``: SLC metrics of a trained run on a split of its dataset.

Above ``BLOCKS_ABOVE`` scores (``n·k`` > 2^26), or with ``--block-size``, the metrics are computed a block of classes
at a time from the embeddings (:func:`logitsep.train.evaluate_blocked`), never holding the ``[n, k]`` scores.
"""

from __future__ import annotations

import argparse

from ..core.tables import text_table
from .common import add_block_size, add_dataset, dataset_of, print_json, summary_rows, use_blocks

HELP = "SLC metrics of a trained run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--device", default="cpu")
    add_block_size(p)
    add_dataset(p, required=False, help="default: the run's dataset (or --data)")


def run(args: argparse.Namespace) -> int:
    from ..data import load_dataset
    from ..runs import check_fits, load_run
    from ..train import evaluate_model, softmax_scale

    loaded = load_run(args.dir, device=args.device, enrolled=False)  # the dataset has the trained classes only
    config = loaded.config
    data = load_dataset(dataset_of(args) or config.dataset)
    check_fits(loaded.spec, data)
    x, y = data.split(args.split)
    if use_blocks(args, len(x), loaded.spec.num_classes):
        from ..train import evaluate_blocked

        metrics = evaluate_blocked(loaded.model, x, y, device=args.device, softmax_scale=softmax_scale(config),
                                   block_size=args.block_size)
    else:
        metrics = evaluate_model(loaded.model, x, y, device=args.device, softmax_scale=softmax_scale(config))
    if args.json:
        print_json({"dir": args.dir, "split": args.split, "step": loaded.step, "loss": config.loss, **metrics})
    else:
        print(f"{args.dir}: {config.loss} on {data.name}, step {loaded.step}, split {args.split}")
        print(text_table(summary_rows(metrics), [f"{args.split} metric", "single logit", "all logits"]))
    return 0
