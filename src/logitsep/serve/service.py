"""The serving core without HTTP: decode and check images, embed them once, store them, score one class.

The index folder (``--index DIR``) is an :class:`~logitsep.search.EmbeddingIndex` (``header.json``,
``vectors.f32``; one built by ``logitsep index`` works too) of item vectors ``[h, 1]`` (``item_vectors``), whose
inner product with a class vector ``[W_c, b_c]`` is the item's logit for class ``c``; ``DIR/images/{id}.png``
holds the image of each ingested item (re-encoded from the decoded pixels). Items of an index built from a
dataset split (its header names the dataset and split) are drawn from that split on request. The index header
records the model's fingerprints, so an index is never searched with another model's class vectors.

Ingest is all-or-nothing: every image of a request is decoded and checked before anything is written; the
images are written (atomically, one file per id) *before* the index append that commits them, under one writer
lock. An interrupted ingest leaves at most image files past the end of the index: they are never served and
are removed on the next start, so a restart always sees a consistent index. Searches need no lock: each one
scans the committed rows the index maps when it starts (a whole-item prefix), while appends go on.

Thresholds: every default threshold (``/search``, ``/query``, ``/stream``) is the run's calibrated **global**
threshold, one threshold for every class: the Principle of Logit Separation (Keren, Sabato & Schuller,
ICDM 2018) is what makes one threshold work for all classes. The per-class thresholds are listed by
``/classes`` for clients that prefer them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._io import atomic_write

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}  # 8-bit (or less) modes; 16-bit PNGs are refused
MAX_IMAGES = 1024  # images per /ingest request


class BadInput(ValueError):
    """A request the service refuses; ``status`` is the HTTP status the API answers with."""

    status = 422

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


def image_geometry(input_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """``(height, width, channels)`` of the images a model with ``input_shape`` takes: ``[C, H, W]`` (a CNN),
    ``[H, W]``, or a flat ``[n]`` with ``n`` a square (the MLP: square grayscale images), as
    :func:`~logitsep.classifier.inputs_from_images` reads them."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape[1], shape[2], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        return math.isqrt(shape[0]), math.isqrt(shape[0]), 1
    raise ValueError(f"cannot serve images to a model with input shape {shape}: not [C, H, W], [H, W] or a "
                     "flat square image")


def dataset_images(dataset: str, split: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """A dataset split as ``uint8`` images ``[n, H, W]`` (or ``[n, H, W, 3]``): pixel = round(256·x) clipped to
    255, the inverse of the loaders' ``x = pixel/256``."""
    from ..data import load_dataset

    x, _ = load_dataset(dataset).split(split)
    height, width, channels = image_geometry(input_shape)
    pixels = np.clip(np.rint(x.numpy().astype(np.float64) * 256.0), 0, 255).astype(np.uint8)
    if channels == 1:
        return pixels.reshape(len(pixels), height, width)
    return pixels.reshape(len(pixels), channels, height, width).transpose(0, 2, 3, 1)


def decode_base64(text: object, where: str) -> bytes:
    """The bytes of a base64 string (an optional ``data:image/png;base64,`` prefix is allowed)."""
    if not isinstance(text, str):
        raise BadInput(f"{where}: expected a base64 string, got {type(text).__name__}", 400)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(f"{where}: malformed base64 ({err})", 400) from None
    if not data:
        raise BadInput(f"{where}: empty image", 400)
    return data


def decode_png(data: bytes, geometry: tuple[int, int, int], where: str) -> np.ndarray:
    """Decode one PNG to ``uint8 [H, W]`` (grayscale) or ``[H, W, 3]``, checking its size before decoding pixels.

    Raises :class:`BadInput` (400) for bytes that are not a valid PNG, (422) for the wrong size or bit depth.
    """
    height, width, channels = geometry
    if not data.startswith(PNG_SIGNATURE):
        raise BadInput(f"{where}: not a PNG image (the PNG signature is missing)", 400)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.size != (width, height):
                raise BadInput(f"{where}: wrong image size {img.size[0]}x{img.size[1]}, the model takes "
                               f"{width}x{height}")
            if img.mode not in PNG_MODES:
                raise BadInput(f"{where}: unsupported PNG mode {img.mode!r} (8-bit grayscale or RGB expected)")
            img.load()
            pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except BadInput:
        raise
    except Image.DecompressionBombError as err:  # dimensions far beyond any model's: refused before decoding
        raise BadInput(f"{where}: wrong image size, the model takes {width}x{height} ({err})") from None
    except Exception as err:  # any decoder failure on untrusted bytes is the request's fault
        raise BadInput(f"{where}: corrupt PNG ({type(err).__name__}: {err})", 400) from None
    return pixels


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of ``uint8 [H, W]`` or ``[H, W, 3]`` pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class ScoreCache:
    """Logit columns ``z_c(item)`` of the classes searched lately, over the committed items of the index.

    An exact search for class ``c`` scores every stored item: ``n·(d+1)`` multiply-adds, reading the whole index
    (~200 MB for 10⁵ MNIST items). The items only grow and a class vector never changes, so the column of
    scores is kept and extended by the rows appended since (``O(new·d)``); a search then reads ``4n`` bytes.
    Memory is bounded by ``budget`` bytes (4 bytes per item and class): least recently used columns go first,
    and an index too large for one column is always scanned.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._columns: OrderedDict[int, list] = OrderedDict()  # class -> [lock, values, count]
        self._lock = threading.Lock()

    def column(self, class_id: int, vector: np.ndarray, data: torch.Tensor) -> tuple[np.ndarray, bool] | None:
        """The scores of the rows of ``data`` (the committed vectors ``[n, dim]``) for the class vector, and whether
        the column was cached before; None when one column would not fit the budget."""
        n = len(data)
        if 4 * max(n, 1) > self.budget:
            return None
        with self._lock:
            entry = self._columns.get(class_id)
            cached = entry is not None
            if entry is None:
                entry = self._columns[class_id] = [threading.Lock(), np.empty(0, np.float32), 0]
            self._columns.move_to_end(class_id)
        with entry[0]:
            _, values, count = entry
            if count < n:
                if len(values) < n:  # grow by doubling, so appends cost O(1) amortised
                    grown = np.empty(max(n, 2 * len(values)), np.float32)
                    grown[:count] = values[:count]
                    entry[1] = values = grown
                with torch.inference_mode():
                    values[count:n] = torch.mv(data[count:n], torch.from_numpy(vector)).numpy()
                entry[2] = n
            column = values[:n]  # rows < n are never written again: safe to read while others extend it
        with self._lock:
            while sum(4 * len(e[1]) for e in self._columns.values()) > self.budget and len(self._columns) > 1:
                self._columns.popitem(last=False)
        return column, cached


def search_column(column: np.ndarray, threshold: float | None, top_k: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Ids and scores of the entries of ``column`` that are ``>= threshold`` (compared in float32, as the index
    does) and/or the ``top_k`` largest, sorted by score descending, ties by id: the semantics of
    :meth:`~logitsep.search.EmbeddingIndex.search`."""
    ids = np.arange(len(column)) if threshold is None else np.flatnonzero(column >= np.float32(threshold))
    scores = column[ids]
    if top_k is not None and len(ids) > top_k:
        kth = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]  # the k-th largest score
        keep = scores >= kth  # the top k, and any more that tie with the k-th (cut by id below)
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:top_k]
    return ids[order].astype(np.int64), scores[order]


@dataclass(eq=False)
class Subscriber:
    """One ``/stream`` client: its class, threshold, class vector and event queue."""

    class_id: int
    threshold: float
    vector: np.ndarray
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=10_000))
    dropped: int = 0


class Service:
    """A trained run (a :class:`~logitsep.classifier.SingleLogitClassifier` with thresholds) and a serve folder.

    Thread-safe: model calls may run in a thread pool; ingests are serialised by one writer lock; searches
    run on the index as it is (always a whole-item prefix). ``publish`` and the subscriber methods belong to
    the event loop's thread.
    """

    def __init__(self, classifier: Any, folder: str | os.PathLike, score_cache: int = 256 << 20) -> None:
        from ..search import EmbeddingIndex, class_vectors, head_fingerprint

        self.classifier = classifier
        self.head = classifier.model.head
        self.num_classes = int(classifier.num_classes)
        self.class_names = list(classifier.class_names)
        self.input_shape = tuple(classifier.input_shape)
        self.geometry = image_geometry(self.input_shape)
        if classifier.thresholds is None:
            run = getattr(classifier, "run_dir", None) or "RUN"
            raise ValueError(f"{run} has no calibrated thresholds (thresholds.json): run `logitsep calibrate {run}`")
        self.threshold = float(classifier.thresholds.global_threshold)
        self.per_class = [float(t) for t in classifier.thresholds.per_class]
        self._class_vectors = class_vectors
        self.folder = Path(folder)
        with torch.inference_mode():
            dim = int(class_vectors(self.head, [0]).shape[-1])
        head_sha = head_fingerprint(self.head)
        model_sha = (getattr(classifier, "fingerprint", None) or {}).get("sha256")
        if (self.folder / "header.json").is_file():
            self.index = EmbeddingIndex.open(self.folder, writable=True)
            meta = self.index.meta
            for key, ours in (("head_sha256", head_sha), ("model_sha256", model_sha)):
                theirs = meta.get(key)
                if theirs and ours and theirs != ours:
                    self.index.close()
                    raise ValueError(f"index {self.folder} holds embeddings of another model ({key} {theirs[:12]}…, "
                                     f"this run's is {ours[:12]}…): use a fresh --index folder")
            if self.index.dim != dim:
                self.index.close()
                raise ValueError(f"index {self.folder} holds {self.index.dim}-dimensional vectors, this model's "
                                 f"are {dim}-dimensional (embedding + bias): built with another model")
        else:
            meta = {"source": "logitsep serve", "run": str(getattr(classifier, "run_dir", "") or ""),
                    "head_sha256": head_sha, "model_sha256": model_sha, "num_classes": self.num_classes,
                    "class_names": self.class_names}
            self.index = EmbeddingIndex.create(self.folder, dim, meta=meta)
        self._source = (meta.get("dataset"), meta.get("split")) if meta.get("dataset") and meta.get("split") else None
        self._source_images: np.ndarray | None = None
        self.images = self.folder / "images"
        self.images.mkdir(exist_ok=True)
        self._remove_orphans()
        self._write_lock = threading.Lock()
        self.cache = ScoreCache(score_cache) if score_cache > 0 else None
        self._subscribers: set[Subscriber] = set()
        self.ingested = 0  # items added by this process
        self.dropped = 0  # stream events lost by subscribers that have left

    def close(self) -> None:
        """Release the index (its writer's lock)."""
        self.index.close()

    # ------------------------------------------------------------------------------------------- files
    def _remove_orphans(self) -> None:
        """Delete image files past the end of the index (left by an interrupted ingest) and temporary files."""
        n = len(self.index)
        for entry in os.scandir(self.images):
            stem, _, ext = entry.name.partition(".")
            if entry.name.startswith(".") or (ext == "png" and stem.isdigit() and int(stem) >= n):
                os.unlink(entry.path)

    def image(self, item_id: int) -> Path | bytes | None:
        """The image of a committed item: the path of its stored PNG, PNG bytes drawn from the dataset split the
        index was built from, or None (unknown id, or no image). May load the dataset: call it off the loop."""
        if not 0 <= item_id < len(self.index):
            return None
        path = self.images / f"{item_id}.png"
        if path.is_file():
            return path
        if self._source is not None:
            if self._source_images is None:
                self._source_images = dataset_images(*self._source, self.input_shape)
            if item_id < len(self._source_images):
                return encode_png(self._source_images[item_id])
        return None

    # ------------------------------------------------------------------------------------------- checks
    def check_class(self, class_id: object) -> int:
        if isinstance(class_id, bool) or not isinstance(class_id, int):
            raise BadInput(f"class_id must be an integer, got {class_id!r}")
        if not 0 <= class_id < self.num_classes:
            raise BadInput(f"unknown class_id {class_id}: valid ids are 0..{self.num_classes - 1}")
        return class_id

    def check_threshold(self, threshold: object) -> float:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise BadInput(f"threshold must be a finite number, got {threshold!r}")
        return float(threshold)

    def decode(self, pngs: list[bytes], name: str = "images") -> np.ndarray:
        """All images of a request as one ``uint8`` array; raises on the first bad one (nothing is kept).
        Errors name the image as ``name[i]`` (or ``name`` alone for a single image called ``"image"``)."""
        if not pngs:
            raise BadInput(f"{name}: no images given")
        if len(pngs) > MAX_IMAGES:
            raise BadInput(f"{name}: too many images in one request: {len(pngs)} (at most {MAX_IMAGES})")
        where = (lambda i: name) if name == "image" else (lambda i: f"{name}[{i}]")
        return np.stack([decode_png(data, self.geometry, where(i)) for i, data in enumerate(pngs)])

    def class_vector(self, class_id: int) -> np.ndarray:
        """``[W_c, b_c]`` (scaled, normalised for a cosine head): its inner product with an item vector is the logit."""
        with torch.inference_mode():
            vector = self._class_vectors(self.head, torch.tensor([class_id]))
        return vector.float().cpu().numpy().reshape(-1)

    # ------------------------------------------------------------------------------------------- operations
    def _inputs(self, pixels: np.ndarray) -> torch.Tensor:
        from ..classifier import inputs_from_images

        return inputs_from_images(pixels, self.input_shape)

    def ingest(self, pngs: list[bytes], on_commit: Callable[[int, np.ndarray, int], None] | None = None,
               ) -> tuple[int, np.ndarray, int]:
        """Decode, embed once and append ``pngs``; returns ``(first id, item vectors [n, dim], new total)``.
        ``on_commit(first id, vectors, total)`` is called under the writer lock right after the commit, so
        successive calls see the commits in order."""
        from ..search import item_vectors

        pixels = self.decode(pngs)
        with torch.inference_mode():
            vectors = item_vectors(self.head, self.classifier.embed(self._inputs(pixels)))
        vectors = np.ascontiguousarray(vectors.float().cpu().numpy())
        encoded = [encode_png(p) for p in pixels]
        with self._write_lock:
            start = len(self.index)
            for i, data in enumerate(encoded):
                atomic_write(self.images / f"{start + i}.png", lambda tmp, data=data: Path(tmp).write_bytes(data))
            total = int(self.index.append(vectors))
            self.ingested += len(encoded)
            if on_commit is not None:
                on_commit(start, vectors, total)
        return start, vectors, total

    def query(self, class_id: int, png: bytes, threshold: float | None = None) -> dict[str, Any]:
        """The single logit of ``class_id`` for one image (one dot product on its embedding)."""
        class_id = self.check_class(class_id)
        threshold = self.threshold if threshold is None else self.check_threshold(threshold)
        pixels = self.decode([png], name="image")
        began = time.perf_counter()
        with torch.inference_mode():
            score = float(self.classifier.score(self._inputs(pixels), class_id)[0])
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
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise BadInput(f"top_k must be a positive integer, got {top_k!r}")
        query = self.class_vector(class_id)
        began = time.perf_counter()
        data = self.index.vectors  # the committed rows now; appends map new ones without touching these
        found = self.cache.column(class_id, query, data) if self.cache is not None else None
        if found is not None:
            (ids, scores), cached, scanned = search_column(found[0], threshold, top_k), found[1], len(data)
        else:
            result = self.index.search(query, threshold=threshold, top_k=top_k)
            ids, scores, cached, scanned = result.ids, result.scores, False, result.scanned
        ms = 1e3 * (time.perf_counter() - began)
        items = [{"id": i, "score": s} for i, s in zip(ids.tolist(), scores.tolist(), strict=True)]
        return {"class_id": class_id, "threshold": threshold, "items": items, "scanned": int(scanned),
                "ms": round(ms, 3), "cached": cached, "total": len(self.index)}

    def score_range(self) -> list[float]:
        """A range for a threshold slider: the global threshold ± max(1, |global|, 4 × the largest distance of a
        per-class threshold from it) (a heuristic: logits have no fixed scale; the page widens it to the scores
        it sees)."""
        spread = max([abs(t - self.threshold) for t in self.per_class] + [0.0])
        width = max(1.0, abs(self.threshold), 4.0 * spread)
        return [self.threshold - width, self.threshold + width]

    def classes(self) -> dict[str, Any]:
        return {"classes": [{"id": i, "name": name, "threshold": self.per_class[i]}
                            for i, name in enumerate(self.class_names)],
                "threshold": self.threshold, "score_range": self.score_range(), "total": len(self.index)}

    # ------------------------------------------------------------------------------------------- stream
    def subscribe(self, class_id: int, threshold: float | None = None) -> Subscriber:
        class_id = self.check_class(class_id)
        threshold = self.threshold if threshold is None else self.check_threshold(threshold)
        sub = Subscriber(class_id, threshold, self.class_vector(class_id))
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self._subscribers:
            self._subscribers.discard(sub)
            self.dropped += sub.dropped

    def stats(self) -> dict[str, int]:
        return {"items": len(self.index), "ingested": self.ingested, "subscribers": len(self._subscribers),
                "dropped": self.dropped + sum(s.dropped for s in self._subscribers)}

    def publish(self, start: int, vectors: np.ndarray, total: int) -> None:
        """Queue a ``match`` event for each new item at or above a subscriber's threshold, then an ``ingest``
        event (``added``, ``total``). A subscriber whose queue is full loses the event (counted in ``dropped``)."""
        now = time.time()
        for sub in list(self._subscribers):
            scores = vectors @ sub.vector
            events = [("match", {"id": start + int(i), "score": float(scores[i]), "class_id": sub.class_id,
                                 "class": self.class_names[sub.class_id], "time": now})
                      for i in np.flatnonzero(scores >= sub.threshold)]
            events.append(("ingest", {"added": len(vectors), "total": total, "time": now}))
            for event in events:
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.dropped += 1

    async def ingest_async(self, pngs: list[bytes]) -> dict[str, Any]:
        """:meth:`ingest` in a worker thread; its :meth:`publish` is queued on the event loop at the commit, so the
        stream announces items in id order even when ingests overlap."""
        from starlette.concurrency import run_in_threadpool

        loop = asyncio.get_running_loop()

        def announce(start: int, vectors: np.ndarray, total: int) -> None:
            loop.call_soon_threadsafe(self.publish, start, vectors, total)

        start, vectors, total = await run_in_threadpool(self.ingest, pngs, announce)
        return {"added": len(vectors), "total": total, "ids": list(range(start, start + len(vectors)))}
