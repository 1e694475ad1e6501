"""``logitsep index RUN --out DIR``: embed a dataset split with a run's model, for class search."""

from __future__ import annotations

import argparse

from .common import add_dataset, dataset_of, print_json

HELP = "embed a dataset split with a run's model and store it for class search"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by logitsep train")
    add_dataset(p, required=False, help="default: the run's dataset (or --data)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test", "train_full"])
    p.add_argument("--out", required=True, help="index folder to create (header.json + vectors.f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    from ..search import build_index

    index = build_index(args.run, args.out, dataset=dataset_of(args), split=args.split, batch_size=args.batch_size,
                        device=args.device, progress=None if not args.json else False, overwrite=args.overwrite)
    info = {"out": args.out, "count": len(index), "dim": index.dim, **index.meta}
    info.pop("class_names", None)
    if args.json:
        print_json(info)
    else:
        print(f"indexed {len(index)} items of {info['dataset']}/{info['split']} ({index.dim}-dim vectors: "
              f"embedding + bias) with {args.run} into {args.out}")
    return 0
