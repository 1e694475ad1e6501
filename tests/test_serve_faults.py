"""The service's fault findings of issue 20, each reproduced first (the test failed on the code before its fix):
smaller input-handling faults of finding 7 and the durability of ingested images."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: F401

from logitsep.core.images import UnsupportedImage, decode_png  # noqa: E402
from logitsep.serve import service as service_module  # noqa: E402
from test_serve_api import b64, make_client, pngs  # noqa: E402
from test_serve_api import images as images  # noqa: E402,F401  (the fixture)
from test_serve_api import run_dir as run_dir  # noqa: E402,F401  (the fixture)


def true_png16_rgb(h: int = 8, w: int = 8) -> bytes:
    """A 16-bit-per-channel RGB PNG, written chunk by chunk (Pillow writes no 16-bit colour PNGs)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + np.full((w, 3), 40000, dtype=">u2").tobytes() for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb_png_is_refused() -> None:
    data = true_png16_rgb()
    with Image.open(io.BytesIO(data)) as img:  # what Pillow does with it: an 8-bit RGB image, low bytes lost
        assert img.mode == "RGB"
    with pytest.raises(UnsupportedImage, match="16-bit"):
        decode_png(data, "image")


def test_query_threshold_must_be_a_number_not_a_bool(run_dir: Path, images: np.ndarray, tmp_path: Path) -> None:
    with make_client(run_dir, tmp_path / "index") as c:
        body = {"class_id": 3, "image": pngs(images[:1])[0]}
        assert c.post("/query", json={**body, "threshold": True}).status_code == 422
        assert c.post("/query", json={**body, "threshold": 1}).status_code == 200
        assert c.post("/query", json={**body, "threshold": 0.5}).json()["threshold"] == 0.5
        r = c.post("/query", json={"class_id": 3, "image": b64(true_png16_rgb())})
        assert r.status_code in (400, 422) and "error" in r.json()
        c.app.state.service.close()


def test_head_answers_like_get_without_a_body(run_dir: Path, tmp_path: Path) -> None:
    with make_client(run_dir, tmp_path / "index") as c:
        for path in ("/health", "/classes", "/stats", "/search?class_id=1", "/"):
            get, head = c.get(path), c.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert c.head("/search?class_id=99").status_code == 422
        c.app.state.service.close()


def test_ingested_images_folder_is_fsynced_before_the_index_commits(run_dir: Path, images: np.ndarray,
                                                                   tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync_dir = service_module.fsync_dir
    monkeypatch.setattr(service_module, "fsync_dir", lambda p: (events.append(f"fsync {Path(p).name}"),
                                                                real_fsync_dir(p))[1])
    with make_client(run_dir, tmp_path / "index") as c:
        service = c.app.state.service
        append = service.index.append
        monkeypatch.setattr(service.index, "append", lambda v: (events.append("append"), append(v))[1])
        assert c.post("/ingest", json={"images": pngs(images[:3])}).status_code == 200
        service.close()
    assert events == ["fsync images", "append"]
    assert sorted(os.listdir(tmp_path / "index" / "images")) == ["0.png", "1.png", "2.png"]


def test_schema_declares_the_bearer_only_with_a_token_and_non_empty_images(run_dir: Path, tmp_path: Path) -> None:
    for token, secured in ((None, False), ("s3cret", True)):
        with make_client(run_dir, tmp_path / f"index-{secured}", token=token) as c:
            schema = c.get("/openapi.json").json()
            for path, method in (("/ingest", "post"), ("/classes", "post"), ("/classes/{class_id}", "delete")):
                assert bool(schema["paths"][path][method].get("security")) == secured, (path, token)
            assert ("HTTPBearer" in schema.get("components", {}).get("securitySchemes", {})) == secured
            items = schema["components"]["schemas"]["IngestRequest"]["properties"]["images"]["items"]
            assert items["minLength"] == 1
            assert schema["components"]["schemas"]["QueryRequest"]["properties"]["image"]["minLength"] == 1
            if token is None:
                assert c.post("/ingest", json={"images": [""]}).status_code == 422
            c.app.state.service.close()
