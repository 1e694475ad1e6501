"""The ``logitsep`` command: one module per command, each with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Every command prints a readable table, or JSON with ``--json``.

    logitsep losses                      the loss registry with PoLS alignment
    logitsep train ...                   train one model, checkpoint + log.csv + metrics.json in --out
                                         (data-parallel: torchrun --nproc-per-node N -m logitsep train ...)
    logitsep evaluate DIR                SLC metrics of a trained run
    logitsep calibrate RUN [--precision P | --recall R]   per-class + global thresholds -> RUN/thresholds.json
    logitsep query RUN --class C --input FILE   one class's logit for images (.npy/.png): score, match
    logitsep enroll RUN --name N --input FILE|DIR   add a class from a few images
    logitsep classes RUN [--remove NAME]  the run's classes, trained and enrolled
    logitsep distill --teacher RUN ... --loss L --objective O --out DIR   a student from existing classifiers
    logitsep reproduce table1|table2|alignment|openset|enroll --dataset D --out DIR
    logitsep summarize DIR... --out DIR  table2 over seeds: mean ± sd of several reproduce runs
    logitsep index RUN --out DIR         embed a dataset split with a run's model: an index for class search
    logitsep bench NAME                  speed benchmarks (ratios to a baseline timed in the same run)
    logitsep demo                        MNIST: ce vs batch_ce, the paper-style table
    logitsep serve RUN | --demo          web service + live page: class search over ingested images
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from ..core.extras import MissingExtra
from ..data import DatasetNotFoundError
from . import (
    bench,
    calibrate,
    classes,
    demo,
    distill,
    enroll,
    evaluate,
    index,
    losses,
    query,
    reproduce,
    serve,
    summarize,
    train,
)

COMMANDS: dict[str, ModuleType] = {
    "losses": losses, "train": train, "evaluate": evaluate, "reproduce": reproduce, "summarize": summarize,
    "calibrate": calibrate, "query": query, "enroll": enroll, "classes": classes,
    "distill": distill, "index": index, "bench": bench, "demo": demo, "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logitsep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if module is not bench:  # each benchmark takes --json itself
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=module.run, parser=p)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DatasetNotFoundError, MissingExtra) as err:
        print(f"logitsep: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"logitsep: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged: the message names the step
        print(f"logitsep: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
