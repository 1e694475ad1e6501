"""What every dataset loader returns: :class:`Splits` (train / validation / test), whose inputs are either tensors
in memory or :class:`Rows`, read from memory-mapped arrays a batch at a time (never loaded whole)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not on this machine; the message says how to get them."""


class Rows:
    """Rows of on-disk arrays (memory maps), read only when asked for: model inputs (float32, ``pixel · scale`` for
    uint8 images) or labels (``as_float=False``: the stored integers or booleans).

    It is indexed like a tensor along its first dimension (``rows[a:b]``, ``rows[index_tensor]``,
    ``rows.index_select(0, idx)``) and returns tensors of those rows only, so a training loop reads one batch from
    disk per step. ``len``, ``shape``, ``to(device)`` (a no-op: the rows stay on disk, batches move) and
    ``numpy()`` / ``np.asarray(rows)`` (everything, in memory: for labels and small splits) complete what the rest
    of logitsep uses of a tensor. A ``Rows`` may chain several arrays, each with an optional index of its rows
    (validation sets carved from a training file, train + valid).
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray | None]], row_shape: tuple[int, ...],
                 scale: float | None = None, as_float: bool = True) -> None:
        self.parts = [(array, None if rows is None else np.asarray(rows, dtype=np.int64)) for array, rows in parts]
        self.row_shape = tuple(int(s) for s in row_shape)
        self.scale, self.as_float = scale, as_float
        self._ends = np.cumsum([len(a) if r is None else len(r) for a, r in self.parts])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> Rows:
        return self

    def take(self, index: np.ndarray) -> Tensor:
        """The rows at ``index`` (int64 positions), as a tensor."""
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        part = np.searchsorted(self._ends, index, side="right")
        out = None
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            local = index[sel] - (self._ends[p - 1] if p else 0)
            array, rows = self.parts[p]
            src = local if rows is None else rows[local]
            order = np.argsort(src, kind="stable")  # a memory map reads fastest in order
            raw = np.empty((len(src), *array.shape[1:]), dtype=array.dtype)
            raw[order] = array[src[order]]
            if out is None:
                out = np.empty((len(index), *array.shape[1:]), dtype=array.dtype)
            out[sel] = raw
        if out is None:
            out = np.empty((0, *self.parts[0][0].shape[1:]), dtype=self.parts[0][0].dtype)
        t = torch.from_numpy(out)
        if self.as_float:
            t = t.float() * self.scale if self.scale is not None else t.float()
        return t.reshape(len(index), *self.row_shape)

    def __getitem__(self, key: object) -> Tensor:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):  # one row, as a tensor would give it
            return self.take(np.array([key if key >= 0 else len(self) + key]))[0]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        if isinstance(key, Tensor):
            key = key.detach().cpu().numpy()
        return self.take(np.asarray(key))

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("Rows are selected along the first dimension only")
        return self[index]

    def numpy(self) -> np.ndarray:
        """Every row, in memory."""
        return self.take(np.arange(len(self))).numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def concat(self, other: Rows) -> Rows:
        if (other.row_shape, other.scale, other.as_float) != (self.row_shape, self.scale, self.as_float):
            raise ValueError("cannot concatenate rows of different shapes or kinds")
        return Rows(self.parts + other.parts, self.row_shape, self.scale, self.as_float)

    def __repr__(self) -> str:
        return f"Rows(shape={self.shape}, parts={len(self.parts)})"


def _cat(a: Tensor | Rows, b: Tensor | Rows) -> Tensor | Rows:
    if isinstance(a, Rows) and isinstance(b, Rows):
        return a.concat(b)
    if isinstance(a, Rows) or isinstance(b, Rows):
        return torch.cat([torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))])
    return torch.cat([a, b])


@dataclass
class Splits:
    """Train / validation / test inputs and labels of one dataset. ``train_full`` = train + validation.

    Inputs are float32 tensors, or :class:`Rows` read from disk a batch at a time; labels are int64 class indices
    ``[n]`` or multi-label 0/1 ``[n, k]`` (tensors or :class:`Rows`). ``class_names[c]`` is the readable name of
    class ``c`` (``"0"`` … ``"k-1"`` when the dataset has none); ``input_kind`` says whether the inputs are images
    (``pixel/256``) or feature vectors. ``name`` is the registry name, or the folder's path for your own data.
    """

    name: str
    train_x: Tensor | Rows
    train_y: Tensor | Rows
    valid_x: Tensor | Rows
    valid_y: Tensor | Rows
    test_x: Tensor | Rows
    test_y: Tensor | Rows
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    input_kind: str = "image"  # "image" (inputs = pixel/256) or "features" (vectors used as they are)

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def on_disk(self) -> bool:
        """Whether the inputs are read from disk (memory-mapped) rather than held in memory."""
        return isinstance(self.train_x, Rows)

    def split(self, name: str) -> tuple[Tensor | Rows, Tensor | Rows]:
        """``"train"``, ``"valid"``, ``"test"`` or ``"train_full"`` (train + valid)."""
        if name == "train_full":
            return _cat(self.train_x, self.valid_x), _cat(self.train_y, self.valid_y)
        if name not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {name!r}; valid splits: train, valid, test, train_full")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def make_splits(name: str, arrays: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
                class_names: Sequence[str] | None = None, input_kind: str = "image") -> Splits:
    """Splits held in memory from three ``(x, y)`` pairs of arrays (float32 inputs, int64 labels)."""
    tensors = [(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)) for x, y in arrays]
    (trx, try_), (vax, vay), (tex, tey) = tensors
    return Splits(name, trx, try_, vax, vay, tex, tey, num_classes, list(class_names or []), input_kind)


def data_root() -> Path:
    """Where dataset files are looked for by default (and built datasets cached): ``$LOGITSEP_DATA``, else
    ``~/.cache/logitsep/data``."""
    return Path(os.environ.get("LOGITSEP_DATA") or "~/.cache/logitsep/data").expanduser()


def carve_validation(n: int, valid_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, valid) index arrays, both sorted: valid = the first ``valid_size`` entries
    of ``np.random.default_rng(seed).permutation(n)``. The same ``(n, valid_size, seed)`` always gives the same split.
    """
    if isinstance(valid_size, bool) or not isinstance(valid_size, (int, np.integer)) or not 0 < valid_size < n:
        raise ValueError(f"valid_size must be an integer in [1, {n - 1}] ({n} training examples), got {valid_size!r}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[valid_size:]), np.sort(order[:valid_size])
