"""``logitsep summarize DIR...``: table2 over seeds, mean ± sd of several ``reproduce table2`` runs."""

from __future__ import annotations

import argparse
import shlex

from ..core.keys import HEADERS, SLC_KEYS
from ..core.tables import text_table
from .common import print_json

HELP = "mean and spread over seeds of several `reproduce table2` runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders holding a table2.json (one setting, several seeds)")
    p.add_argument("--out", required=True, help="folder for table2_seeds.{json,csv,md,png}")


def run(args: argparse.Namespace) -> int:
    from ..experiments.seeds import write_summary

    command = " ".join(shlex.quote(p) for p in ["logitsep", "summarize", *args.dirs, "--out", args.out])
    result = write_summary(args.dirs, args.out, command)
    if args.json:
        print_json(result)
        return 0
    body = [[f"{r['loss']} ({r['scoring']})", len(r["seeds"]),
             *(f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in SLC_KEYS)] for r in result["methods"]]
    print(text_table(body, ["method", "seeds", *(HEADERS[k] for k in SLC_KEYS)]))
    comparison = result["comparison"]
    if comparison is not None:
        num, den = (f"{loss} {scoring}" for loss, scoring in (comparison["numerator"], comparison["denominator"]))
        print(f"{num} / {den}, ratio of mean 1 − metric: "
              + ", ".join(f"x{comparison[k]['ratio_of_means']:.2f}" for k in SLC_KEYS))
    print(f"wrote {args.out}/table2_seeds.{{json,csv,md,png}}")
    return 0
