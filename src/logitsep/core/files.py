"""Crash-safe file writing: write to a temporary file beside the target, fsync it, then rename it over the target.

A reader never sees a half-written file, and an existing file is not lost if the writer dies midway. Also the
JSON encoder every writer of logitsep uses (:func:`json_default`: numpy and torch scalars and arrays).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


def _process_umask() -> int:
    """Read once at import: ``os.umask`` can only be read by setting it, which is not thread-safe later on."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _process_umask()


def umask() -> int:
    """The process's umask (read once at import)."""
    return _UMASK


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file in the target's folder, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data is on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], header: list[str] | None = None) -> Path:
    rows = list(rows)
    fields = header or list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default``: numpy / torch scalars as numbers, arrays and tensors as lists."""
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder: makes the renames and new entries in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def invalid(where: str, what: str, problem: str) -> ValueError:
    """The one message of a stored file that cannot be used: ``{where}: not a valid {what} ({problem})``."""
    return ValueError(f"{where}: not a valid {what} ({problem})")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON value of ``path``; :func:`invalid` when it is not UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise invalid(str(path), what, f"corrupt JSON: {err}") from err


def check_versioned(obj: object, fmt: str, version: int, where: str, what: str) -> dict[str, Any]:
    """``obj`` as a JSON object with ``"format": fmt`` and ``"version": version``; :func:`invalid` otherwise."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise invalid(where, what, f'expected a JSON object with "format": "{fmt}"')
    if obj.get("version") != version:
        raise invalid(where, what, f"unsupported version {obj.get('version')!r}, expected {version}")
    return obj
