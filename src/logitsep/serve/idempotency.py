"""Idempotency keys of ``/ingest``: a retried request (its answer lost) gets the first answer, nothing stored again.

A key is kept per token (stored as ``sha256(token, key)``: neither is written) with the digest of the request's
images and the answer's ids, in ``DIR/idempotency.json`` (temporary file 0600, fsync, rename, folder fsync), at
most :data:`MAX_KEYS` (the oldest go first). An ingest with a key records it *before* the index append that
commits its rows, so that no committed ingest is without its key:

- the append fails in this process: the key is dropped again;
- the process dies before the append: on the next start, keys whose ids are past the end of the index are
  dropped;
- a kept key whose ids a later ingest took (its own append had failed and the drop could not be written): its
  pack was replaced, so its pack digest no longer matches and the key is treated as unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..core.files import fsync_dir

MAX_KEYS = 4096  # keys kept per serve folder
FILE = "idempotency.json"


def key_id(scope: str, key: str) -> str:
    """What is stored for ``key`` of the token ``scope`` ("" without a token)."""
    return hashlib.sha256(f"{len(scope)}:{scope}\0{key}".encode()).hexdigest()


def request_digest(pngs: list[bytes]) -> str:
    """The digest of a request's images (each length-prefixed, in order)."""
    h = hashlib.sha256()
    for png in pngs:
        h.update(len(png).to_bytes(8, "little"))
        h.update(png)
    return h.hexdigest()


class IdempotencyKeys:
    """The keys of one serve folder; call under the service's writer lock."""

    def __init__(self, folder: Path, committed: int) -> None:
        self.path = folder / FILE
        self.keys: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                rows = json.loads(self.path.read_text(encoding="utf-8"))["keys"]
                self.keys = {k: v for k, v in rows if v["start"] + v["count"] <= committed}
            except (ValueError, KeyError, TypeError):  # unreadable: no keys (a retry then stores again)
                self.keys = {}

    def get(self, kid: str) -> dict[str, Any] | None:
        return self.keys.get(kid)

    def put(self, kid: str, entry: dict[str, Any]) -> None:
        self.keys.pop(kid, None)
        self.keys[kid] = entry
        while len(self.keys) > MAX_KEYS:
            del self.keys[next(iter(self.keys))]
        self._save()

    def drop(self, kid: str) -> None:
        if self.keys.pop(kid, None) is not None:
            self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "keys": list(self.keys.items())}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
        fsync_dir(self.path.parent)
