"""``POST /classes`` and ``DELETE /classes/{id}``: enrolling a class over HTTP, searching for it, restarting, and
bad enrollments that change nothing. Scores are checked against a float64 matrix product of the stored row."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from logitsep.classifier import SingleLogitClassifier  # noqa: E402
from logitsep.core.images import encode_png  # noqa: E402
from logitsep.enrollment import ENROLLED  # noqa: E402
from logitsep.serve.app import create_app  # noqa: E402
from logitsep.serve.requests import MAX_IMAGES  # noqa: E402
from logitsep.serve.service import Service, dataset_images  # noqa: E402
from test_serve_api import _train, b64, make_client, pngs  # noqa: E402


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("run"), "batch_ce", 300, 0.1)


@pytest.fixture
def run_dir(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return dataset_images("digits", "test", (64,))


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    from logitsep.data import load_dataset

    return np.asarray(load_dataset("digits").test_y)


def reference_scores(run: Path, images: np.ndarray, row: int) -> np.ndarray:
    clf = SingleLogitClassifier.from_run(run, enrolled=False)
    stored = load_file(str(run / ENROLLED))
    with torch.no_grad():
        h = clf.embed(torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 256.0)).double()
    return (h @ stored["weight"][row].double() + stored["bias"][row].double()).numpy()


def test_enroll_search_restart_search(run_dir: Path, tmp_path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    sevens = images[labels == 7]
    with make_client(run_dir, tmp_path / "index") as c:
        c.post("/ingest", json={"images": pngs(images[:200])})
        reply = c.post("/classes", json={"name": "sevens", "images": pngs(sevens[:5])})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["id"] == 10 and body["examples"] == 5
        classes = c.get("/classes").json()
        assert classes["classes"][10] == {"id": 10, "name": "sevens", "threshold": classes["threshold"],
                                          "enrolled": True}
        assert body["threshold"] == classes["threshold"]
        found = c.get("/search", params={"class_id": 10}).json()
        again = c.get("/search", params={"class_id": 10}).json()  # the cached column
        c.app.state.service.close()
    ref = reference_scores(run_dir, images[:200], 0)
    t = classes["threshold"]
    ids = [i["id"] for i in found["items"]]
    assert set(ids) ^ set(np.flatnonzero(ref >= t)) <= set(np.flatnonzero(np.abs(ref - t) < 1e-4))
    assert ids and sum(labels[i] == 7 for i in ids) >= 0.8 * len(ids)
    assert [i["id"] for i in again["items"]] == ids
    # restart: a new service over the same run and folder gives the same answer
    with make_client(run_dir, tmp_path / "index") as c:
        assert c.get("/classes").json()["classes"][10]["name"] == "sevens"
        assert c.get("/search", params={"class_id": 10}).json()["items"] == found["items"]
        c.app.state.service.close()


def test_bad_enrollments_get_4xx_and_change_nothing(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    with make_client(run_dir, tmp_path / "index") as c:
        ok = pngs(images[:3])
        assert c.post("/classes", json={"name": "kept", "images": ok}).status_code == 200
        before = (run_dir / ENROLLED).read_bytes()
        wrong_size = b64(encode_png(np.zeros((9, 9), dtype=np.uint8)))
        cases = [({"name": "x", "images": []}, 422), ({"name": "", "images": ok}, 422),
                 ({"name": "kept", "images": ok}, 409), ({"name": "3", "images": ok}, 409),
                 ({"name": "12", "images": ok}, 409), ({"name": "x", "images": [wrong_size]}, 422),
                 ({"name": "x", "images": ["not base64!"]}, 400), ({"name": "x", "images": [b64(b"no png")]}, 400),
                 ({"name": "x", "images": ok * (MAX_IMAGES // 3 + 1)}, 422), ({"name": "x" * 201, "images": ok}, 422),
                 ({"images": ok}, 422), ({"name": 5, "images": ok}, 422)]
        for body, status in cases:
            r = c.post("/classes", json=body)
            assert r.status_code == status and "error" in r.json(), (body.get("name"), r.status_code, r.text)
        assert (run_dir / ENROLLED).read_bytes() == before
        assert [x["name"] for x in c.get("/classes").json()["classes"]][10:] == ["kept"]
        c.app.state.service.close()


def test_delete_enrolled_only(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    with make_client(run_dir, tmp_path / "index") as c:
        c.post("/classes", json={"name": "a", "images": pngs(images[:2])})
        c.post("/classes", json={"name": "b", "images": pngs(images[2:4])})
        assert c.delete("/classes/3").status_code == 409
        assert c.delete("/classes/12").status_code == 404
        assert c.delete("/classes/-1").status_code == 422  # outside the schema (ids >= 0)
        r = c.delete("/classes/10")
        assert r.status_code == 200 and r.json() == {"removed": 10, "name": "a"}
        names = [x["name"] for x in c.get("/classes").json()["classes"]]
        assert names[10:] == ["b"] and c.get("/search", params={"class_id": 11}).status_code == 404
        c.app.state.service.close()
    assert SingleLogitClassifier.from_run(run_dir).class_names[10:] == ["b"]


def test_token_guards_class_changes(run_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    with make_client(run_dir, tmp_path / "index", token="s3cret") as c:
        body = {"name": "x", "images": pngs(images[:2])}
        assert c.post("/classes", json=body).status_code == 401
        assert c.delete("/classes/10").status_code == 401
        ok = c.post("/classes", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        c.app.state.service.close()


def test_openapi_documents_class_routes(run_dir: Path, tmp_path: Path) -> None:
    service = Service(SingleLogitClassifier.from_run(run_dir), tmp_path / "index")
    with TestClient(create_app(service)) as c:
        schema = c.get("/openapi.json").json()
        assert "post" in schema["paths"]["/classes"] and "delete" in schema["paths"]["/classes/{class_id}"]
        assert schema["components"]["schemas"]["EnrollRequest"]["properties"]["images"]["maxItems"] == MAX_IMAGES
    service.close()
