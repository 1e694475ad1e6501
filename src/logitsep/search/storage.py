"""The on-disk embedding index: ``N × dim`` float32 vectors in a folder, memory-mapped, with durable appends.

A folder holds ``header.json`` (format, version, ``dim``, ``dtype``, ``count``, ``meta``) and ``vectors.f32``
(``count`` rows of ``dim`` little-endian float32). The header's ``count`` is the truth: an append writes its rows
after the committed ones and fsyncs them, then commits by atomically replacing the header (temporary file,
fsync, rename, folder fsync). Rows past ``count`` are the remains of an interrupted append: readers ignore them
and the next writable open truncates them, so a crash leaves only whole, committed items. A failure after the
rename (in the folder's fsync) keeps the committed rows: the rename was the commit.

Exact search takes the path measured fastest on this machine (:mod:`.paths`): the float16 screen (:mod:`.screen`)
or a float32 scan by numpy, torch or FAISS (:mod:`.scan`); every path returns the same answer (:mod:`.exact`).
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.files import atomic_write, fsync_dir
from . import paths
from .exact import RowNorms
from .scan import faiss_available, scan
from .screen import Screen
from .select import SearchResult, as_queries, limit, search_args, thresholds_of

FORMAT = "logitsep-embedding-index"
VERSION = 1
HEADER = "header.json"
DATA = "vectors.f32"
_DTYPE = np.dtype("<f4")
_WRITE_BYTES = 64 << 20  # bytes per write() call when appending


def as_rows(vectors: object, dim: int) -> np.ndarray:
    """Vectors to store: ``[n, dim]`` (or one ``[dim]``) finite floats → C-contiguous little-endian float32."""
    if isinstance(vectors, Tensor):
        if not vectors.is_floating_point():
            raise TypeError(f"vectors must be floating-point, got dtype {vectors.dtype}")
        vectors = vectors.detach().to("cpu", torch.float32).numpy()
    if not isinstance(vectors, np.ndarray):
        raise TypeError(f"vectors must be a torch.Tensor or a numpy array, got {type(vectors).__name__}")
    if vectors.dtype.kind != "f":
        raise TypeError(f"vectors must be floating-point, got dtype {vectors.dtype}")
    rows = vectors[None] if vectors.ndim == 1 else vectors
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"vectors must be [n, {dim}] (the index stores {dim}-dimensional vectors), "
                         f"got shape {vectors.shape}")
    with np.errstate(over="ignore"):
        rows = np.ascontiguousarray(rows, dtype=_DTYPE)
    if not np.isfinite(rows).all():
        raise ValueError("vectors contain NaN or infinite values (or values too large for float32)")
    return rows


def _write_header(folder: Path, header: dict[str, Any]) -> None:
    """Atomically replace ``folder/header.json``: temporary file, fsync, rename, fsync of the folder."""
    text = json.dumps(header, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(folder / HEADER, write)
    fsync_dir(folder)


def _read_header(folder: Path) -> dict[str, Any]:
    """The validated header of the index in ``folder``; FileNotFoundError / ValueError naming the file."""
    path = folder / HEADER
    if not folder.is_dir():
        raise FileNotFoundError(f"no embedding index at {folder}: not a folder")
    if not path.is_file():
        raise FileNotFoundError(f"no embedding index at {folder}: {HEADER} is missing")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"corrupt embedding index: {path} is empty")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt embedding index: {path} is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"corrupt embedding index: {path} is not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported index format version {header.get('version')!r} (this is {VERSION})")
    for key in ("dim", "count"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "dim" else 0):
            raise ValueError(f"corrupt embedding index: {path} has an invalid {key!r}: {value!r}")
    if header.get("dtype") != "float32":
        raise ValueError(f"{path}: unsupported dtype {header.get('dtype')!r} (only float32)")
    if not isinstance(header.get("meta", {}), dict):
        raise ValueError(f"corrupt embedding index: {path} has a 'meta' that is not an object")
    return header


class EmbeddingIndex:
    """``N × dim`` float32 vectors in a folder, memory-mapped, with durable appends and exact batched search.

    Make one with :meth:`create`, open one with :meth:`open`. Item ids are row numbers, ``0 .. len(index)-1``,
    in the order the rows were appended. One writer at a time (an exclusive ``flock`` on the data file); any
    number of readers, each of which sees a committed prefix and picks up new rows when it :meth:`refresh` es
    (:meth:`search` does so first).
    """

    def __init__(self, path: str | os.PathLike, writable: bool = False, screen: bool = True,
                 exact_path: str | None = None) -> None:
        """Use :meth:`open` (or :meth:`create`)."""
        self.path = Path(path)
        self.writable = bool(writable)
        self._fd: int | None = None
        self._screen: Screen | None = None
        self._use_screen = bool(screen)
        self.exact_path = paths.check_path(exact_path)
        if self.exact_path == "screen" and not self._use_screen:
            raise ValueError("exact_path='screen' needs screen=True")
        if self.exact_path == "faiss" and not faiss_available():
            raise ValueError("exact_path='faiss' needs FAISS (pip install 'logitsep[search]')")
        self._norms = RowNorms()
        self.last_path = ""  # the path that answered the last search (for reports and tests)
        self._header = _read_header(self.path)
        data_path = self.path / DATA
        if not data_path.is_file():
            raise FileNotFoundError(f"corrupt embedding index: {data_path} is missing")
        if self.writable:
            self._fd = os.open(data_path, os.O_RDWR)
            try:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                self._fd = None
                raise ValueError(f"{self.path} is already open for writing (one writer at a time)") from None
            except ImportError:  # no flock on this platform: single writer by convention
                pass
            self._header = _read_header(self.path)  # re-read under the lock
        try:
            self._check_data(self._header["count"])
        except BaseException:
            self.close()
            raise
        self._data = self._map(self._header["count"])

    # ---------------------------------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, path: str | os.PathLike, dim: int, meta: dict[str, Any] | None = None,
               screen: bool = True, exact_path: str | None = None) -> EmbeddingIndex:
        """A new, empty index of ``dim``-dimensional vectors at ``path`` (which must not exist, or be an empty
        folder), opened writable. ``meta``: JSON-serialisable facts kept in the header (e.g. the run it came from).
        The folder appears complete or not at all (built beside it, then renamed). ``screen``, ``exact_path``: as in
        :meth:`open`."""
        if isinstance(dim, bool) or not isinstance(dim, (numbers.Integral, np.integer)) or int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        path = Path(path)
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise ValueError(f"{path} already exists; an index is created in a new (or empty) folder")
        header = {"format": FORMAT, "version": VERSION, "dim": int(dim), "dtype": "float32", "count": 0,
                  "meta": json.loads(json.dumps(meta or {}))}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        tmp.mkdir(mode=0o777)  # the umask applies, as for any new folder
        try:
            with open(tmp / DATA, "wb") as f:
                os.fsync(f.fileno())
            _write_header(tmp, header)
            os.replace(tmp, path)  # replaces an empty folder, fails on a non-empty one
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path, writable=True, screen=screen, exact_path=exact_path)

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool = False, screen: bool = True,
             exact_path: str | None = None) -> EmbeddingIndex:
        """Open the index at ``path``. Read-only by default; ``writable=True`` takes the writer's lock and cuts
        off the uncommitted rows of an interrupted append. A missing header → FileNotFoundError; an empty,
        corrupt or truncated index → ValueError naming the file (nothing on disk is changed).

        ``exact_path``: how exact searches compute their scores: ``"auto"`` (the default, unless
        ``$LOGITSEP_EXACT_PATH`` says otherwise) measures the paths on the first searches and keeps the fastest on
        this machine (:mod:`~.paths`); ``"screen"`` (a float16 copy of the rows held in memory, half the bytes read,
        2 bytes per stored number, :class:`~.screen.Screen`), ``"numpy"``, ``"torch"`` or ``"faiss"`` (float32 scans
        of the memory map, :mod:`~.scan`) force one. Every path returns the same answer, bit for bit.
        ``screen=False`` leaves the float16 copy out of the choice (no extra memory)."""
        return cls(path, writable=writable, screen=screen, exact_path=exact_path)

    def close(self) -> None:
        """Drop the memory map and the writer's lock. Results already returned stay valid (they are copies)."""
        self._data = torch.empty(0, self.dim)
        self._screen = None
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"EmbeddingIndex({str(self.path)!r}, dim={self.dim}, count={len(self)}, writable={self.writable})"

    # ----------------------------------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (``d + 1`` for embeddings with the bias folded in)."""
        return int(self._header["dim"])

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` object of the header (a copy)."""
        return json.loads(json.dumps(self._header.get("meta", {})))

    @property
    def row_bytes(self) -> int:
        return 4 * self.dim

    def __len__(self) -> int:
        return int(self._header["count"])

    @property
    def vectors(self) -> Tensor:
        """The committed vectors, ``[len(self), dim]``, a float32 view of the memory map (do not modify it)."""
        return self._data

    # ------------------------------------------------------------------------------------------ internals

    def _check_data(self, count: int) -> None:
        """The data file must hold ``count`` rows; a longer one (an interrupted append) is cut back to ``count``
        when writable, left alone when read-only."""
        data_path = self.path / DATA
        size = os.stat(data_path).st_size
        need = count * self.row_bytes
        if size < need:
            raise ValueError(f"corrupt embedding index: {data_path} holds {size} bytes but {self.path / HEADER} "
                             f"records {count} vectors of {self.row_bytes} bytes ({need} bytes): truncated")
        if size > need and self._fd is not None:
            os.ftruncate(self._fd, need)
            os.fsync(self._fd)

    def _map(self, count: int) -> Tensor:
        if count == 0:
            return torch.empty(0, self.dim)
        array = np.memmap(self.path / DATA, dtype=_DTYPE, mode="r", shape=(count, self.dim))
        with warnings.catch_warnings():  # read-only memory map: torch warns that it cannot write to it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)

    # -------------------------------------------------------------------------------------------- writing

    def append(self, vectors: Tensor | np.ndarray) -> int:
        """Store ``vectors`` (``[n, dim]`` or one ``[dim]``, finite floats, converted to float32) after the
        existing rows; return the new total. Durable: the rows are written and fsynced, then the header's count
        is committed atomically; if anything fails before the commit the index keeps its old rows."""
        if self._fd is None:
            raise ValueError(f"{self.path} is open read-only; open it with writable=True to append")
        rows = as_rows(vectors, self.dim)
        if len(rows) == 0:
            return len(self)
        old, new = len(self), len(self) + len(rows)
        view = memoryview(rows).cast("B")
        offset = old * self.row_bytes
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:done + _WRITE_BYTES], offset + done)
            os.fsync(self._fd)
        except BaseException:
            self._cut(old)
            raise
        try:
            self._commit(new)
        except BaseException:
            try:  # the rename may have happened before the failure (e.g. in the folder's fsync)
                committed = _read_header(self.path)["count"] == new
            except (OSError, ValueError):
                committed = False
            if committed:
                self._header = {**self._header, "count": new}
                self._data = self._map(new)
            else:
                self._cut(old)
            raise
        self._data = self._map(new)
        return new

    def _cut(self, count: int) -> None:
        """Best effort: drop uncommitted rows after a failed append (readers ignore them anyway)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, count * self.row_bytes)

    def _commit(self, count: int) -> None:
        header = {**self._header, "count": int(count)}
        _write_header(self.path, header)
        self._header = header

    def row_norm_bound(self) -> float:
        """An upper bound on the norms of the committed rows (for the error bounds of the exact paths)."""
        return self._norms.extend(self._data)

    def refresh(self) -> int:
        """Re-read the header (another process may have appended) and map the new rows; return the number of
        items. The header is small (reading it takes microseconds) and is always read whole, never trusted from
        file timestamps, which are too coarse to see two appends in a row."""
        header = _read_header(self.path)
        if header["dim"] != self.dim:
            raise ValueError(f"{self.path / HEADER} changed its dimension from {self.dim} to {header['dim']}")
        if header["count"] != len(self):
            self._check_data(header["count"])
            self._data = self._map(header["count"])
        self._header = header
        return len(self)

    # ------------------------------------------------------------------------------------------- searching

    def search(self, queries: Tensor | np.ndarray, threshold: object = None, top_k: int | None = None, *,
               chunk_rows: int | None = None) -> SearchResult | list[SearchResult]:
        """Exact inner-product search: for each query ``x``, the items ``i`` with ``v_i·x ≥ threshold``, or the
        ``top_k`` items of largest ``v_i·x`` (with both: the top-k among those over the threshold), sorted by
        score descending, ties by id.

        ``queries``: one ``[dim]`` vector (returns one :class:`SearchResult`) or ``[q, dim]`` (returns a list of
        ``q``). ``threshold``: a number, or one per query. All queries are answered in a single pass over the
        vectors (chunks of ``chunk_rows`` rows; memory stays bounded), so a batch of classes costs about one
        scan. New rows appended by another process are picked up first (:meth:`refresh`).
        """
        q, single = as_queries(queries, self.dim)
        thresholds, k = search_args(threshold, top_k, q.shape[0])
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if self._fd is None:
            self.refresh()
        if chunk_rows is not None:
            results = scan(self._data, q, thresholds, k, chunk_rows, max_norm=self.row_norm_bound())
        else:
            path = self._path_for(q, thresholds, k)
            results = self._search_with(path, q, thresholds, k)
            self.last_path = path
        return results[0] if single else results

    def _single_paths(self) -> tuple[str, ...]:
        usable = self._use_screen and (self._screen is None or self._screen.usable)
        return tuple(p for p in paths.SINGLE_PATHS
                     if (p != "screen" or usable) and (p != "faiss" or faiss_available()))

    def _path_for(self, q: Tensor, thresholds: Tensor | None, k: int | None) -> str:
        """The path of this search: forced by ``exact_path``, or measured (:func:`.paths.choose`)."""
        n, m = len(self), q.shape[0]
        if m == 1:
            return self._single(q, thresholds, k)
        if self.exact_path in paths.BATCH_PATHS:
            return self.exact_path
        if self.exact_path == "screen":
            return "loop"
        if n < paths.MIN_MEASURED_ROWS:
            return "numpy"
        kernels = tuple(p for p in self._single_paths() if p in paths.BATCH_PATHS) + ("loop",)
        runners = {p: (lambda p=p: self._search_with(p, q, thresholds, k)) for p in kernels}
        return paths.choose(paths.key_of("batch", n, self.dim, m, kernels), runners).path

    def _single(self, q: Tensor, thresholds: Tensor | None, k: int | None) -> str:
        """The one-query path (measured on this one-query search when not yet chosen)."""
        if self.exact_path != "auto":
            return self.exact_path
        if len(self) < paths.MIN_MEASURED_ROWS:
            return "numpy"
        candidates = self._single_paths()
        runners = {p: (lambda p=p: self._search_with(p, q, thresholds, k)) for p in candidates}
        choice = paths.choose(paths.key_of("single", len(self), self.dim, 1, candidates), runners)
        if choice.path != "screen":
            self._screen = None  # measured and not chosen: its float16 copy is not kept
        return choice.path

    def _search_with(self, path: str, q: Tensor, thresholds: Tensor | None, k: int | None) -> list[SearchResult]:
        """Every query of ``q`` answered by ``path`` (the answer does not depend on it)."""
        norm = self.row_norm_bound()
        if path in ("numpy", "torch", "faiss"):
            return scan(self._data, q, thresholds, k, kernel=path, max_norm=norm)
        if path == "loop":
            one = self._single(q[:1], thresholds_of(thresholds, 0), k)
            return [self._search_with(one, q[j:j + 1], thresholds_of(thresholds, j), k)[0] for j in range(q.shape[0])]
        if self._screen is None:
            self._screen = Screen(self.dim)
        self._screen.extend(self._data)
        results = []
        for j in range(q.shape[0]):
            found = self._screen.search(self._data, q[j], limit(thresholds, j), k, norm)
            results.append(found if found is not None else  # the screen steps aside: a float32 scan answers
                           scan(self._data, q[j:j + 1], thresholds_of(thresholds, j), k, max_norm=norm)[0])
        return results

    def approximate(self, kind: str = "ivf", **params: Any) -> Any:
        """A FAISS index over the current vectors for sub-linear search
        (:class:`~logitsep.search.approximate.ApproximateIndex`; needs the ``[search]`` extra)."""
        from .approximate import ApproximateIndex

        return ApproximateIndex(self, kind=kind, **params)
