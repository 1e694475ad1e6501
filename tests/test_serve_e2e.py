"""End to end: the real server (``python -m logitsep.cli serve``) on a loopback port, driven over HTTP.

Ingest images, read the server-sent events of ``/stream``, compare with ``/search`` and with a float64 forward
pass of the model; kill the server mid-life and restart it on the same index; stop it with a stream open.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx  # noqa: E402
import numpy as np
import pytest
import torch

from logitsep.classifier import SingleLogitClassifier, calibrate_run  # noqa: E402
from logitsep.core.images import encode_png  # noqa: E402
from logitsep.serve.service import dataset_images  # noqa: E402
from logitsep.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="digits", loss="batch_ce", steps=150, lr=0.03, batch_size=64), out=out,
          progress=False, eval_splits=())
    calibrate_run(out)
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return dataset_images("digits", "test", (64,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``logitsep serve RUN --index DIR`` in a subprocess on a free loopback port."""

    def __init__(self, run: Path, index: Path, *extra: str) -> None:
        self.folder = index
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("LOGITSEP_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "logitsep.cli", "serve", str(run), "--index", str(index),
                                      "--port", str(self.port), "--log-level", "warning", *extra],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).json() == {"status": "ok"}:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not come up")

    def get(self, path: str, **params) -> dict:
        return httpx.get(self.base + path, params=params, timeout=30).json()

    def ingest(self, images: np.ndarray) -> dict:
        body = {"images": [base64.b64encode(encode_png(img)).decode() for img in images]}
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.post(self.base + "/ingest", json=body, headers=headers, timeout=30).json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


class Listener(threading.Thread):
    """Reads ``/stream`` server-sent events into ``events`` until ``ingests`` ingest events have arrived."""

    def __init__(self, url: str, ingests: int) -> None:
        super().__init__(daemon=True)
        self.url, self.ingests = url, ingests
        self.events: list[tuple[str, dict, str | None]] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(10, read=60)) as response:
                self.status = response.status_code
                assert response.headers["content-type"].startswith("text/event-stream")
                kind = data = event_id = None
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                    elif line.startswith("id: "):
                        event_id = line[4:]
                    elif line == "" and kind is not None:
                        self.events.append((kind, data, event_id))
                        kind = data = event_id = None
                        if sum(k == "ingest" for k, _, _ in self.events) >= self.ingests:
                            return
        except Exception as err:  # reported by the test
            self.error = err


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def reference(run: Path, images: np.ndarray, c: int) -> np.ndarray:
    model = SingleLogitClassifier.from_run(run).model.double().eval()
    with torch.no_grad():
        return model(torch.from_numpy(images.reshape(len(images), -1) / 256.0))[:, c].numpy()


TOKEN = "t0ken"


@pytest.fixture(scope="module")
def server(run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server for the module (starting one takes seconds): ``--token`` set, a fresh index."""
    server = Server(run_dir, tmp_path_factory.mktemp("serve") / "index", "--token", TOKEN)
    yield server
    server.stop()


def test_binds_loopback_only_by_default(server: Server) -> None:
    port = f"{server.port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as f:
        listening = [line.split()[1] for line in f if line.split()[3] == "0A"]  # state LISTEN
    assert f"0100007F:{port}" in listening  # 127.0.0.1
    assert f"00000000:{port}" not in listening  # not 0.0.0.0


def test_token_over_http(server: Server, images: np.ndarray) -> None:
    before = server.get("/stats")["items"]
    body = {"images": [base64.b64encode(encode_png(images[0])).decode()]}
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.post(server.base + "/ingest", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
    assert server.get("/stats")["items"] == before
    ok = httpx.post(server.base + "/ingest", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.json()["total"] == before + 1


def test_ingest_search_and_stream(server: Server, run_dir: Path, images: np.ndarray) -> None:
    start = server.get("/stats")["items"]
    batch = images[100:190]
    ref = reference(run_dir, batch, 3)
    t = float(np.sort(ref)[-13:-11].mean())  # 12 matches, none near the threshold
    listener = Listener(f"{server.base}/stream?class_id=3&threshold={t}", ingests=3)
    listener.start()
    assert wait_for(lambda: server.get("/stats")["subscribers"] == 1)
    replies = [server.ingest(batch[i:i + 30]) for i in (0, 30, 60)]
    assert [r["ids"] for r in replies] == [list(range(start + i, start + i + 30)) for i in (0, 30, 60)]
    listener.join(timeout=30)
    assert not listener.is_alive() and listener.error is None and listener.status == 200
    matches = [(data, event_id) for kind, data, event_id in listener.events if kind == "match"]
    expected = np.flatnonzero(ref >= t)
    assert [m["id"] for m, _ in matches] == (start + expected).tolist()  # in ingest order
    assert all(event_id == str(m["id"]) and m["class_id"] == 3 for m, event_id in matches)
    np.testing.assert_allclose([m["score"] for m, _ in matches], ref[expected], atol=1e-4)
    totals = [data["total"] for kind, data, _ in listener.events if kind == "ingest"]
    assert totals == [start + 30, start + 60, start + 90]
    found = server.get("/search", class_id=3, threshold=t)
    assert sorted(it["id"] for it in found["items"] if it["id"] >= start) == (start + expected).tolist()
    assert found["scanned"] == start + 90
    # the listener has hung up: the server forgets it
    assert wait_for(lambda: server.get("/stats")["subscribers"] == 0, timeout=15)
    png = httpx.get(f"{server.base}/items/{start + expected[0]}.png", timeout=10)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_heartbeat_comment_and_bad_stream_request(server: Server) -> None:
    r = httpx.get(f"{server.base}/stream", params={"class_id": 42}, timeout=10)
    assert r.status_code == 404 and "unknown class_id 42" in r.json()["error"]
    listener = Listener(f"{server.base}/stream?class_id=1", ingests=1)
    listener.start()
    assert wait_for(lambda: bool(listener.comments))  # the opening comment arrives at once
    assert listener.comments[0].startswith(": class 1 threshold ")
    server.ingest(np.zeros((1, 8, 8), np.uint8))
    listener.join(timeout=30)
    assert not listener.is_alive() and listener.error is None


def test_killed_server_restarts_on_a_consistent_index(server: Server, run_dir: Path, images: np.ndarray) -> None:
    server.ingest(images[:50])
    before = server.get("/search", class_id=7, top_k=1000)
    server.stop(signal.SIGKILL)
    again = Server(run_dir, server.folder, "--token", TOKEN)
    try:
        after = again.get("/search", class_id=7, top_k=1000)
        assert after["items"] == before["items"] and after["total"] == before["total"]
        total = before["total"]
        assert again.ingest(images[50:53])["ids"] == [total, total + 1, total + 2]
        listener = Listener(f"{again.base}/stream?class_id=0", ingests=1)
        listener.start()
        assert wait_for(lambda: again.get("/stats")["subscribers"] == 1)
    finally:
        code = again.stop(signal.SIGTERM)
    assert code == 0  # a graceful stop, although a stream was open
    listener.join(timeout=10)
    assert not listener.is_alive()


def test_load_benchmark_at_tiny_size(run_dir: Path, tmp_path: Path) -> None:
    """``logitsep bench load`` end to end at a tiny size: no errors, index size = pre-fill + ingested (no timings
    are asserted)."""
    from logitsep.bench.load import parse_mix, run_load

    result = run_load(run_dir, tmp_path / "load", prefill_items=500, clients=2, seconds=1.5, warmup=0.2,
                      mix="ingest=2,search=1,query=1,health=1", batch=2, log=lambda s: None)
    checks = result["checks"]
    assert checks["errors"] == 0 and checks["index_size_ok"], checks
    assert checks["prefill"] == 500 and checks["ingested_items"] > 0 and checks["ingested_items"] % 2 == 0
    assert checks["disk_total"] == 500 + checks["ingested_items"] == checks["live_total"]
    rows = {r["endpoint"]: r for r in result["rows"]}
    assert set(rows) == {"ingest", "search", "query", "health"}
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["p50_ms"] <= r["p99_ms"] for r in rows.values())
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["checks"] == checks and saved["settings"]["clients"] == 2 and "environment" in saved
    assert (tmp_path / "load.csv").is_file() and (tmp_path / "load.png").stat().st_size > 0
    for bad in ("ingest", "ingest=x", "search=-1", "fly=1", "query=0"):
        with pytest.raises(ValueError, match="--mix"):
            parse_mix(bad)


@pytest.mark.slow
def test_demo_trains_once_feeds_the_test_set_and_cleans_up(tmp_path: Path) -> None:
    """``logitsep serve --demo`` on a fresh machine: trains (a few steps here) and calibrates a cached MNIST run,
    feeds its test images at a steady rate, and removes its temporary index when stopped."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "logitsep.cli", "serve", "--demo", "--json", "--workdir", str(tmp_path),
               "--steps", "40", "--rate", "200", "--limit", "60", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["url"] == f"http://127.0.0.1:{port}/" and info["items"] == 0
        index = Path(info["index"])
        assert index.is_dir() and (tmp_path / "mnist-mlp-batch_ce-40" / "thresholds.json").is_file()
        base = f"http://127.0.0.1:{port}"

        def items() -> int:
            try:
                return httpx.get(base + "/stats", timeout=5).json()["items"]
            except httpx.HTTPError:
                return -1

        assert wait_for(lambda: items() == 60, timeout=60)
        time.sleep(0.5)
        assert items() == 60  # --limit stops the feed
        first = httpx.get(base + "/items/0.png", timeout=5)
        assert first.status_code == 200
        from PIL import Image

        expected = dataset_images("mnist", "test", (784,))[0]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(first.content))), expected)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert code == 0, stderr
    assert "training the demo run" in stderr and "demo feed done: 60 images" in stderr
    assert not index.exists()  # the temporary index is removed at exit


def test_enrollments_survive_kill_9_mid_request(run_dir: Path, images: np.ndarray, tmp_path: Path) -> None:
    """Enrollments posted back to back while the server is killed with SIGKILL: after a restart the run loads, every
    acknowledged class is there (at most the one in flight more), and enroll → search → restart → search agrees."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    server = Server(run, tmp_path / "index", "--token", TOKEN)
    acknowledged: list[str] = []
    stop = threading.Event()

    def enroll_forever() -> None:
        i = 0
        while not stop.is_set():
            body = {"name": f"c{i}", "images": [base64.b64encode(encode_png(img)).decode() for img in images[i:i + 8]]}
            try:
                r = httpx.post(server.base + "/classes", json=body, headers=headers, timeout=30)
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                acknowledged.append(body["name"])
            i += 1

    worker = threading.Thread(target=enroll_forever, daemon=True)
    try:
        worker.start()
        assert wait_for(lambda: len(acknowledged) >= 3, timeout=60)
        server.stop(signal.SIGKILL)
    finally:
        stop.set()
        worker.join(timeout=30)
        server.stop()
    names = SingleLogitClassifier.from_run(run).class_names[10:]  # loads: the file is whole
    assert names[:len(acknowledged)] == acknowledged and len(names) <= len(acknowledged) + 1
    again = Server(run, tmp_path / "index", "--token", TOKEN)
    try:
        again.ingest(images[:100])
        body = {"name": "late", "images": [base64.b64encode(encode_png(img)).decode() for img in images[100:105]]}
        c = httpx.post(again.base + "/classes", json=body, headers=headers, timeout=30).json()["id"]
        before = again.get("/search", class_id=c, top_k=50)
    finally:
        again.stop(signal.SIGKILL)
    third = Server(run, tmp_path / "index", "--token", TOKEN)
    try:
        assert third.get("/search", class_id=c, top_k=50)["items"] == before["items"]
        assert third.get("/classes")["classes"][c]["name"] == "late"
    finally:
        third.stop()
