"""The serving core without HTTP: a trained run and a serve folder; ingest, query, search, stream.

The serve folder (``--index DIR``) is an :class:`~logitsep.search.EmbeddingIndex` (``header.json``,
``vectors.f32``; one built by ``logitsep index`` works too) of item vectors ``[h, 1]``, whose inner product with a
class vector ``[W_c, b_c]`` is the item's logit for class ``c``; ``DIR/images/{id}.png`` holds the image of each
ingested item (re-encoded from the decoded pixels). Items of an index built from a dataset split (its header names
the dataset and split) are drawn from that split on request. The index header records the model's fingerprints,
so an index is never searched with another model's class vectors. The images of one ingest are kept together in
one pack file, ``DIR/images/{first id}.pngs`` (:func:`write_pack`), so that a request costs one data fsync
whatever its number of images; ``DIR/images/{id}.png`` files of older folders are still served.

Ingest is all-or-nothing: every image of a request is decoded and checked before anything is written; the
images are written (one pack: temporary file, fsync, rename, folder fsync) *before* the index append that
commits them, under one writer lock. An interrupted ingest leaves at most a pack starting past the end of the
index: it is never served and is removed on the next start, so a restart always sees a consistent index.
Searches need no lock: each one scans the committed rows the index maps when it starts (a whole-item prefix),
while appends go on.

Thresholds: every default threshold (``/search``, ``/query``, ``/stream``) is the run's calibrated **global**
threshold, one threshold for every class: the Principle of Logit Separation (Keren, Sabato & Schuller,
ICDM 2018) is what makes one threshold work for all classes. The per-class thresholds are listed by
``/classes`` for clients that prefer them.

The parts: request checks and image decoding (:mod:`.requests`), the per-class score cache (:mod:`.cache`),
live matches (:mod:`.stream`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import functools
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..classifier import SingleLogitClassifier
from ..core.files import fsync_dir
from ..core.images import encode_png, image_layout, inputs_from_images, pixels_from_inputs
from ..enrollment import check_name
from ..search import EmbeddingIndex
from ..search.select import select
from .cache import ScoreCache
from .idempotency import IdempotencyKeys, request_digest
from .requests import MAX_IMAGES, BadInput, check_class_id, check_threshold, check_top_k, decode_images
from .stream import Broadcast, Subscriber

__all__ = ["MAX_IMAGES", "BadInput", "Service", "dataset_images", "stored_images"]


PACK_MAGIC = b"LSPNGPK1"
PACK_SUFFIX = ".pngs"


def write_pack(path: Path, pngs: list[bytes], mode: int = 0o600) -> str:
    """Write the PNGs of one ingest as one file, durably and atomically: a temporary file (``mode``) in the same
    folder, written, fsynced, renamed over ``path`` (the caller fsyncs the folder). Layout: ``PACK_MAGIC``, the
    count ``n`` (uint32 LE), ``n + 1`` offsets (uint64 LE, from the end of the offsets), the PNGs end to end.
    Returns the SHA-256 of the file (:func:`pack_digest`)."""
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pngs])]).astype("<u8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (PACK_MAGIC + struct.pack("<I", len(pngs)) + offsets.tobytes(), *pngs):
                f.write(part)
                digest.update(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def pack_digest(path: str | os.PathLike) -> str | None:
    """The SHA-256 of a pack file, None when there is none."""
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()
    except FileNotFoundError:
        return None


def pack_count(path: str | os.PathLike) -> int | None:
    """The number of PNGs in a pack, or None for a file that is not one."""
    with open(path, "rb") as f:
        head = f.read(len(PACK_MAGIC) + 4)
    if len(head) < len(PACK_MAGIC) + 4 or not head.startswith(PACK_MAGIC):
        return None
    return struct.unpack("<I", head[len(PACK_MAGIC):])[0]


def read_pack(path: str | os.PathLike, index: int) -> bytes:
    """The ``index``-th PNG of a pack."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<I", f.read(len(PACK_MAGIC) + 4)[len(PACK_MAGIC):])
        f.seek(len(PACK_MAGIC) + 4 + 8 * index)
        begin, end = struct.unpack("<QQ", f.read(16))
        f.seek(len(PACK_MAGIC) + 4 + 8 * (n + 1) + begin)
        return f.read(end - begin)


def stored_images(folder: str | os.PathLike) -> list[int]:
    """The ids of the images stored in a serve folder's ``images/`` (packs and single files), sorted; committed
    or not (:meth:`Service._remove_orphans` removes those past the index on start)."""
    ids = []
    for entry in os.scandir(folder):
        stem, _, ext = entry.name.partition(".")
        if not stem.isdigit():
            continue
        if ext == "png":
            ids.append(int(stem))
        elif ext == "pngs" and (count := pack_count(entry.path)) is not None:
            ids.extend(range(int(stem), int(stem) + count))
    return sorted(ids)


def dataset_images(dataset: str, split: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """A dataset split as ``uint8`` images ``[n, H, W]`` (or ``[n, H, W, 3]``): pixel = round(256·x) clipped to
    255, the inverse of the loaders' ``x = pixel/256``."""
    from ..data import load_dataset

    x, _ = load_dataset(dataset).split(split)
    return pixels_from_inputs(x, input_shape)


def _owner_only(folder: Path) -> None:
    """Take the group's and others' permissions off a folder of this user's (no one else reaches what is in it)."""
    info = os.stat(folder)
    if info.st_uid == os.getuid() and info.st_mode & 0o077:
        os.chmod(folder, info.st_mode & 0o7700)


@contextlib.contextmanager
def _disk_full_is_507() -> Iterator[None]:
    """A full disk (``ENOSPC``, ``EDQUOT``) is the storage's state, not a server fault: 507 with a JSON error (the
    writes before the commit leave the index as it was)."""
    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BadInput(f"insufficient storage: {os.strerror(err.errno)}; nothing was added", 507) from None
        raise


class Service:
    """A trained run (a :class:`~logitsep.classifier.SingleLogitClassifier` with thresholds) and a serve folder.

    Thread-safe: model calls may run in a thread pool; ingests are serialised by one writer lock; searches
    run on the index as it is (always a whole-item prefix). ``publish`` and the subscriber methods belong to
    the event loop's thread.
    """

    def __init__(self, classifier: SingleLogitClassifier, folder: str | os.PathLike,
                 score_cache: int = 256 << 20) -> None:
        self.classifier = classifier
        self.input_shape = tuple(classifier.input_shape)
        self.layout = image_layout(self.input_shape)  # None: a model of feature vectors (no images to ingest)
        if classifier.thresholds is None:
            run = classifier.run_dir or "RUN"
            raise ValueError(f"{run} has no calibrated thresholds (thresholds.json): run `logitsep calibrate {run}`")
        self.threshold = float(classifier.thresholds.global_threshold)
        self._take_classes()
        self.folder = Path(folder)
        self.index = self._open_index()
        meta = self.index.meta
        self._source = (meta.get("dataset"), meta.get("split")) if meta.get("dataset") and meta.get("split") else None
        self._source_images: np.ndarray | None = None
        self.images = self.folder / "images"
        self.images.mkdir(mode=0o700, exist_ok=True)
        for folder in (self.folder, self.images):  # the items are the users' images: for this user only
            _owner_only(folder)
        self._packs: list[tuple[int, int]] = []  # (first id, count) of each pack, sorted
        self._remove_orphans()
        self.keys = IdempotencyKeys(self.folder, len(self.index))
        self._write_lock = threading.RLock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="logitsep-writer")
        self._cache_budget = score_cache
        self.cache = ScoreCache(score_cache) if score_cache > 0 else None
        self.stream = Broadcast(self.class_names)
        self.ingested = 0  # items added by this process

    def _take_classes(self) -> None:
        """The classifier's classes as they are now (at start, and after an enrollment or a removal)."""
        self.head = self.classifier.head
        self.num_classes = int(self.classifier.num_classes)
        self.class_names = list(self.classifier.class_names)
        self.per_class = [float(t) for t in self.classifier.thresholds.per_class]

    def _open_index(self) -> EmbeddingIndex:
        """The serve folder's index, refusing one of another model; a new one when the folder has none. The head's
        fingerprint is that of its trained rows: enrolling a class keeps the index valid."""
        dim = self.head.d + 1
        base = self.classifier.base_classes
        head_sha = self.head.fingerprint(base)
        model_sha = (self.classifier.fingerprint or {}).get("sha256")
        if not (self.folder / "header.json").is_file():
            meta = {"source": "logitsep serve", "run": str(self.classifier.run_dir or ""), "head_sha256": head_sha,
                    "head_rows": base, "model_sha256": model_sha, "num_classes": base,
                    "class_names": self.class_names[:base]}
            return EmbeddingIndex.create(self.folder, dim, meta=meta)
        index = EmbeddingIndex.open(self.folder, writable=True)
        meta = index.meta
        for key, ours in (("head_sha256", head_sha), ("model_sha256", model_sha)):
            theirs = meta.get(key)
            if theirs and ours and theirs != ours:
                index.close()
                raise ValueError(f"index {self.folder} holds embeddings of another model ({key} {theirs[:12]}…, "
                                 f"this run's is {ours[:12]}…): use a fresh --index folder")
        if index.dim != dim:
            index.close()
            raise ValueError(f"index {self.folder} holds {index.dim}-dimensional vectors, this model's "
                             f"are {dim}-dimensional (embedding + bias): built with another model")
        return index

    def close(self) -> None:
        """Release the index (its writer's lock) and the writer thread."""
        self._writer.shutdown(wait=True)
        self.index.close()

    async def in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a write (ingest, enrollment, removal) on the service's own writer thread: writes wait for the
        writer lock there, one at a time, instead of holding the worker threads that searches share."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, functools.partial(fn, *args))

    # ------------------------------------------------------------------------------------------- files
    def _remove_orphans(self) -> None:
        """Delete image files and packs past the end of the index (left by an interrupted ingest) and temporary
        files; list the packs that stay."""
        n = len(self.index)
        packs = []
        for entry in os.scandir(self.images):
            stem, _, ext = entry.name.partition(".")
            if entry.name.startswith(".") or (ext in ("png", "pngs") and stem.isdigit() and int(stem) >= n):
                os.unlink(entry.path)
            elif ext == "pngs" and stem.isdigit() and (count := pack_count(entry.path)) is not None:
                packs.append((int(stem), count))
        self._packs = sorted(packs)

    def image(self, item_id: int) -> Path | bytes | None:
        """The image of a committed item: the path of its stored PNG, PNG bytes drawn from the dataset split the
        index was built from, or None (unknown id, or no image). May load the dataset: call it off the loop."""
        if not 0 <= item_id < len(self.index) or self.layout is None:
            return None
        path = self.images / f"{item_id}.png"
        if path.is_file():
            return path
        packs = self._packs  # appended under the writer lock; a committed id's pack is listed before its commit
        at = bisect.bisect_right(packs, (item_id, float("inf"))) - 1
        if at >= 0 and item_id < packs[at][0] + packs[at][1]:
            return read_pack(self.images / f"{packs[at][0]}{PACK_SUFFIX}", item_id - packs[at][0])
        if self._source is not None:
            if self._source_images is None:
                self._source_images = dataset_images(*self._source, self.input_shape)
            if item_id < len(self._source_images):
                return encode_png(self._source_images[item_id])
        return None

    # ------------------------------------------------------------------------------------------- checks
    def check_class(self, class_id: object) -> int:
        return check_class_id(class_id, self.num_classes)

    def check_threshold(self, threshold: object) -> float:
        return check_threshold(threshold)

    def decode(self, pngs: list[bytes], name: str = "images") -> np.ndarray:
        """All images of a request as one ``uint8`` array (:func:`~.requests.decode_images`)."""
        if self.layout is None:
            raise BadInput(f"{name}: cannot serve images to a model with input shape {list(self.input_shape)} (it "
                           "takes feature vectors, not [C, H, W], [H, W] or flat square images); its index is "
                           "searched by class (/search), built with `logitsep index`")
        return decode_images(pngs, self.layout, name)

    def class_vector(self, class_id: int) -> np.ndarray:
        """``[W_c, b_c]`` (scaled, normalised for a cosine head): its inner product with an item vector is the logit."""
        with torch.inference_mode():
            return self.head.class_vectors([class_id]).float().cpu().numpy().reshape(-1)

    # ------------------------------------------------------------------------------------------- operations
    def ingest(self, pngs: list[bytes], on_commit: Callable[[int, np.ndarray, int], None] | None = None,
               key: tuple[str, str] | None = None) -> tuple[int, np.ndarray, int]:
        """Decode, embed once and append ``pngs``; returns ``(first id, item vectors [n, dim], new total)``.
        ``on_commit(first id, vectors, total)`` is called under the writer lock right after the commit, so
        successive calls see the commits in order. ``key``: ``(key id, request digest)`` of an idempotency key,
        recorded before the commit (:mod:`.idempotency`); use :meth:`ingest_once`."""
        pixels = self.decode(pngs)
        with torch.inference_mode():
            vectors = self.head.item_vectors(self.classifier.embed(inputs_from_images(pixels, self.input_shape)))
        vectors = np.ascontiguousarray(vectors.float().cpu().numpy())
        encoded = [encode_png(p) for p in pixels]
        with self._write_lock, _disk_full_is_507():
            start = len(self.index)
            # the images first, one pack (one fsync for the request): a failure leaves no row without its image
            pack = write_pack(self.images / f"{start}{PACK_SUFFIX}", encoded)
            fsync_dir(self.images)  # the rename itself durable before the index commits the rows
            self._packs = [p for p in self._packs if p[0] < start] + [(start, len(encoded))]
            if key is not None:  # the key before the commit: no committed ingest without its key
                self.keys.put(key[0], {"digest": key[1], "start": start, "count": len(encoded),
                                       "total": start + len(encoded), "pack": pack})
            try:
                total = int(self.index.append(vectors))
            except BaseException:
                if key is not None:
                    self.keys.drop(key[0])
                raise
            self.ingested += len(encoded)
            if on_commit is not None:
                on_commit(start, vectors, total)
        return start, vectors, total

    def ingest_once(self, pngs: list[bytes], key: str,
                    on_commit: Callable[[int, np.ndarray, int], None] | None = None) -> tuple[dict[str, Any], bool]:
        """:meth:`ingest` with an idempotency key (:func:`.idempotency.key_id`): the first answer again, and
        nothing stored, when the key was seen (here or before a restart) with the same images; a 422 when it was
        seen with others. Returns ``(answer, replayed)``."""
        digest = request_digest(pngs)
        with self._write_lock:
            known = self.keys.get(key)
            if known is not None and self._committed(known):
                if known["digest"] != digest:
                    raise BadInput("Idempotency-Key was used before with other images: a new request needs a new "
                                   "key", 422)
                return _answer(known["start"], known["count"], known["total"]), True
            start, vectors, total = self.ingest(pngs, on_commit, key=(key, digest))
        return _answer(start, len(vectors), total), False

    def _committed(self, entry: dict[str, Any]) -> bool:
        """Whether a key's ingest is the one committed at its ids (its pack is still the one it wrote)."""
        start, count = entry["start"], entry["count"]
        return (start + count <= len(self.index)
                and pack_digest(self.images / f"{start}{PACK_SUFFIX}") == entry["pack"])

    def enroll(self, name: object, pngs: list[bytes]) -> dict[str, Any]:
        """Add class ``name`` from images (:meth:`SingleLogitClassifier.enroll`: persisted in the run folder before
        it is used); all or nothing. A name in use is a 409, bad images a 400/422 (nothing changes)."""
        try:
            name = check_name(name, self.class_names)
        except (TypeError, ValueError) as err:
            # in use, or a number (it would read as a class id): a conflict (409); otherwise outside the schema (422)
            conflict = isinstance(name, str) and (name in self.class_names or name.strip().isdigit())
            raise BadInput(str(err), 409 if conflict else 422) from None
        pixels = self.decode(pngs)
        x = inputs_from_images(pixels, self.input_shape)
        with self._write_lock, _disk_full_is_507():  # one change of the classes at a time
            try:
                class_id = self.classifier.enroll(name, x)
            except ValueError as err:
                raise BadInput(str(err), 409 if name in self.classifier.class_names else 422) from None
            self._classes_changed()
        return {"id": class_id, "name": name, "examples": len(pngs), "threshold": self.per_class[class_id]}

    def remove(self, class_id: object) -> dict[str, Any]:
        """Remove an enrolled class (404: no such class; 409: a trained class); the enrolled classes after it move
        down one id."""
        if isinstance(class_id, int) and not isinstance(class_id, bool) and not 0 <= class_id < self.num_classes:
            raise BadInput(f"no class {class_id} (classes 0..{self.num_classes - 1})", 404)
        class_id = self.check_class(class_id)
        with self._write_lock:
            if class_id < self.classifier.base_classes:
                raise BadInput(f"class {class_id} ({self.class_names[class_id]!r}) was trained, not enrolled: only "
                               "enrolled classes can be removed", 409)
            name = self.class_names[class_id]
            self.classifier.remove(class_id)
            self._classes_changed()
        return {"removed": class_id, "name": name}

    def _classes_changed(self) -> None:
        """Take the new classes; cached columns are of the old ids and go (searches in flight keep theirs)."""
        self._take_classes()
        self.cache = ScoreCache(self._cache_budget) if self._cache_budget > 0 else None
        self.stream.class_names = self.class_names

    def query(self, class_id: int, png: bytes, threshold: float | None = None) -> dict[str, Any]:
        """The single logit of ``class_id`` for one image (one dot product on its embedding)."""
        class_id = self.check_class(class_id)
        threshold = self.threshold if threshold is None else self.check_threshold(threshold)
        pixels = self.decode([png], name="image")
        began = time.perf_counter()
        with torch.inference_mode():
            score = float(self.classifier.score(inputs_from_images(pixels, self.input_shape), class_id)[0])
        ms = 1e3 * (time.perf_counter() - began)
        return {"class_id": class_id, "score": score, "match": score >= threshold, "threshold": threshold,
                "ms": round(ms, 3)}

    def search(self, class_id: int, threshold: float | None = None, top_k: int | None = None) -> dict[str, Any]:
        """Items of ``class_id``: those scoring ``>= threshold`` (default: the global threshold when ``top_k`` is
        not given), the ``top_k`` best, or the ``top_k`` best above ``threshold``; sorted by score, descending."""
        class_id = self.check_class(class_id)
        if threshold is not None:
            threshold = self.check_threshold(threshold)
        elif top_k is None:
            threshold = self.threshold
        top_k = check_top_k(top_k)
        query = self.class_vector(class_id)
        began = time.perf_counter()
        data = self.index.vectors  # the committed rows now; appends map new ones without touching these
        found = self.cache.column(class_id, query, data) if self.cache is not None else None
        if found is not None:
            column, cached = found
            result = select(column, threshold, top_k)
        else:
            result, cached = self.index.search(query, threshold=threshold, top_k=top_k), False
        ms = 1e3 * (time.perf_counter() - began)
        items = [{"id": i, "score": s} for i, s in zip(result.ids.tolist(), result.scores.tolist(), strict=True)]
        return {"class_id": class_id, "threshold": threshold, "items": items, "scanned": int(result.scanned),
                "ms": round(ms, 3), "cached": cached, "total": len(self.index)}

    def score_range(self) -> list[float]:
        """A range for a threshold slider: the global threshold ± max(1, |global|, 4 × the largest distance of a
        per-class threshold from it) (a heuristic: logits have no fixed scale; the page widens it to the scores
        it sees)."""
        spread = max([abs(t - self.threshold) for t in self.per_class] + [0.0])
        width = max(1.0, abs(self.threshold), 4.0 * spread)
        return [self.threshold - width, self.threshold + width]

    def classes(self) -> dict[str, Any]:
        base = self.classifier.base_classes
        return {"classes": [{"id": i, "name": name, "threshold": self.per_class[i], "enrolled": i >= base}
                            for i, name in enumerate(self.class_names)],
                "threshold": self.threshold, "score_range": self.score_range(), "total": len(self.index)}

    def stats(self) -> dict[str, int]:
        return {"items": len(self.index), "ingested": self.ingested, **self.stream.stats()}

    # ------------------------------------------------------------------------------------------- stream
    def subscribe(self, class_id: int, threshold: float | None = None) -> Subscriber:
        class_id = self.check_class(class_id)
        threshold = self.threshold if threshold is None else self.check_threshold(threshold)
        return self.stream.subscribe(class_id, threshold, self.class_vector(class_id))

    def unsubscribe(self, sub: Subscriber) -> None:
        self.stream.unsubscribe(sub)

    def publish(self, start: int, vectors: np.ndarray, total: int) -> None:
        """Announce committed items to the subscribers (:meth:`.stream.Broadcast.publish`)."""
        self.stream.publish(start, vectors, total)

    def _announcer(self) -> Callable[[int, np.ndarray, int], None]:
        """An ``on_commit`` that queues :meth:`publish` on the running event loop (called from the writer thread),
        so the stream announces items in id order."""
        loop = asyncio.get_running_loop()
        return lambda start, vectors, total: loop.call_soon_threadsafe(self.publish, start, vectors, total)

    async def ingest_async(self, pngs: list[bytes]) -> dict[str, Any]:
        """:meth:`ingest` on the writer thread (:meth:`in_writer`); its :meth:`publish` is queued on the event loop
        at the commit, so the stream announces items in id order."""
        start, vectors, total = await self.in_writer(self.ingest, pngs, self._announcer())
        return _answer(start, len(vectors), total)

    async def ingest_once_async(self, pngs: list[bytes], key: str) -> tuple[dict[str, Any], bool]:
        """:meth:`ingest_once` on the writer thread, announced as :meth:`ingest_async` does."""
        return await self.in_writer(self.ingest_once, pngs, key, self._announcer())


def _answer(start: int, count: int, total: int) -> dict[str, Any]:
    """The answer of an ingest: items added, the new total, their ids."""
    return {"added": count, "total": total, "ids": list(range(start, start + count))}
