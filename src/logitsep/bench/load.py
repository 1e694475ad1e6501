"""``logitsep bench load``: the web service under a bounded load on loopback.

The real server (``logitsep serve`` in a subprocess, on a free loopback port) serves a run over an index
pre-filled with ``--prefill`` items (embeddings of training images appended directly to the index, so the
pre-fill is quick); ``--clients`` concurrent HTTP clients then run for ``--seconds``, each picking its next
request at random from the mix (``ingest`` of ``--batch`` test-image PNGs, ``search`` top-``--top-k`` above the
calibrated global threshold, ``query`` of one image's single logit, and ``health`` as the baseline: the cost of
an HTTP round trip with no work). Latencies are measured by the clients (HTTP included); ``search`` and ``query``
also report the service's own time (the server's ``ms``), and ``search`` the number of full scans among its
requests (the first search of a class scans every item; the service keeps that class's scores and later
searches only score the items appended since, see :class:`~logitsep.serve.service.ScoreCache`).
Checks: no errors, and the index size equals the pre-fill plus the items ingested (asked from the live server,
then re-read from disk after it stops).

Results: ``OUT.csv``/``OUT.json`` (rows per endpoint: requests, throughput, p50/p90/p99/max latency) and
``OUT.png`` (latency distribution per endpoint, with the targets).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ._common import write_results

TARGETS_MS = {"query": 20.0, "search": 50.0}  # p99 targets of issue 6 on the 2-core development machine
DEFAULT_MIX = "ingest=1,search=2,query=2,health=1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_mix(text: str) -> dict[str, float]:
    """``"ingest=1,search=2"`` → weights; the names must be among ingest, search, query, health."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name not in ("ingest", "search", "query", "health"):
            raise ValueError(f"--mix takes name=weight pairs of ingest, search, query, health; got {part!r}")
        try:
            mix[name] = float(value)
        except ValueError:
            raise ValueError(f"--mix: weight of {name} must be a number, got {value!r}") from None
        if not mix[name] >= 0:
            raise ValueError(f"--mix: weight of {name} must be >= 0, got {value}")
    if sum(mix.values()) <= 0:
        raise ValueError("--mix: at least one weight must be positive")
    return mix


def prefill(run: Path, folder: Path, n: int, seed: int = 0, chunk: int = 4096) -> tuple[int, list[str], int]:
    """Create the serve folder for ``run`` and append ``n`` item vectors of training images (drawn with
    replacement) directly to its index. Returns the index size, 256 base64 test PNGs and the number of classes."""
    import torch

    from ..classifier import SingleLogitClassifier
    from ..data import load_dataset
    from ..serve.service import Service

    classifier = SingleLogitClassifier.from_run(run)
    service = Service(classifier, folder)
    x, _ = load_dataset(classifier.config.dataset).split("train")
    rows = np.random.default_rng(seed).integers(0, len(x), size=n)
    with torch.inference_mode():
        for start in range(0, n, chunk):
            h = classifier.embed(x[torch.from_numpy(rows[start:start + chunk])])
            service.index.append(service.head.item_vectors(h).float().numpy())
    total = len(service.index)
    service.close()  # the server takes the writer's lock next
    return total, _pngs(classifier.config.dataset, classifier.input_shape, 256), classifier.num_classes


def _pngs(dataset: str, input_shape: tuple[int, ...], count: int) -> list[str]:
    """Base64 PNGs of the first ``count`` test images of ``dataset``."""
    from ..core.images import encode_png
    from ..serve.service import dataset_images

    images = dataset_images(dataset, "test", input_shape)[:count]
    return [base64.b64encode(encode_png(img)).decode() for img in images]


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    a = np.asarray(values)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


async def _drive(base: str, clients: int, seconds: float, warmup: float, mix: dict[str, float], pngs: list[str],
                 num_classes: int, batch: int, top_k: int, seed: int) -> list[dict[str, Any]]:
    """Run the clients; one record per request (``timed``: after the warm-up): op, ms, status, added (ingest),
    server_ms (search, query), error."""
    import httpx

    records: list[dict[str, Any]] = []
    names, weights = list(mix), list(mix.values())
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as http:
        loop = asyncio.get_running_loop()
        start = loop.time()
        timed_from, end = start + warmup, start + warmup + seconds

        async def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while loop.time() < end:
                op = rng.choices(names, weights)[0]
                c = rng.randrange(num_classes)
                if op == "ingest":
                    request = http.post("/ingest", json={"images": rng.sample(pngs, batch)})
                elif op == "search":
                    request = http.get("/search", params={"class_id": c, "threshold": threshold, "top_k": top_k})
                elif op == "query":
                    request = http.post("/query", json={"class_id": c, "image": rng.choice(pngs)})
                else:
                    request = http.get("/health")
                began = loop.time()
                try:
                    response = await request
                    status, body = response.status_code, response.json()
                except (httpx.HTTPError, json.JSONDecodeError) as err:
                    status, body = 0, {"error": f"{type(err).__name__}: {err}"}
                ms = 1e3 * (loop.time() - began)
                records.append({"op": op, "ms": ms, "status": status, "timed": began >= timed_from,
                                "added": body.get("added", 0) if status == 200 else 0,
                                "server_ms": body.get("ms") if op in ("search", "query") else None,
                                "cached": body.get("cached") if op == "search" else None,
                                "error": body.get("error") if status != 200 else None})

        threshold = (await http.get("/classes")).json()["threshold"]  # the calibrated global one
        await asyncio.gather(*(client(k) for k in range(clients)))
    return records


def _plot(records: list[dict[str, Any]], path: Path, title: str) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for op in ("health", "query", "search", "ingest"):
        ms = np.sort([r["ms"] for r in records if r["op"] == op and r["timed"] and r["status"] == 200])
        if len(ms):
            ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=f"{op} (n={len(ms)})")
    for op, target in TARGETS_MS.items():
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
        ax.text(target, 1.0, f"{op} p99 target", fontsize=7, color="grey", ha="center", va="bottom",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("latency seen by the client, ms (log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=10, pad=14)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def run_load(run: str | Path, out: str | Path, *, prefill_items: int = 100_000, clients: int = 4,
             seconds: float = 20.0, warmup: float = 2.0, mix: str = DEFAULT_MIX, batch: int = 1, top_k: int = 100,
             threads: int = 1, seed: int = 0, score_cache_mb: int = 256, log: Any = None) -> dict[str, Any]:
    """Start the server on a free loopback port over a pre-filled index, drive it, stop it; write the results.

    ``score_cache_mb=0`` turns the server's score cache off, so every search scans the whole index."""
    run, out = Path(run), Path(out)
    weights = parse_mix(mix)
    for name, value in (("clients", clients), ("batch", batch), ("top_k", top_k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not seconds > 0 or prefill_items < 0:
        raise ValueError(f"seconds must be > 0 and prefill >= 0, got {seconds} and {prefill_items}")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    folder = Path(tempfile.mkdtemp(prefix="logitsep-load-"))
    server = None
    server_log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty server must never block on it
    try:
        began = time.perf_counter()
        filled, pngs, num_classes = prefill(run, folder, prefill_items, seed=seed)
        log(f"pre-filled the index with {filled} items in {time.perf_counter() - began:.1f} s")
        port = _free_port()
        command = [sys.executable, "-m", "logitsep.cli", "serve", str(run), "--index", str(folder), "--host",
                   "127.0.0.1", "--port", str(port), "--threads", str(threads), "--log-level", "warning",
                   "--score-cache", str(score_cache_mb)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("LOGITSEP_TOKEN", None)
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=server_log)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, server, server_log)
        log(f"server up on {base}; {clients} clients for {seconds:g} s (+{warmup:g} s warm-up), mix {mix}")
        records = asyncio.run(_drive(base, clients, seconds, warmup, weights, pngs, num_classes, batch, top_k, seed))
        import httpx

        live_total = httpx.get(f"{base}/classes", timeout=30).json()["total"]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        server_log.close()
    try:
        from ..search import EmbeddingIndex
        from ..serve.service import stored_images

        with EmbeddingIndex.open(folder) as index:
            disk_total = len(index)
        images_on_disk = len(stored_images(folder / "images"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ingested = sum(r["added"] for r in records)
    timed = [r for r in records if r["timed"]]
    rows = []
    for op in ("ingest", "search", "query", "health"):
        mine = [r for r in timed if r["op"] == op]
        if not mine and weights.get(op, 0) == 0:
            continue
        ok = [r["ms"] for r in mine if r["status"] == 200]
        row = {"endpoint": op, "requests": len(mine), "errors": len(mine) - len(ok),
               "throughput_rps": len(ok) / seconds, **_percentiles(ok)}
        server_ms = [r["server_ms"] for r in mine if r["status"] == 200 and r["server_ms"] is not None]
        if server_ms:
            row.update({f"server_{k}": v for k, v in _percentiles(server_ms).items()})
        if op == "search":  # the first search of a class scans the whole index; later ones extend its scores
            scans = [r for r in mine if r["status"] == 200 and not r["cached"]]
            row.update({"scans": len(scans), "scan_max_ms": max((r["ms"] for r in scans), default=float("nan"))})
        if op in TARGETS_MS:
            row["target_p99_ms"] = TARGETS_MS[op]
            row["target_met"] = bool(ok) and row["p99_ms"] < TARGETS_MS[op]
        rows.append(row)
    health = next((r["p50_ms"] for r in rows if r["endpoint"] == "health"), float("nan"))
    for row in rows:  # the baseline measured in the same run: a bare HTTP round trip
        row["p50_over_health_p50"] = row["p50_ms"] / health
    errors = [r for r in records if r["status"] != 200]
    expected = filled + ingested
    checks = {"errors": len(errors), "first_errors": [r["error"] for r in errors[:5]], "prefill": filled,
              "ingested_items": ingested, "expected_total": expected, "live_total": live_total,
              "disk_total": disk_total, "images_on_disk": images_on_disk,
              "index_size_ok": live_total == expected == disk_total and images_on_disk == ingested}
    settings = {"score_cache_mb": score_cache_mb, "clients": clients, "seconds": seconds, "warmup": warmup,
                "mix": weights, "batch": batch, "top_k": top_k, "threads": threads,
                "prefill": prefill_items, "run": str(run), "seed": seed}
    meta = {"settings": settings, "checks": checks,
            "note": "latency measured by the clients (one asyncio process, httpx) against the server in another "
                    "process on the same machine; server_* = the service's own time (search: over the class's "
                    "kept scores, or a scan of the index for the first search of a class; query: embedding + one "
                    "logit); health = an HTTP round trip with no work (the baseline of p50_over_health_p50)"}
    csv_path, json_path = write_results(out, rows, **meta)
    png_path = _plot(records, out.with_suffix(".png"),
                     f"logitsep serve, {clients} clients, {seconds:g} s, index of {filled:,}+ items")
    return {"rows": rows, "checks": checks, "settings": settings,
            "files": [str(csv_path), str(json_path), str(png_path)]}


def _wait_ready(base: str, server: subprocess.Popen, log: Any, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with code {server.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout:g} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run folder with thresholds.json (default: the serve --demo run, trained "
                                      "and cached when missing)")
    parser.add_argument("--workdir", default="~/.cache/logitsep/demo", help="where the demo run is cached")
    parser.add_argument("--prefill", type=int, default=100_000, help="items in the index before the clients start")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds (default 20)")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first (default 2)")
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"request weights (default {DEFAULT_MIX})")
    parser.add_argument("--batch", type=int, default=1, help="images per ingest request (default 1: a camera frame)")
    parser.add_argument("--top-k", type=int, default=100, help="items per search (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-cache", type=int, default=256, metavar="MB",
                        help="the server's per-class score cache (0: off, every search scans the index)")
    parser.add_argument("--out", default="results/serve/load", help="output stem (.csv/.json/.png)")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench load``."""
    from ..core.tables import text_table

    run = args.run
    if run is None:
        from ..serve.demo import demo_run

        run = demo_run(args.workdir)
    result = run_load(run, args.out, prefill_items=args.prefill, clients=args.clients, seconds=args.seconds,
                      warmup=args.warmup, mix=args.mix, batch=args.batch, top_k=args.top_k, threads=args.threads,
                      seed=args.seed, score_cache_mb=args.score_cache)
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
    else:
        print(text_table([[r["endpoint"], r["requests"], r["errors"], f"{r['throughput_rps']:.1f}",
                           f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                           "" if "target_p99_ms" not in r else
                           f"< {r['target_p99_ms']:g}: {'yes' if r['target_met'] else 'NO'}"]
                          for r in result["rows"]],
                         ["endpoint", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p99 target met"]))
        checks = result["checks"]
        print(f"index: {checks['prefill']} pre-filled + {checks['ingested_items']} ingested = "
              f"{checks['expected_total']}; server says {checks['live_total']}, disk {checks['disk_total']} "
              f"({'ok' if checks['index_size_ok'] else 'MISMATCH'}); errors: {checks['errors']}")
        print("wrote " + ", ".join(result["files"]))
    ok = result["checks"]["errors"] == 0 and result["checks"]["index_size_ok"]
    return 0 if ok else 1
