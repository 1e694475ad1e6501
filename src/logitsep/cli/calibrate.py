"""``logitsep calibrate RUN``: per-class and global thresholds on a split, written to RUN/thresholds.json.

Above ``BLOCKS_ABOVE`` scores (``n·k`` > 2^26), or with ``--block-size``, the scores are read a block of classes at a
time (:func:`logitsep.thresholds.calibrate_blocked`: the same thresholds, to the bit).
"""

from __future__ import annotations

import argparse

from ..core.tables import text_table
from .common import add_block_size, add_dataset, dataset_of, print_json

HELP = "calibrate per-class and global thresholds on the validation split"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by logitsep train")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--precision", type=float, help="target precision (default 0.99)")
    target.add_argument("--recall", type=float, help="target recall instead of a precision")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--device", default="cpu")
    add_block_size(p)
    add_dataset(p, required=False, help="calibrate on this dataset's --split (default: the run's own, or --data)")


def run(args: argparse.Namespace) -> int:
    from ..classifier import calibrate_run
    from ..data import load_dataset

    dataset = dataset_of(args)
    data = load_dataset(dataset) if dataset is not None else None
    th = calibrate_run(args.run, data=data, precision=args.precision, recall=args.recall, split=args.split,
                       device=args.device, block_size=args.block_size)
    if args.json:
        print_json(th.to_dict())
    else:
        print(format_thresholds(th))
        print(f"wrote {args.run}/thresholds.json")
    return 0


def _num(value: object) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_thresholds(th: object) -> str:
    """A readable table of :class:`~logitsep.thresholds.Thresholds`."""
    stats = th.class_stats or [{} for _ in th.per_class]
    rows = [[c, st.get("name", c), st.get("positives", "-"), f"{t:.6g}", _num(st.get("precision")),
             _num(st.get("recall")), st.get("source", "-")]
            for c, (t, st) in enumerate(zip(th.per_class, stats, strict=True))]
    g = th.global_stats
    rows.append(["all", "(global)", g.get("positives", "-"), f"{th.global_threshold:.6g}", _num(g.get("precision")),
                 _num(g.get("recall")), g.get("source", "-")])
    t = th.target
    head = (f"thresholds for {t['metric']} >= {t['value']:g} on {t.get('examples', '?')} examples of the "
            f"{t.get('split', 'calibration')} split (accept when logit >= threshold)")
    lines = [head, text_table(rows, ["class", "name", "positives", "threshold", "precision", "recall", "source"])]
    if t.get("trained_on") == "train_full" and t.get("split") == "valid":
        lines.append("note: this run was trained on train+valid, so the validation scores are optimistic")
    return "\n".join(lines)
