"""``logitsep enroll RUN --name N --input FILE|DIR``: add a class to a trained run from a few images."""

from __future__ import annotations

import argparse

from .common import print_json

HELP = "add a class to a trained run from a few images (its threshold: the run's global one)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..enrollment import DEFAULT_RULE, RULES

    p.add_argument("run", help="run folder written by logitsep train (calibrated)")
    p.add_argument("--name", required=True, help="the new class's name")
    p.add_argument("--input", required=True, metavar="FILE|DIR",
                   help="a .npy array of images / inputs, a .png, or a folder of them")
    p.add_argument("--rule", choices=RULES, default=DEFAULT_RULE,
                   help=f"how the new row is written (default {DEFAULT_RULE}; see logitsep.enrollment)")
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from ..classifier import enroll_run

    result = enroll_run(args.run, args.name, args.input, rule=args.rule, device=args.device)
    if args.json:
        print_json(result)
    else:
        print(f"enrolled {result['name']!r} as class {result['class']} of {result['run']} from {result['examples']} "
              f"examples ({result['rule']}); threshold {result['threshold']:.6g} (the global one)")
    return 0
