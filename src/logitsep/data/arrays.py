"""Your own data as arrays: a folder of ``.npy`` files, memory-mapped and read a batch at a time.

    PATH/train_x.npy   [n, d] float32/float16 features (embeddings from any model), or uint8 images
                       [n, H, W] (grayscale) / [n, C, H, W] (C = 1 or 3)
    PATH/train_y.npy   [n] integer class indices, or [n, k] 0/1 (bool or integer) for multi-label data
    PATH/valid_x.npy, valid_y.npy, test_x.npy, test_y.npy    optional; a missing pair is carved from train
    PATH/classes.txt   optional: line i is the name of class i (UTF-8; default "0" … "k-1")

Images become inputs ``pixel/256`` of shape ``[C, H, W]`` (``[1, H, W]`` for ``[n, H, W]``); features are used as
they are (float16 read as float32). Without a validation or test pair, 10% of the training rows each (at least one)
are set aside by a permutation seeded with ``seed``, the same every time. k is the length of ``classes.txt``, else
the largest label + 1 (the width of a multi-label matrix).

Everything is checked once when the folder is loaded, and every problem is an error naming the file: a file that
is not a ``.npy`` array (nothing is unpickled), a wrong dtype or rank, inputs and labels of different lengths,
splits whose inputs differ in shape, NaN or infinite features, labels out of range or not 0/1, a ``classes.txt``
of the wrong length, with empty or repeated names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.files import fsync_dir, umask
from .splits import DatasetNotFoundError, Rows, Splits, carve_validation

PIXEL_SCALE = 1.0 / 256.0
SPLITS = ("train", "valid", "test")
CHUNK_BYTES = 64 << 20  # rows checked per step of a pass over a memory map


def write_arrays(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str],
                 extra: dict[str, object] | None = None) -> Path:
    """Write an arrays folder at ``out`` (``{split}_x.npy``, ``{split}_y.npy``, ``classes.txt`` and ``extra``
    JSON files): built in a temporary folder beside it, every file fsynced, then renamed into place, so ``out``
    appears complete or not at all. When another process renamed its own build first, that one is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a cache is read like any other folder
    try:
        files: dict[str, bytes | np.ndarray] = {f"{s}_{p}.npy": a for s, (x, y) in splits.items()
                                                 for p, a in (("x", x), ("y", y))}
        files["classes.txt"] = "".join(f"{n}\n" for n in class_names).encode("utf-8")
        files.update({name: (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
                      for name, obj in (extra or {}).items()})
        for name, content in files.items():
            with open(tmp / name, "wb") as f:
                if isinstance(content, np.ndarray):
                    np.save(f, content, allow_pickle=False)
                else:
                    f.write(content)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process built it meanwhile
            if not (out / "train_x.npy").is_file():
                raise
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_arrays_folder(folder: Path) -> bool:
    return (folder / "train_x.npy").is_file() or (folder / "train_y.npy").is_file()


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from err


def _blocks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows in memory)`` of a memory map, about ``CHUNK_BYTES`` at a time: one pass, bounded memory."""
    size = max(1, CHUNK_BYTES // max(1, int(np.prod(array.shape[1:])) * array.itemsize))
    for start in range(0, len(array), size):
        yield start, np.asarray(array[start:start + size])


def _inputs(path: Path) -> tuple[np.ndarray, tuple[int, ...], str]:
    """The memory map of an ``*_x.npy``, the model's input shape, and ``"image"`` or ``"features"``."""
    x = _open(path)
    if x.ndim == 2 and x.dtype in (np.float32, np.float16):
        for start, block in _blocks(x):
            bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
            if bad.size:
                raise ValueError(f"{path}: row {start + int(bad[0])} holds NaN or infinite features")
        return x, (int(x.shape[1]),), "features"
    if x.dtype == np.uint8 and x.ndim == 3:
        return x, (1, int(x.shape[1]), int(x.shape[2])), "image"
    if x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] in (1, 3):
        return x, tuple(int(s) for s in x.shape[1:]), "image"
    raise ValueError(f"{path}: must be [n, d] float32/float16 features, or uint8 images [n, H, W] or [n, C, H, W] "
                     f"with C = 1 or 3; got dtype {x.dtype} and shape {tuple(x.shape)}")


def _labels(path: Path, n: int, x_path: Path) -> np.ndarray:
    """The labels of an ``*_y.npy`` with ``n`` rows: int64 ``[n]`` in memory, or a ``[n, k]`` memory map."""
    y = _open(path)
    if len(y) != n:
        raise ValueError(f"{path} has {len(y)} labels but {x_path.name} has {n} rows: they must match one to one")
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: class indices must be integers, got dtype {y.dtype}")
        y = np.asarray(y).astype(np.int64)
        if n and y.min() < 0:
            raise ValueError(f"{path}: labels must be class indices >= 0, found {int(y.min())} "
                             f"(row {int(np.argmin(y))})")
        return y
    if y.ndim == 2 and (y.dtype == np.bool_ or np.issubdtype(y.dtype, np.integer)):
        for _, block in _blocks(y):
            if not ((block == 0) | (block == 1)).all():
                raise ValueError(f"{path}: a multi-label matrix must hold only 0 and 1")
        return y
    raise ValueError(f"{path}: labels must be [n] integer class indices or an [n, k] 0/1 matrix, got dtype "
                     f"{y.dtype} and shape {tuple(y.shape)}")


def _class_names(folder: Path, k_seen: int, multilabel: bool) -> list[str] | None:
    path = folder / "classes.txt"
    if not path.is_file():
        return None
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    while names and not names[-1].strip():  # a final newline or trailing blank lines
        names.pop()
    names = [n.strip() for n in names]
    if any(not n for n in names):
        raise ValueError(f"{path}: line {names.index('') + 1} is empty; line i must name class i")
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)  # not names.count: O(k²) at k = 10⁵
    if repeated:
        raise ValueError(f"{path}: class names must be unique, repeated: {', '.join(repeated[:10])}")
    if (multilabel and len(names) != k_seen) or len(names) < k_seen:
        what = f"the labels have {k_seen} columns" if multilabel else f"the labels go up to class {k_seen - 1}"
        raise ValueError(f"{path} names {len(names)} classes but {what}: it must have one line per class")
    return names


def load_arrays(folder: str | Path, seed: int = 0, name: str | None = None) -> Splits:
    """Load an arrays folder (see the module docstring) as :class:`~.splits.Splits` of :class:`~.splits.Rows`."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no data folder {folder}")
    for part in ("x", "y"):
        if not (folder / f"train_{part}.npy").is_file():
            raise DatasetNotFoundError(f"{folder} has no train_{part}.npy: an arrays folder needs train_x.npy and "
                                       "train_y.npy (valid_*, test_* and classes.txt are optional)")
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    row_shape, kind = None, None
    for split in SPLITS:
        xp, yp = folder / f"{split}_x.npy", folder / f"{split}_y.npy"
        if not xp.is_file() and not yp.is_file():
            continue
        if not (xp.is_file() and yp.is_file()):
            missing = yp if xp.is_file() else xp
            raise ValueError(f"{folder}: {missing.name} is missing ({split} inputs and labels come in pairs)")
        x, shape, what = _inputs(xp)
        if row_shape is not None and (shape, what, x.dtype) != (row_shape, kind, found["train"][0].dtype):
            raise ValueError(f"{xp}: inputs of shape {list(shape)} ({x.dtype}) but train_x.npy has "
                             f"{list(row_shape)} ({found['train'][0].dtype}): every split must match")
        row_shape, kind = (shape, what) if row_shape is None else (row_shape, kind)
        found[split] = (x, _labels(yp, len(x), xp))
    multilabel = found["train"][1].ndim == 2
    if any((y.ndim == 2) != multilabel for _, y in found.values()):
        raise ValueError(f"{folder}: every split's labels must be class indices, or every split's a 0/1 matrix")
    if multilabel:
        widths = {y.shape[1] for _, y in found.values()}
        if len(widths) > 1:
            raise ValueError(f"{folder}: multi-label matrices of different widths {sorted(widths)}")
        k_seen = widths.pop()
    else:
        k_seen = 1 + max(int(y.max()) if len(y) else -1 for _, y in found.values())
    names = _class_names(folder, k_seen, multilabel)
    k = len(names) if names is not None else k_seen
    if k < 2:
        raise ValueError(f"{folder}: {k} class found; a classifier needs at least 2")
    parts = _carve(found, seed)
    scale = PIXEL_SCALE if kind == "image" else None

    def rows(split: str) -> tuple[Rows, Rows | torch.Tensor]:
        (x, y), index = parts[split]
        inputs = Rows([(x, index)], row_shape, scale)
        if multilabel:
            return inputs, Rows([(y, index)], (k,), as_float=False)
        return inputs, torch.from_numpy(y if index is None else y[index])

    (trx, try_), (vax, vay), (tex, tey) = (rows(s) for s in SPLITS)
    return Splits(name or str(folder.resolve()), trx, try_, vax, vay, tex, tey, k, names or [], kind)


def _carve(found: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> dict[str, tuple[tuple, np.ndarray | None]]:
    """Each split as ``((x, y), row index or None)``; missing validation / test rows carved from train."""
    train = found["train"]
    n = len(train[0])
    missing = [s for s in ("valid", "test") if s not in found]
    need = max(1, n // 10)
    if missing and n < need * len(missing) + 1:
        raise ValueError(f"train_x.npy has {n} rows: too few to set aside {', '.join(missing)} rows from it")
    keep = np.arange(n)
    out: dict[str, tuple[tuple, np.ndarray | None]] = {}
    for i, split in enumerate(missing):
        kept, carved = carve_validation(len(keep), need, seed + i)
        out[split] = (train, keep[carved])
        keep = keep[kept]
    out["train"] = (train, None if len(keep) == n else keep)
    for split in ("valid", "test"):
        if split not in out:
            out[split] = (found[split], None)
    return out
