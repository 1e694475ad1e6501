"""``logitsep query RUN --class C --input FILE``: one class's logit for each image, and the decision."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.tables import text_table
from .common import print_json

HELP = "is each image of class C? one logit per image against a threshold"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by logitsep train")
    p.add_argument("--class", dest="class_", required=True, metavar="C", help="class index or class name")
    p.add_argument("--input", required=True, metavar="FILE", help=".npy array of images / inputs, or a .png")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the calibrated one)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from ..classifier import query

    result = query(args.run, args.class_, args.input, threshold=args.threshold, device=args.device)
    if args.json:
        print_json(result)
    else:
        print(format_query(result))
    return 0


def format_query(result: dict[str, Any]) -> str:
    """A readable table of :func:`logitsep.classifier.query`'s result."""
    rows = [[r["index"], f"{r['score']:.6g}", f"{result['threshold']:.6g}", "yes" if r["match"] else "no"]
            for r in result["results"]]
    head = (f"class {result['class']} ({result['class_name']}) of {result['run']}, {result['threshold_source']} "
            f"threshold {result['threshold']:.6g}")
    return head + "\n" + text_table(rows, ["image", "score", "threshold", "match"])
