"""What the commands share: JSON output, argument parsers of lists, and the options several commands take."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ..core.files import json_default
from ..core.keys import ROW_KEYS
from ..data import DATASETS, data_path, dataset_name

MODEL_HELP = ("mlp or cnn (the paper's networks), resnet_small (small images), linear (a head on feature "
              "vectors), or a backbone as torchvision:NAME or timm:NAME (checked when the model is built)")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=json_default))


def loss_names() -> list[str]:
    from ..losses import LOSSES

    return sorted(LOSSES)


def loss_list(parser: argparse.ArgumentParser, text: str | None, default: Sequence[str]) -> list[str]:
    """``--losses a,b,c``: registry names (a usage error names the unknown ones)."""
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in loss_names()]
    if unknown:
        parser.error(f"unknown loss {', '.join(map(repr, unknown))}; valid names: {', '.join(loss_names())}")
    return names


def float_list(parser: argparse.ArgumentParser, text: str) -> list[float]:
    """``--lrs 0.1,0.01``: positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        parser.error(f"--lrs must be positive numbers, got {text!r}")
    return values


def loss_kwargs(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    """``--loss-arg key=value`` (repeatable): values parsed as JSON when they are JSON, else kept as strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--loss-arg takes key=value, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def add_dataset(parser: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    """``--dataset NAME`` (a built-in dataset) or ``--data PATH`` (a folder of your own: arrays or images)."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--dataset", type=_dataset_arg, metavar="NAME",
                       help=(help + "; " if help else "") + "one of " + ", ".join(sorted(DATASETS))
                       + " (glyphs-K: the first K printed characters)")
    group.add_argument("--data", metavar="PATH",
                       help="your own data instead of --dataset: a folder of train_x.npy/train_y.npy "
                            "(valid_*, test_*, classes.txt optional) or of class folders of images")


def _dataset_arg(text: str) -> str:
    try:
        return dataset_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def dataset_of(args: argparse.Namespace) -> str | None:
    """The dataset a command was given: the name of ``--dataset``, or the absolute path of ``--data``."""
    return data_path(args.data) if args.data is not None else args.dataset


def add_threads(parser: argparse.ArgumentParser, default: int = 0) -> None:
    """``--threads``: torch CPU threads for the commands that train."""
    parser.add_argument("--threads", type=int, default=default,
                        help=f"torch CPU threads (default {default}; 0: torch's choice; 1 is often faster for "
                             "the small paper models on a busy machine)")


def apply_threads(args: argparse.Namespace) -> None:
    threads = args.threads
    if threads < 0:
        args.parser.error(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_block_size(parser: argparse.ArgumentParser) -> None:
    """``--block-size N``: compute in blocks of N classes (automatic above ``BLOCKS_ABOVE`` scores)."""
    from ..core.blocks import BLOCKS_ABOVE

    parser.add_argument("--block-size", type=_positive_int, metavar="N",
                        help=f"read the scores N classes at a time instead of all [n, k] at once (the same results); "
                             f"done anyway, about 4M scores per block, above n*k = {BLOCKS_ABOVE:,} scores")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of classes, got {text!r}")
    return value


def use_blocks(args: argparse.Namespace, n: int, k: int) -> bool:
    """Whether a command computes in blocks: ``--block-size`` given, or ``n·k`` above ``BLOCKS_ABOVE``."""
    from ..core.blocks import use_blocks as blocks_rule

    return blocks_rule(n, k, args.block_size)


def summary_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """``metric, single logit, all logits`` rows of a run's metrics (``train``, ``evaluate``)."""
    keys = [ROW_KEYS[-1], *ROW_KEYS[:-1]]  # accuracy first
    return [[k, metrics[k], metrics.get("all_logits", {}).get(k)] for k in keys]
