"""Datasets: the built-in ones by name (:mod:`.builtin`), your own by folder (:mod:`.arrays`, :mod:`.folders`),
all as :class:`Splits`.

``load_dataset(name)`` takes a registry name (``DATASETS``; ``DATASET_ALIASES`` are other spellings) or the path of
a folder of your own (``--data PATH`` on the command line): an arrays folder (``train_x.npy``, ``train_y.npy``,
...) or an image folder (``PATH/<class name>/*.png``). A path is anything with a ``/`` (``./mydata``) or a ``~``;
no registry name has one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arrays import is_arrays_folder, load_arrays
from .builtin import (
    FASHION_MNIST_CLASSES,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_svhn,
    load_synthetic,
    mnist_path,
    safe_unpickle,
)
from .folders import is_image_folder, load_image_folder
from .glyphs import load_glyphs
from .splits import DatasetNotFoundError, Rows, Splits, carve_validation, data_root, make_splits

DATASETS: dict[str, Callable[..., Splits]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "digits": load_digits,
    "synthetic": load_synthetic,
    "glyphs": load_glyphs,  # printed characters, k = 2,965; "glyphs-K" for the first K classes (K ≤ 6,355)
}
DATASET_ALIASES = {"fashion-mnist": "fashion_mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}
_GLYPHS_K = re.compile(r"glyphs-(\d+)")


def dataset_name(name: str) -> str:
    """The registry name of ``name`` (aliases such as ``"fashion-mnist"`` map to ``"fashion_mnist"``); also a
    ``glyphs-K`` name. ``ValueError`` listing the valid names for anything else (the command line's check)."""
    name = DATASET_ALIASES.get(name, name)
    if name not in DATASETS and not _GLYPHS_K.fullmatch(name):
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))} (and glyphs-K for "
                         "the first K printed characters), or the path of a folder of your own data")
    return name


def is_path(name: str) -> bool:
    """Whether ``name`` names a folder of your own rather than a registered dataset."""
    return "/" in name or name.startswith("~")


def data_path(path: str) -> str:
    """``--data PATH`` as the dataset name a run records: the folder's absolute path."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"--data {path}: no such folder")
    return str(folder.resolve())


def load_folder(path: str | Path, seed: int = 0) -> Splits:
    """Your own data: an arrays folder or an image folder (see the modules :mod:`.arrays`, :mod:`.folders`)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no data folder {folder}")
    if is_arrays_folder(folder):
        return load_arrays(folder, seed=seed)
    if is_image_folder(folder):
        return load_image_folder(folder, seed=seed)
    raise ValueError(f"{folder}: not a dataset folder: expected train_x.npy and train_y.npy (arrays), or class "
                     "folders of images (PATH/<class name>/*.png)")


def load_dataset(name: str, **kwargs: Any) -> Splits:
    """Load a dataset by registry name, or your own from a folder path (see the module docstring); keyword
    arguments go to its loader, e.g. ``load_dataset("cifar10", root="~/data", valid_size=5000, seed=1)``."""
    if is_path(name):
        return load_folder(name, **kwargs)
    key = dataset_name(name)
    glyphs = _GLYPHS_K.fullmatch(key)
    if glyphs:
        return load_glyphs(k=int(glyphs.group(1)), name=key, **kwargs)
    return DATASETS[key](**kwargs)


__all__ = ["DATASETS", "DATASET_ALIASES", "FASHION_MNIST_CLASSES", "DatasetNotFoundError", "Rows", "Splits",
           "carve_validation", "data_path", "data_root", "dataset_name", "is_path", "load_arrays", "load_cifar10",
           "load_cifar100", "load_dataset", "load_digits", "load_fashion_mnist", "load_folder", "load_glyphs",
           "load_image_folder", "load_mnist", "load_svhn", "load_synthetic", "make_splits", "mnist_path",
           "safe_unpickle"]
