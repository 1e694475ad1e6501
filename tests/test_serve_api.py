"""The web service through the ASGI test client: every route, bad input, atomic ingest, restart recovery.

Scores are checked against a float64 forward pass of the whole model (all logits, ``model(x)[:, c]``), a
different path from the service's (embedding once, then one inner product with ``[W_c, b_c]``).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

with warnings.catch_warnings():  # recent Starlette prefers httpx2 for its test client; httpx works the same
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from logitsep.classifier import SingleLogitClassifier, calibrate_run  # noqa: E402
from logitsep.core.images import encode_png, image_layout  # noqa: E402
from logitsep.search.select import select  # noqa: E402
from logitsep.serve.app import create_app  # noqa: E402
from logitsep.serve.cache import ScoreCache  # noqa: E402
from logitsep.serve.requests import MAX_IMAGES, BadInput  # noqa: E402
from logitsep.serve.service import Service, dataset_images  # noqa: E402
from logitsep.train import TrainConfig, train  # noqa: E402


def _train(out: Path, loss: str, steps: int, lr: float) -> Path:
    config = TrainConfig(dataset="digits", model="mlp", loss=loss, steps=steps, lr=lr, batch_size=64, seed=0)
    train(config, out=out, progress=False, eval_splits=())
    calibrate_run(out)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("run"), "batch_ce", 150, 0.03)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The digits test split as 8×8 uint8 images."""
    return dataset_images("digits", "test", (64,))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pngs(images: np.ndarray) -> list[str]:
    return [b64(encode_png(img)) for img in images]


def reference_logits(run: Path, images: np.ndarray) -> np.ndarray:
    """All logits of every image in float64 through the model's full forward pass: [n, k]."""
    model = copy.deepcopy(SingleLogitClassifier.from_run(run).model).double().eval()
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float64) / 256.0)
    with torch.no_grad():
        return model(x).numpy()


def make_client(run: Path, folder: Path, score_cache: int = 1 << 20, **kwargs) -> TestClient:
    service = Service(SingleLogitClassifier.from_run(run), folder, score_cache=score_cache)
    return TestClient(create_app(service, **kwargs), raise_server_exceptions=False)


@pytest.fixture
def client(run_dir: Path, tmp_path: Path):
    with make_client(run_dir, tmp_path / "index") as c:
        yield c
        c.app.state.service.close()


def image_files(folder: Path) -> list[str]:
    """The stored images, as ``{id}.png`` (a file each in older folders, one pack per ingest now), and any other
    file of the folder by its name."""
    from logitsep.serve.service import stored_images

    others = [p.name for p in (folder / "images").iterdir() if p.suffix not in (".png", ".pngs")]
    return sorted([f"{i}.png" for i in stored_images(folder / "images")] + others)


# ------------------------------------------------------------------------------------------------ routes


def test_health_classes_and_page(client: TestClient, run_dir: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    body = client.get("/classes").json()
    saved = json.loads((run_dir / "thresholds.json").read_text())
    assert [c["id"] for c in body["classes"]] == list(range(10))
    assert [c["name"] for c in body["classes"]] == [str(i) for i in range(10)]
    assert [c["threshold"] for c in body["classes"]] == [c["threshold"] for c in saved["classes"]]
    assert body["threshold"] == saved["global"]["threshold"] and body["total"] == 0
    lo, hi = body["score_range"]
    assert lo < body["threshold"] < hi
    page = client.get("/")
    assert page.status_code == 200 and 'id="class-select"' in page.text and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "EventSource" in client.get("/static/app.js").text
    assert client.get("/stats").json() == {"items": 0, "ingested": 0, "subscribers": 0, "dropped": 0}


def test_openapi_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/health", "/classes", "/search", "/query", "/ingest", "/stream", "/items/{item_id}.png",
            "/stats"} <= set(schema["paths"])
    assert {"QueryRequest", "IngestRequest", "SearchResult", "QueryResult", "IngestResult", "Error"} <= set(
        schema["components"]["schemas"])
    params = {p["name"] for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert params == {"class_id", "threshold", "top_k"}
    assert "securitySchemes" not in schema["components"]  # no --token: no bearer (test_serve_faults, with one)


def test_ingest_search_and_query_match_the_full_forward_pass(client: TestClient, run_dir: Path,
                                                               images: np.ndarray) -> None:
    batch = images[:60]
    reply = client.post("/ingest", json={"images": pngs(batch[:25])}).json()
    assert reply == {"added": 25, "total": 25, "ids": list(range(25))}
    reply = client.post("/ingest", json={"images": pngs(batch[25:])}).json()
    assert reply["total"] == 60 and reply["ids"] == list(range(25, 60))
    ref = reference_logits(run_dir, batch)
    threshold = client.get("/classes").json()["threshold"]
    for c in (0, 3, 7):
        body = client.get("/search", params={"class_id": c}).json()  # default: the global threshold
        assert body["threshold"] == threshold and body["scanned"] == 60 and body["total"] == 60
        expected = [i for i in np.argsort(-ref[:, c], kind="stable") if ref[i, c] >= threshold]
        got_ids = [it["id"] for it in body["items"]]
        assert set(got_ids) == set(expected), c
        scores = np.array([it["score"] for it in body["items"]])
        np.testing.assert_allclose(scores, ref[got_ids, c], rtol=1e-5, atol=1e-4)
        assert np.all(np.diff(scores) <= 0)
        top = client.get("/search", params={"class_id": c, "top_k": 5}).json()
        assert top["threshold"] is None
        np.testing.assert_allclose([it["score"] for it in top["items"]], np.sort(ref[:, c])[::-1][:5],
                                   rtol=1e-5, atol=1e-4)
        t = float(np.median(ref[:, c]))
        both = client.get("/search", params={"class_id": c, "threshold": t, "top_k": 7}).json()
        assert len(both["items"]) == 7 and all(it["score"] >= t for it in both["items"])
    for i in (0, 17, 42):
        for c in (1, 4):
            q = client.post("/query", json={"class_id": c, "image": pngs(batch[i:i + 1])[0]}).json()
            assert q["class_id"] == c and q["threshold"] == threshold
            assert q["score"] == pytest.approx(ref[i, c], abs=1e-4)
            assert q["match"] == (q["score"] >= threshold)
    q = client.post("/query", json={"class_id": 2, "image": pngs(batch[:1])[0], "threshold": -1e9}).json()
    assert q["match"] is True and q["threshold"] == -1e9
    assert client.get("/stats").json()["items"] == 60


def test_item_images_round_trip(client: TestClient, images: np.ndarray) -> None:
    client.post("/ingest", json={"images": pngs(images[:3])})
    for i in range(3):
        r = client.get(f"/items/{i}.png")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), images[i])
    for bad in ("3", "-1", "99"):
        r = client.get(f"/items/{bad}.png")
        assert r.status_code == 404 and "no image for item" in r.json()["error"]
    assert client.get("/items/x.png").status_code == 422


def test_data_url_prefix_and_colour_png_are_accepted(client: TestClient, images: np.ndarray,
                                                     run_dir: Path) -> None:
    rgb = np.repeat(images[5][:, :, None], 3, axis=2)
    reply = client.post("/ingest", json={"images": ["data:image/png;base64," + pngs(rgb[None])[0]]})
    assert reply.status_code == 200
    q = client.post("/query", json={"class_id": 0, "image": pngs(images[5:6])[0]}).json()
    assert q["score"] == pytest.approx(reference_logits(run_dir, images[5:6])[0, 0], abs=1e-4)


def test_cosine_head_scores_are_scaled_cosines(tmp_path: Path, images: np.ndarray) -> None:
    run = _train(tmp_path / "cos", "norm_softmax", 40, 0.1)
    with make_client(run, tmp_path / "index") as c:
        c.post("/ingest", json={"images": pngs(images[:20])})
        ref = reference_logits(run, images[:20])  # the model's forward gives cosines
        scale = SingleLogitClassifier.from_run(run).model.head.scale
        top = c.get("/search", params={"class_id": 6, "top_k": 20}).json()
        ids = [it["id"] for it in top["items"]]
        np.testing.assert_allclose([it["score"] for it in top["items"]], scale * ref[ids, 6], rtol=1e-5, atol=1e-4)
        q = c.post("/query", json={"class_id": 6, "image": pngs(images[:1])[0]}).json()
        assert q["score"] == pytest.approx(scale * ref[0, 6], abs=1e-4)
        c.app.state.service.close()


def test_search_keeps_class_scores_and_extends_them(client: TestClient, run_dir: Path, images: np.ndarray,
                                                    tmp_path: Path) -> None:
    client.post("/ingest", json={"images": pngs(images[:40])})
    first = client.get("/search", params={"class_id": 3, "top_k": 8}).json()
    again = client.get("/search", params={"class_id": 3, "top_k": 8}).json()
    assert (first["cached"], again["cached"]) == (False, True) and first["items"] == again["items"]
    client.post("/ingest", json={"images": pngs(images[40:70])})
    for params in ({"class_id": 3, "top_k": 8}, {"class_id": 3}, {"class_id": 3, "threshold": -1.0, "top_k": 5}):
        cached = client.get("/search", params=params).json()
        assert cached["cached"] and cached["scanned"] == 70
        with make_client(run_dir, tmp_path / "copy", score_cache=0) as scan:  # the same items, no cache
            scan.post("/ingest", json={"images": pngs(images[:70])})
            plain = scan.get("/search", params=params).json()
            scan.app.state.service.close()
        assert plain["cached"] is False
        assert [it["id"] for it in cached["items"]] == [it["id"] for it in plain["items"]]
        np.testing.assert_allclose([it["score"] for it in cached["items"]], [it["score"] for it in plain["items"]],
                                   rtol=1e-6, atol=1e-6)
        shutil.rmtree(tmp_path / "copy")


def test_score_columns_give_the_index_search_exactly(tmp_path: Path) -> None:
    from logitsep.search import EmbeddingIndex

    rng = np.random.default_rng(0)
    vectors = rng.integers(-3, 4, (300, 5)).astype(np.float32)  # small integers: exact scores, many ties
    queries = rng.integers(-2, 3, (3, 5)).astype(np.float32)
    index = EmbeddingIndex.create(tmp_path / "i", 5)
    cache = ScoreCache(4 * 300 * 2)  # room for two columns
    for chunk in (vectors[:100], vectors[100:101], vectors[101:]):
        index.append(chunk)
        n = len(index)
        for c, q in enumerate(queries):
            column, _ = cache.column(c, q, index.vectors)
            exact = vectors[:n].astype(np.float64) @ q
            assert column.tolist() == exact.tolist()
            for threshold in (None, 0.0, 2.5):
                for top_k in (None, 1, 7, 1000):
                    if threshold is None and top_k is None:
                        continue
                    found = select(column, threshold, top_k)
                    ids, scores = found.ids, found.scores
                    ref = index.search(q, threshold=threshold, top_k=top_k)
                    assert ids.tolist() == ref.ids.tolist() and scores.tolist() == ref.scores.tolist()
                    brute = sorted((i for i in range(n) if threshold is None or exact[i] >= threshold),
                                   key=lambda i: (-exact[i], i))[:top_k]
                    assert ids.tolist() == brute
        held = sum(4 * len(entry[1]) for entry in cache._columns.values())
        assert held <= cache.budget or len(cache._columns) == 1  # least recently used columns were dropped
    assert len(cache._columns) < len(queries)
    assert ScoreCache(100).column(0, queries[0], index.vectors) is None  # one column would not fit
    index.close()


# ------------------------------------------------------------------------------------------------ bad input


def _png_with_bad_crc(img: np.ndarray) -> bytes:
    data = bytearray(encode_png(img))
    data[-20] ^= 0xFF  # inside the IDAT chunk: zlib / CRC failure
    return bytes(data)


def _png_16bit(shape: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros(shape, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_huge_header() -> bytes:
    """A PNG that claims to be 100000×100000 pixels (a decompression bomb): only its header is valid."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD_IMAGES = [
    ("not base64!", 400, "malformed base64"),
    (b64(b"GIF89a not a png"), 400, "not a PNG"),
    (b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), 400, "corrupt PNG"),
    (None, 400, "corrupt PNG"),  # a valid PNG with a damaged IDAT chunk (filled in below)
    (b64(encode_png(np.zeros((9, 8), np.uint8))), 422, "wrong image size 8x9, the model takes 8x8"),
    (b64(_png_huge_header()), 422, "wrong image size"),
    (b64(_png_16bit((8, 8))), 422, "unsupported PNG mode"),
    ("", 422, "at least 1 character"),  # the schema says so (issue 20: it was schema-valid, then refused)
]


@pytest.mark.parametrize(("image", "status", "message"), BAD_IMAGES)
def test_bad_images_are_refused_and_nothing_is_added(client: TestClient, images: np.ndarray, tmp_path: Path,
                                                     image: str | None, status: int, message: str) -> None:
    image = b64(_png_with_bad_crc(images[0])) if image is None else image
    client.post("/ingest", json={"images": pngs(images[:4])})
    before = image_files(tmp_path / "index")
    r = client.post("/ingest", json={"images": [*pngs(images[4:7]), image]})  # three good images, then the bad one
    assert r.status_code == status and message in r.json()["error"] and "images[3]" in r.json()["error"]
    r = client.post("/query", json={"class_id": 1, "image": image})
    assert r.status_code == status and message in r.json()["error"] and r.json()["error"].startswith("image:")
    assert client.get("/stats").json()["items"] == 4
    assert image_files(tmp_path / "index") == before == [f"{i}.png" for i in range(4)]


@pytest.mark.parametrize(("method", "url", "body", "status", "message"), [
    ("get", "/search?class_id=10", None, 404, "unknown class_id 10"),  # no such class: 404 (issue 20)
    ("get", "/search?class_id=-1", None, 422, "greater than or equal to 0"),  # outside the schema
    ("get", "/search?class_id=abc", None, 422, "class_id (query)"),
    ("get", "/search", None, 422, "class_id (query): Field required"),
    ("get", "/search?class_id=1&threshold=abc", None, 422, "threshold (query)"),
    ("get", "/search?class_id=1&threshold=nan", None, 422, "finite number"),
    ("get", "/search?class_id=1&threshold=inf", None, 422, "finite number"),
    ("get", "/search?class_id=1&top_k=0", None, 422, "top_k (query)"),
    ("get", "/search?class_id=1&top_k=1.5", None, 422, "top_k (query)"),
    ("get", "/stream?class_id=99", None, 404, "unknown class_id 99"),
    ("get", "/stream?class_id=1&threshold=x", None, 422, "threshold (query)"),
    ("post", "/query", {"class_id": 12, "image": "AAAA"}, 404, "unknown class_id 12"),
    ("post", "/query", {"class_id": "3", "image": "AAAA"}, 422, "class_id: Input should be a valid integer"),
    ("post", "/query", {"class_id": True, "image": "AAAA"}, 422, "class_id"),
    ("post", "/query", {"image": "AAAA"}, 422, "class_id: Field required"),
    ("post", "/query", {"class_id": 1, "image": "AAAA", "threshold": "high"}, 422, "threshold"),
    ("post", "/query", {"class_id": 1, "image": 7}, 422, "image: Input should be a valid string"),
    ("post", "/ingest", {"images": []}, 422, "images: List should have at least 1 item"),
    ("post", "/ingest", {"images": "AAAA"}, 422, "images: Input should be a valid list"),
    ("post", "/ingest", {"images": ["AAAA"] * 1025}, 422, "at most 1024"),
    ("post", "/ingest", [1, 2], 422, "Input should be a valid dictionary"),
    ("post", "/ingest", b"{not json", 400, "body: malformed JSON"),
    ("post", "/ingest", b"x" * (9 << 20), 413, "request body too large"),
])
def test_bad_requests_get_a_json_error(client: TestClient, method: str, url: str, body: object, status: int,
                                       message: str) -> None:
    if isinstance(body, bytes):
        r = client.request(method, url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.request(method, url, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert client.get("/stats").json()["items"] == 0


def test_body_limit_without_content_length(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    with make_client(run_dir, tmp_path / "index", max_body=2000) as c:
        def chunks():
            yield b'{"images": ["'
            yield b"A" * 4000
            yield b'"]}'

        r = c.post("/ingest", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over 2000 bytes" in r.json()["error"]
        assert c.post("/ingest", json={"images": pngs(images[:1])}).status_code == 200
        c.app.state.service.close()


def test_token_guards_ingest_only(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    with make_client(run_dir, tmp_path / "index", token="s3cret") as c:
        body = {"images": pngs(images[:2])}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/ingest", json=body, headers=headers)
            assert r.status_code == 401 and "bearer token" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/stats").json()["items"] == 0
        assert c.post("/ingest", json=body, headers={"Authorization": "Bearer s3cret"}).json()["total"] == 2
        assert c.get("/search", params={"class_id": 0, "top_k": 1}).status_code == 200
        assert c.post("/query", json={"class_id": 0, "image": body["images"][0]}).status_code == 200
        c.app.state.service.close()


def test_exactly_max_images_are_accepted(client: TestClient, run_dir: Path, images: np.ndarray) -> None:
    """The limit is inclusive: a request of exactly ``MAX_IMAGES`` images is served (one more is refused, as
    ``test_bad_requests_get_a_json_error`` checks), by the schema and by the service alike."""
    many = np.resize(images, (MAX_IMAGES, *images.shape[1:]))
    body = pngs(many)
    service = client.app.state.service
    assert service.decode([base64.b64decode(t) for t in body]).shape == (MAX_IMAGES, 8, 8)
    r = client.post("/ingest", json={"images": body})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == MAX_IMAGES and client.get("/stats").json()["items"] == MAX_IMAGES
    with pytest.raises(BadInput, match=f"at most {MAX_IMAGES}"):
        service.decode([base64.b64decode(body[0])] * (MAX_IMAGES + 1))


def test_service_refuses_bool_class_ids(run_dir: Path, tmp_path: Path) -> None:
    """``True`` is an ``int`` to Python but not a class id."""
    service = Service(SingleLogitClassifier.from_run(run_dir), tmp_path / "index")
    for bad in (True, False, 1.0, "1", None):
        with pytest.raises(BadInput, match="class_id must be an integer"):
            service.check_class(bad)
    assert service.check_class(1) == 1
    service.close()


def test_stream_announces_a_score_exactly_at_the_threshold(run_dir: Path, tmp_path: Path) -> None:
    """``match`` events are sent for scores ``>= threshold``. Items that are unit vectors score exactly one entry
    of the class vector, so a subscriber whose threshold is that entry sees a score equal to it."""
    service = Service(SingleLogitClassifier.from_run(run_dir), tmp_path / "index")

    async def scenario() -> list:
        vector = service.class_vector(3)
        order = np.argsort(-vector)
        sub = service.subscribe(3, float(vector[order[1]]))  # the second largest entry
        items = np.eye(len(vector), dtype=np.float32)[order[:3]]  # scores: largest, second (= threshold), third
        service.publish(0, items, 3)
        return [d for k, d in (sub.queue.get_nowait() for _ in range(sub.queue.qsize())) if k == "match"]

    matches = asyncio.run(scenario())
    assert [m["id"] for m in matches] == [0, 1]
    service.close()


# ------------------------------------------------------------------------------------------------ durability


def test_failed_image_write_adds_no_index_rows(run_dir: Path, tmp_path: Path, images: np.ndarray,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The images of an ingest are written before the index append that commits them: when writing an image
    fails, the index is unchanged (no row without its image), and a retry succeeds."""
    from logitsep.serve import service as service_module

    folder = tmp_path / "index"
    with make_client(run_dir, folder) as c:
        c.post("/ingest", json={"images": pngs(images[:3])})

        def failing(path, pngs, mode=0o600):  # the images of the request cannot be written
            raise OSError("no space left for the images")

        monkeypatch.setattr(service_module, "write_pack", failing)
        r = c.post("/ingest", json={"images": pngs(images[3:6])})
        assert r.status_code == 500
        monkeypatch.undo()
        assert c.get("/stats").json()["items"] == 3
        assert len(c.app.state.service.index) == 3
        assert c.post("/ingest", json={"images": pngs(images[3:6])}).json()["ids"] == [3, 4, 5]
        c.app.state.service.close()
    with make_client(run_dir, folder) as c:  # after a restart: every row has its image
        assert c.get("/stats").json()["items"] == 6
        assert image_files(folder) == sorted(f"{i}.png" for i in range(6))
        assert not [p for p in (folder / "images").iterdir() if p.name.startswith(".")]  # no temporary file left
        c.app.state.service.close()


# ------------------------------------------------------------------------------------------------ durability


def test_failed_append_adds_nothing_and_orphans_are_never_served(run_dir: Path, tmp_path: Path,
                                                                 images: np.ndarray) -> None:
    folder = tmp_path / "index"
    with make_client(run_dir, folder) as c:
        c.post("/ingest", json={"images": pngs(images[:3])})
        service = c.app.state.service

        def crash(vectors: object) -> int:
            raise OSError("disk full")

        original, service.index.append = service.index.append, crash
        r = c.post("/ingest", json={"images": pngs(images[3:6])})
        assert r.status_code == 500
        service.index.append = original
        assert c.get("/stats").json()["items"] == 3
        assert c.get("/items/3.png").status_code == 404  # written before the failed commit, never served
        assert c.get("/search", params={"class_id": 0, "top_k": 10}).json()["scanned"] == 3
        reply = c.post("/ingest", json={"images": pngs(images[6:7])}).json()
        assert reply["ids"] == [3]  # the orphan's id is reused, its file replaced
        r = c.get("/items/3.png")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), images[6])
        service.close()


def test_restart_recovers_a_consistent_index(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    folder = tmp_path / "index"
    with make_client(run_dir, folder) as c:
        c.post("/ingest", json={"images": pngs(images[:10])})
        before = c.get("/search", params={"class_id": 2, "top_k": 10}).json()["items"]
        c.app.state.service.close()
    # an interrupted ingest: its images written, half of its rows written, the header not committed
    (folder / "images" / "10.png").write_bytes(encode_png(images[10]))
    (folder / "images" / "11.png").write_bytes(b"partial")
    (folder / "images" / ".11.png.abc.tmp").write_bytes(b"partial")
    with open(folder / "vectors.f32", "ab") as f:
        f.write(b"\x00" * 1000)
    with make_client(run_dir, folder) as c:
        assert c.get("/stats").json()["items"] == 10
        assert c.get("/search", params={"class_id": 2, "top_k": 10}).json()["items"] == before
        assert image_files(folder) == sorted(f"{i}.png" for i in range(10))
        assert c.post("/ingest", json={"images": pngs(images[10:12])}).json()["ids"] == [10, 11]
        assert c.get("/search", params={"class_id": 2, "top_k": 20}).json()["scanned"] == 12
        c.app.state.service.close()


def test_index_of_another_model_is_refused(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    folder = tmp_path / "index"
    with make_client(run_dir, folder) as c:
        c.post("/ingest", json={"images": pngs(images[:2])})
        c.app.state.service.close()
    other = _train(tmp_path / "other", "batch_ce", 5, 0.03)
    with pytest.raises(ValueError, match="another model"):
        Service(SingleLogitClassifier.from_run(other), folder)
    Service(SingleLogitClassifier.from_run(run_dir), folder).close()  # the right model still opens it


def test_run_without_thresholds_is_refused(run_dir: Path, tmp_path: Path) -> None:
    clf = SingleLogitClassifier.from_run(run_dir, load_thresholds=False)
    with pytest.raises(ValueError, match="logitsep calibrate"):
        Service(clf, tmp_path / "index")


def test_an_index_built_from_a_split_serves_its_images(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    from logitsep.search import build_index

    build_index(run_dir, tmp_path / "built", split="test", progress=False).close()
    with make_client(run_dir, tmp_path / "built") as c:
        assert c.get("/stats").json()["items"] == len(images)
        r = c.get("/items/7.png")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), images[7])
        reply = c.post("/ingest", json={"images": pngs(images[:1])}).json()
        assert reply["ids"] == [len(images)]
        ref = reference_logits(run_dir, images)
        top = c.get("/search", params={"class_id": 4, "top_k": 3}).json()["items"]
        assert [it["id"] for it in top] == list(np.argsort(-ref[:, 4], kind="stable")[:3])
        c.app.state.service.close()


# ------------------------------------------------------------------------------------------------ stream logic


def test_publish_announces_exactly_the_matches(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    service = Service(SingleLogitClassifier.from_run(run_dir), tmp_path / "index")
    ref = reference_logits(run_dir, images[:40])
    t = float(np.sort(ref[:, 5])[-9:-7].mean())  # between the 8th and 9th best: 8 matches, far from rounding

    async def scenario() -> tuple[list, list, int]:
        sub5, sub_default = service.subscribe(5, t), service.subscribe(1)
        await service.ingest_async([encode_png(img) for img in images[:40]])
        events = [sub5.queue.get_nowait() for _ in range(sub5.queue.qsize())]
        default = [sub_default.queue.get_nowait() for _ in range(sub_default.queue.qsize())]
        service.unsubscribe(sub5)
        service.unsubscribe(sub5)  # twice is harmless
        return events, default, service.stats()["subscribers"]

    events, default, left = asyncio.run(scenario())
    matches = [data for kind, data in events if kind == "match"]
    assert sorted(m["id"] for m in matches) == np.flatnonzero(ref[:, 5] >= t).tolist()
    assert len(matches) == 8
    assert all(m["class_id"] == 5 and m["class"] == "5" and m["score"] >= t for m in matches)
    assert events[-1] == ("ingest", {"added": 40, "total": 40, "time": events[-1][1]["time"]})
    expected = np.flatnonzero(ref[:, 1] >= service.threshold).tolist()  # default: the global threshold
    assert sorted(d["id"] for k, d in default if k == "match") == expected
    assert left == 1
    service.close()


def test_demo_feed_ingests_the_test_split_in_order(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    from logitsep.serve.demo import feed

    service = Service(SingleLogitClassifier.from_run(run_dir), tmp_path / "index")
    asyncio.run(feed(rate=500.0, limit=30, log=lambda s: None)(service))
    assert len(service.index) == 30
    for i in (0, 13, 29):
        image = service.image(i)  # PNG bytes of the ingest's pack (a path for an image file of an older folder)
        stored = np.asarray(Image.open(io.BytesIO(image) if isinstance(image, bytes) else image))
        np.testing.assert_array_equal(stored, images[i])
    with pytest.raises(ValueError, match="rate must be a positive"):
        feed(rate=0)
    service.close()


# ------------------------------------------------------------------------------------------------ helpers


def test_dataset_images_invert_the_loaders_scaling() -> None:
    from logitsep.data import load_dataset

    x, _ = load_dataset("digits").split("test")
    pixels = dataset_images("digits", "test", (64,))
    assert pixels.dtype == np.uint8 and pixels.shape == (len(x), 8, 8)
    expected = [min(255, round(float(v) * 256)) for v in x.flatten()[:500]]
    assert pixels.reshape(-1)[:500].tolist() == expected


def test_image_layout(run_dir: Path, tmp_path: Path) -> None:
    assert image_layout((784,)) == (1, 28, 28)
    assert image_layout((3, 32, 24)) == (3, 32, 24)
    assert image_layout((5, 7)) == (1, 5, 7)
    for bad in ((10,), (2, 3, 4, 5), ()):
        assert image_layout(bad) is None
    clf = SingleLogitClassifier.from_run(run_dir)
    clf.input_shape = (10,)  # a model that takes no images: served for search, its image routes refuse
    service = Service(clf, tmp_path / "index")
    with pytest.raises(BadInput, match="cannot serve images"):
        service.decode([b"x"], "image")
    assert service.image(0) is None and service.search(0, top_k=3)["items"] == []
    service.close()


def test_cli_parses_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitsep.cli import build_parser

    monkeypatch.delenv("LOGITSEP_TOKEN", raising=False)
    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.run, args.host, args.port, args.token, args.demo, args.rate) == ("runs/x", "127.0.0.1", 8000, None,
                                                                                 False, 20.0)
    with pytest.raises(SystemExit):
        args = build_parser().parse_args(["serve"])
        args.func(args)


def test_nothing_is_unpickled() -> None:
    import logitsep.serve as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "pickle" not in text and "torch.load" not in text and "allow_pickle=True" not in text, path
    assert os.path.isfile(Path(pkg.__file__).parent / "static" / "index.html")
