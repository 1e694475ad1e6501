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
    from fastapi.testclient import TestClient

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
        assert c.head("/search?class_id=99").status_code == 404
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
    assert sorted(os.listdir(tmp_path / "index" / "images")) == ["0.pngs"]  # one pack for the request


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


def png_with_chunks(image: np.ndarray, chunks: int) -> bytes:
    """A valid PNG of ``image`` with ``chunks`` empty ancillary (tEXt) chunks before its IEND."""
    import struct
    import zlib

    from logitsep.core.images import encode_png

    data = encode_png(image)
    iend = data.rindex(b"IEND") - 4
    empty = struct.pack(">I", 0) + b"tEXt" + struct.pack(">I", zlib.crc32(b"tEXt") & 0xFFFFFFFF)
    return data[:iend] + empty * chunks + data[iend:]


def test_a_png_of_many_chunks_is_refused_before_decoding(run_dir: Path, images: np.ndarray, tmp_path: Path) -> None:
    from logitsep.core.images import MAX_PNG_CHUNKS

    assert decode_png(png_with_chunks(images[0], 10), "image").shape == (8, 8)  # a few are fine
    bomb = png_with_chunks(images[0], 50_000)
    with pytest.raises(UnsupportedImage, match=f"more than {MAX_PNG_CHUNKS} chunks"):
        decode_png(bomb, "image")
    with make_client(run_dir, tmp_path / "index") as c:
        r = c.post("/query", json={"class_id": 1, "image": b64(bomb)})
        assert r.status_code == 422 and "chunks" in r.json()["error"]
        c.app.state.service.close()


def test_a_full_disk_is_a_507_json_answer_and_adds_nothing(run_dir: Path, images: np.ndarray, tmp_path: Path,
                                                          monkeypatch) -> None:
    import errno

    with make_client(run_dir, tmp_path / "index") as c:
        service = c.app.state.service
        assert c.post("/ingest", json={"images": pngs(images[:2])}).status_code == 200

        def full(vectors):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(service.index, "append", full)
        r = c.post("/ingest", json={"images": pngs(images[2:5])})
        assert r.status_code == 507 and "insufficient storage" in r.json()["error"]
        monkeypatch.undo()
        assert c.get("/stats").json()["items"] == 2
        assert c.post("/ingest", json={"images": pngs(images[2:3])}).json()["ids"] == [2]
        service.close()


def test_a_loopback_server_answers_only_loopback_host_names(run_dir: Path, tmp_path: Path) -> None:
    from logitsep.serve.server import build

    app = build(run_dir, tmp_path / "index", host="127.0.0.1")
    with TestClient(app) as c:
        for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert c.get("/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            r = c.get("/classes", headers={"host": host})
            assert r.status_code == 400 and "not served here" in r.json()["error"], host
    app.state.service.close()
    open_app = build(run_dir, tmp_path / "index2", host="0.0.0.0")  # bound beyond this machine: any name
    with TestClient(open_app) as c:
        assert c.get("/health", headers={"host": "server.example"}).status_code == 200
    open_app.state.service.close()


def test_token_on_the_command_line_warns(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from logitsep.cli import main
    from logitsep.serve import server

    monkeypatch.setattr(server, "serve_forever", lambda app, *a, **k: app.state.service.close())
    monkeypatch.delenv("LOGITSEP_TOKEN", raising=False)
    assert main(["serve", str(run_dir), "--index", str(tmp_path / "i1"), "--token", "s3cret"]) == 0
    assert "--token shows in `ps`" in capsys.readouterr().err
    monkeypatch.setenv("LOGITSEP_TOKEN", "s3cret")
    assert main(["serve", str(run_dir), "--index", str(tmp_path / "i2")]) == 0
    assert "shows in `ps`" not in capsys.readouterr().err


# ------------------------------------------------------------------ finding 3: streams that never read


def test_a_slow_subscriber_is_dropped_and_its_queue_freed(monkeypatch) -> None:
    from logitsep.serve import stream

    monkeypatch.setattr(stream, "QUEUE_EVENTS", 3)
    b = stream.Broadcast(["a", "b"])
    slow, fast = b.subscribe(0, -1e9, np.ones(2)), b.subscribe(1, -1e9, np.ones(2))
    for i in range(5):  # each publish queues 2 matches + 1 ingest event per subscriber
        b.publish(2 * i, np.ones((2, 2)), 2 * i + 2)
        while not fast.queue.empty():  # this one reads
            fast.queue.get_nowait()
    assert slow.closed and slow not in b.subscribers and slow.queue.empty()  # memory given back
    assert not fast.closed and fast in b.subscribers
    assert b.stats()["subscribers"] == 1 and b.stats()["dropped"] > 0


def test_subscribers_are_capped(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from logitsep.serve import stream

    monkeypatch.setattr(stream, "MAX_SUBSCRIBERS", 1)
    with make_client(run_dir, tmp_path / "index") as c:
        service = c.app.state.service
        service.stream.subscribe(0, 0.0, np.ones(65))
        r = c.get("/stream", params={"class_id": 1})
        assert r.status_code == 503 and "subscribers" in r.json()["error"]
        service.close()


def test_a_subscriber_keeps_its_class_name_when_classes_are_renumbered() -> None:
    from logitsep.serve import stream

    names = ["a", "b", "new1", "new2"]
    b = stream.Broadcast(names)
    sub = b.subscribe(3, -1e9, np.ones(2))
    b.class_names = ["a", "b", "new2"]  # "new1" removed: "new2" is now class 2
    b.publish(0, np.ones((1, 2)), 1)  # raised IndexError on the event loop
    kind, event = sub.queue.get_nowait()
    assert kind == "match" and event["class"] == "new2"


# ------------------------------------------------------------------ finding 4: big ingests starve searches


def test_writes_run_on_the_services_own_writer_thread(run_dir: Path, images: np.ndarray, tmp_path: Path,
                                                       monkeypatch) -> None:
    """Ingests and class changes wait for the writer lock on one thread of their own, never holding the shared
    worker threads that /search and /items use (120 concurrent ingests held 40 of 40 and /search took 19 s)."""
    import threading

    from logitsep.serve.service import Service

    seen: list[str] = []
    real = Service.ingest

    def ingest(self, pngs, on_commit=None):
        seen.append(threading.current_thread().name)
        return real(self, pngs, on_commit)

    monkeypatch.setattr(Service, "ingest", ingest)
    with make_client(run_dir, tmp_path / "index") as c:
        for _ in range(3):
            assert c.post("/ingest", json={"images": pngs(images[:2])}).status_code == 200
        c.app.state.service.close()
    assert len(seen) == 3 and all(name.startswith("logitsep-writer") for name in seen), seen


def test_an_ingest_costs_the_same_fsyncs_whatever_its_number_of_images(run_dir: Path, images: np.ndarray,
                                                                       tmp_path: Path, monkeypatch) -> None:
    """Finding 4: each image cost one fsync (120 concurrent 256-image ingests starved searches); a request's images
    are now made durable together, so the fsyncs of an ingest do not grow with its images."""
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    with make_client(run_dir, tmp_path / "index") as c:
        counts = []
        for batch in (images[:1], images[1:33]):
            calls.clear()
            assert c.post("/ingest", json={"images": pngs(batch)}).status_code == 200
            counts.append(len(calls))
        for i in (0, 1, 32):  # every image served as it was ingested
            served = np.asarray(Image.open(io.BytesIO(c.get(f"/items/{i}.png").content)))
            np.testing.assert_array_equal(served, images[i])
        c.app.state.service.close()
    assert counts[1] == counts[0] <= 6, counts


@pytest.fixture(scope="module")
def real_server(run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``logitsep serve`` in a subprocess on a loopback port (:class:`test_serve_e2e.Server`)."""
    from test_serve_e2e import Server

    server = Server(run_dir, tmp_path_factory.mktemp("serve") / "index")
    yield server
    server.stop()


def _closed_after(sock, timeout: float) -> float | None:
    """Seconds until the server closes ``sock`` (reads EOF or a reset), None if still open after ``timeout``."""
    import socket
    import time

    began = time.monotonic()
    sock.settimeout(0.25)
    while time.monotonic() - began < timeout:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - began
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - began
        except socket.timeout:  # noqa: UP041  (an alias of TimeoutError)
            continue
    return None


def test_idle_and_half_sent_connections_are_closed(real_server) -> None:
    """Finding 6: 1,000 half-open connections were all still held after 25 s (file descriptors run out). A
    connection that sends nothing, or half a request head, or stays idle after a response, is closed within
    seconds."""
    import socket

    port = real_server.port
    silent = socket.create_connection(("127.0.0.1", port))
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"GET /hea")
    kept = socket.create_connection(("127.0.0.1", port))
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        for sock in (silent, partial, trickle, kept):
            waited = _closed_after(sock, 15.0)
            assert waited is not None, "still open after 15 s"
    finally:
        for sock in (silent, partial, trickle, kept):
            sock.close()


def test_a_malformed_content_length_gets_a_json_400(real_server) -> None:
    """Finding 7: uvicorn answered a non-numeric Content-Length with a plain-text 400."""
    import json
    import socket

    with socket.create_connection(("127.0.0.1", real_server.port), timeout=10) as sock:
        sock.sendall(b"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: abc\r\n\r\n{}")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    assert b"content-type: application/json" in head.lower()
    assert "error" in json.loads(body)


def test_a_killed_demos_temporary_index_is_removed_at_the_next_start(tmp_path: Path, monkeypatch) -> None:
    """Finding 7: ``serve --demo`` killed with -9 left its temporary index behind (~160 MB an hour of feed). Its
    folder names the owning process; the next demo removes the folders of processes that are gone."""
    import subprocess
    import sys
    import tempfile

    from logitsep.cli import serve as serve_cli

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"logitsep-demo-index-{gone.pid}-abc123"
    (stale / "images").mkdir(parents=True)
    (stale / "vectors.f32").write_bytes(b"\0" * 64)
    live = tmp_path / f"logitsep-demo-index-{os.getppid()}-def456"  # a running process (pytest's parent)
    live.mkdir()
    other = tmp_path / "logitsep-demo-index-notapid"  # not one of ours by its name: kept
    other.mkdir()
    folder = Path(serve_cli.demo_index_folder())
    assert folder.is_dir() and folder.name.startswith(f"logitsep-demo-index-{os.getpid()}-")
    assert folder.stat().st_mode & 0o077 == 0
    assert not stale.exists() and live.is_dir() and other.is_dir()


def test_every_response_forbids_framing_and_sniffing(run_dir: Path, tmp_path: Path) -> None:
    """Finding 7: only ``/`` had a content security policy, without ``frame-ancestors``. Every answer (API, page,
    docs, static files, errors) now carries one that forbids framing, and ``nosniff``."""
    with make_client(run_dir, tmp_path / "index", allowed_hosts=frozenset({"testserver"})) as c:
        answers = [c.get(p) for p in ("/health", "/classes", "/openapi.json", "/docs", "/", "/static/app.js",
                                      "/search?class_id=99", "/nowhere")]
        answers += [c.options("/classes"), c.post("/ingest", content=b"x" * 10, headers={"content-length": "abc"}),
                    c.get("/health", headers={"host": "evil.example"})]
        for r in answers:
            csp = r.headers.get("content-security-policy", "")
            assert "frame-ancestors 'none'" in csp, (r.request.url, r.status_code, csp)
            assert r.headers.get("x-content-type-options") == "nosniff", r.request.url
        assert "default-src 'none'" in c.get("/health").headers["content-security-policy"]
        c.app.state.service.close()


def test_docs_load_pinned_swagger_ui_with_subresource_integrity(run_dir: Path, tmp_path: Path) -> None:
    """Finding 7: /docs loaded Swagger UI from a CDN by a floating version (``@5``) without ``integrity``: a
    compromised CDN ran its script on the service's origin. Now a pinned version, sha384 hashes, crossorigin,
    no inline script, and a policy that allows scripts only from this origin and the CDN."""
    import re

    with make_client(run_dir, tmp_path / "index") as c:
        r = c.get("/docs")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        tags = re.findall(r"<(?:script|link)\b[^>]*>", html)
        remote = [t for t in tags if "https://" in t]
        assert len(remote) == 2, tags
        for tag in remote:
            assert re.search(r'(?:src|href)="https://cdn\.jsdelivr\.net/npm/swagger-ui-dist@\d+\.\d+\.\d+/', tag), tag
            assert re.search(r'integrity="sha384-[A-Za-z0-9+/]{64}"', tag) and 'crossorigin="anonymous"' in tag, tag
        assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html)  # no inline script: the page's own is a file
        csp = r.headers["content-security-policy"]
        script_src = re.search(r"script-src ([^;]*)", csp).group(1).split()
        assert set(script_src) == {"'self'", "https://cdn.jsdelivr.net"}, csp
        assert c.get("/redoc").status_code == 404  # the other CDN page (no integrity) is gone
        init = re.search(r'<script src="(/static/[^"]+)"', html).group(1)
        assert c.get(init).status_code == 200 and "/openapi.json" in c.get(init).text
        c.app.state.service.close()


def test_stored_items_are_readable_by_their_owner_only(run_dir: Path, images: np.ndarray, tmp_path: Path) -> None:
    """Finding 7: the ingested images and the index were readable by every local user (0644 files in 0755 folders).
    The serve folder and its images/ are 0700 (an existing folder is tightened), the image packs 0600."""
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    for folder in (tmp_path / "index", existing):
        with make_client(run_dir, folder) as c:
            assert c.post("/ingest", json={"images": pngs(images[:3])}).status_code == 200
            c.app.state.service.close()
        assert folder.stat().st_mode & 0o777 == 0o700, oct(folder.stat().st_mode)
        assert (folder / "images").stat().st_mode & 0o777 == 0o700
        stored = [p for p in (folder / "images").iterdir()]
        assert stored and all(p.stat().st_mode & 0o077 == 0 for p in stored), [oct(p.stat().st_mode) for p in stored]


def test_a_retried_ingest_with_the_same_idempotency_key_stores_nothing_new(run_dir: Path, images: np.ndarray,
                                                                          tmp_path: Path, monkeypatch) -> None:
    """Finding 7: a retried ingest (the answer lost, the client sends again) stored its images twice. With an
    ``Idempotency-Key`` the first answer comes back and nothing is stored again, also after a restart; the key
    belongs to the token; the keys kept are bounded."""
    folder = tmp_path / "index"
    first = {"images": pngs(images[:3])}
    key = {"Idempotency-Key": "order-17"}
    auth = {"Authorization": "Bearer s3cret"}
    with make_client(run_dir, folder, token="s3cret") as c:
        schema = c.get("/openapi.json").json()
        assert "Idempotency-Key" in [p["name"] for p in schema["paths"]["/ingest"]["post"]["parameters"]]
        r = c.post("/ingest", json=first, headers={**key, **auth})
        assert r.status_code == 200 and r.json()["ids"] == [0, 1, 2] and "idempotent-replayed" not in r.headers
        again = c.post("/ingest", json=first, headers={**key, **auth})
        assert again.json() == r.json() and again.headers["idempotent-replayed"] == "true"
        other = c.post("/ingest", json={"images": pngs(images[3:5])}, headers={**key, **auth})
        assert other.status_code == 422 and "Idempotency-Key" in other.json()["error"]
        assert c.post("/ingest", json=first, headers=auth).json()["ids"] == [3, 4, 5]  # no key: stored again
        service = c.app.state.service

        def crash(vectors: object) -> int:
            raise OSError("disk full")

        original, service.index.append = service.index.append, crash
        failed = {"images": pngs(images[6:8])}
        assert c.post("/ingest", json=failed, headers={"Idempotency-Key": "k2", **auth}).status_code == 500
        service.index.append = original
        retried = c.post("/ingest", json=failed, headers={"Idempotency-Key": "k2", **auth})
        assert retried.json()["ids"] == [6, 7] and "idempotent-replayed" not in retried.headers  # stored now
        assert c.get("/stats").json()["items"] == 8
        service.close()
    assert (folder / "idempotency.json").stat().st_mode & 0o077 == 0
    with make_client(run_dir, folder, token="s3cret") as c:  # after a restart: the same answers
        again = c.post("/ingest", json=first, headers={**key, **auth})
        assert again.json() == r.json() and again.headers["idempotent-replayed"] == "true"
        assert c.post("/ingest", json=failed, headers={"Idempotency-Key": "k2", **auth}).json()["ids"] == [6, 7]
        assert c.get("/stats").json()["items"] == 8
        c.app.state.service.close()
    with make_client(run_dir, folder, token="an0ther") as c:  # another token: its own keys
        r2 = c.post("/ingest", json=first, headers={**key, "Authorization": "Bearer an0ther"})
        assert r2.json()["ids"] == [8, 9, 10]
        from logitsep.serve import idempotency

        monkeypatch.setattr(idempotency, "MAX_KEYS", 3)
        for i in range(5):
            c.post("/ingest", json={"images": pngs(images[i:i + 1])},
                   headers={"Idempotency-Key": f"n{i}", "Authorization": "Bearer an0ther"})
        c.app.state.service.close()
    import json

    assert len(json.loads((folder / "idempotency.json").read_text())["keys"]) == 3
