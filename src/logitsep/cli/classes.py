"""``logitsep classes RUN [--remove NAME]``: the classes of a run, trained and enrolled."""

from __future__ import annotations

import argparse

from ..core.tables import text_table
from .common import print_json

HELP = "list a run's classes (which were enrolled); --remove an enrolled one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by logitsep train")
    p.add_argument("--remove", metavar="NAME", help="remove this enrolled class (name or id) first")


def run(args: argparse.Namespace) -> int:
    from ..classifier import class_list

    result = class_list(args.run, remove=args.remove)
    if args.json:
        print_json(result)
        return 0
    rows = [[c["id"], c["name"], "enrolled" if c["enrolled"] else "trained",
             "–" if c["threshold"] is None else f"{c['threshold']:.6g}",
             f"{c['rule']} ({c['examples']})" if c["enrolled"] else ""] for c in result["classes"]]
    print(text_table(rows, ["id", "name", "kind", "threshold", "rule (examples)"]))
    return 0
