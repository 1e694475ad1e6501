"""MNIST as an arrays folder of uint8 images ``[n, 28, 28]`` (the same train / valid / test split as ``mnist``), for
convolutional models (``--data OUT --model resnet_small``): the ``mnist`` dataset itself gives flat ``[784]`` inputs
for the paper's MLP.

    .venv/bin/python tools/mnist_images.py /work/data/mnist-images
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from logitsep.data import load_dataset
from logitsep.data.arrays import write_arrays


def main(out: str) -> int:
    data = load_dataset("mnist")
    splits = {}
    for split in ("train", "valid", "test"):
        x, y = data.split(split)
        pixels = np.clip(np.rint(np.asarray(x) * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        splits[split] = (pixels, np.asarray(y).astype(np.int64))
    write_arrays(Path(out), splits, data.class_names)
    print(f"wrote {out}: " + ", ".join(f"{k} {len(v[1])}" for k, v in splits.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
