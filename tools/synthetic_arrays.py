"""Write a many-class arrays folder (``--data``) from logitsep's synthetic Gaussian clusters.

    python tools/synthetic_arrays.py --classes 100000 --dim 64 --per-class-train 5 --eval 10000 --out DIR

The structure is :func:`logitsep.data.builtin.load_synthetic`'s (``x = separation·μ_y + noise·ε``, class means random
unit vectors; its docstring gives nearest-mean accuracies). The validation and test splits hold one example of
every class; ``--eval N`` keeps the first N of each (they are shuffled, so a random subset of the classes): at
k = 10⁵ an evaluation over every class's example would score 10¹⁰ pairs. Class names are ``c00000`` ….
"""

from __future__ import annotations

import argparse
from pathlib import Path

from logitsep.data.arrays import write_arrays
from logitsep.data.builtin import load_synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--per-class-train", type=int, default=5)
    p.add_argument("--eval", type=int, default=10_000, help="examples kept in each of valid and test")
    p.add_argument("--separation", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    s = load_synthetic(args.classes, args.dim, args.per_class_train, 1, 1, separation=args.separation, seed=args.seed)
    width = len(str(args.classes - 1))
    splits = {"train": (s.train_x.numpy(), s.train_y.numpy()),
              "valid": (s.valid_x[:args.eval].numpy(), s.valid_y[:args.eval].numpy()),
              "test": (s.test_x[:args.eval].numpy(), s.test_y[:args.eval].numpy())}
    write_arrays(args.out, splits, [f"c{i:0{width}d}" for i in range(args.classes)],
                 extra={"synthetic.json": vars(args) | {"out": str(args.out)}})
    print(f"wrote {args.out}: {len(s.train_y)} / {len(splits['valid'][1])} / {len(splits['test'][1])} examples, "
          f"{args.classes} classes")


if __name__ == "__main__":
    main()
