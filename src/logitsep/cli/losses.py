"""``logitsep losses``: the loss registry with PoLS alignment."""

from __future__ import annotations

import argparse

from ..core.tables import text_table
from .common import print_json

HELP = "list the registered losses with their PoLS alignment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from ..losses import LOSS_SPECS

    rows = [{"name": n, "pols_aligned": spec.pols_aligned, "class": spec.module.__name__,
             "inputs": spec.inputs, "summary": (spec.module.__doc__ or "").strip().splitlines()[0]}
            for n, spec in sorted(LOSS_SPECS.items())]
    if args.json:
        print_json(rows)
    else:
        word = {True: "yes", False: "no", None: "not established"}
        print(text_table([[r["name"], word[r["pols_aligned"]], r["class"]] for r in rows],
                         ["name", "PoLS-aligned", "module"]))
    return 0
