"""The ``logitsep serve`` command: load a run and an index (or the demo), then run uvicorn."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_WORKDIR = "~/.cache/logitsep/demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", help="run folder written by `logitsep train`, with thresholds.json "
                                               "(optional with --demo)")
    parser.add_argument("--index", help="index folder: an embedding index (one from `logitsep index` works; created "
                                        "when missing) plus the ingested images (default: RUN/index; with --demo, "
                                        "a fresh temporary folder removed at exit)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=os.environ.get("LOGITSEP_TOKEN"),
                        help="bearer token that /ingest requires (default: $LOGITSEP_TOKEN; none: open)")
    parser.add_argument("--max-body", type=int, default=8 << 20, help="largest request body, bytes (default 8 MiB)")
    parser.add_argument("--score-cache", type=int, default=256, metavar="MB",
                        help="memory for the scores of recently searched classes (default 256 MB; 0: always scan)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model call (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    demo = parser.add_argument_group("demo", "--demo: train or reuse a small MNIST run and feed its test images")
    demo.add_argument("--demo", action="store_true", help="feed the test set to /ingest like a camera")
    demo.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    demo.add_argument("--rate", type=float, default=20.0, help="images per second (default 20)")
    demo.add_argument("--limit", type=int, default=0, help="images to feed in all (default 0: cycle forever)")
    demo.add_argument("--steps", type=int, default=2000, help="training steps of the demo run (default 2000)")
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where the demo run is cached ({DEFAULT_WORKDIR})")


def build(run: str | Path, index: str | Path, *, token: str | None = None, max_body: int = 8 << 20,
          device: str = "cpu", tasks: list | None = None, heartbeat: float = 15.0, score_cache_mb: int = 256) -> Any:
    """The FastAPI app serving ``run`` over the serve folder ``index``."""
    from ..classifier import SingleLogitClassifier
    from .app import create_app
    from .service import Service

    classifier = SingleLogitClassifier.from_run(run, device=device)
    service = Service(classifier, index, score_cache=score_cache_mb << 20)
    return create_app(service, token=token, max_body=max_body, heartbeat=heartbeat, tasks=tasks)


def run(args: argparse.Namespace) -> int:
    """``logitsep serve``."""
    import torch

    if args.run is None and not args.demo:
        args.parser.error("give a RUN folder, or --demo")
    torch.set_num_threads(max(1, args.threads))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    tasks, cleanup = [], None
    run_dir = Path(args.run) if args.run else None
    if args.demo:
        from .demo import demo_run, feed

        tasks.append(feed(args.rate, args.limit, log=log))  # checks --rate before any training
        run_dir = run_dir or demo_run(args.workdir, dataset=args.dataset, steps=args.steps, log=log)
    index = args.index
    if index is None and args.demo:
        index = cleanup = tempfile.mkdtemp(prefix="logitsep-demo-index-")
    try:
        return _serve(args, run_dir, index or run_dir / "index", tasks, log)
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


def _serve(args: argparse.Namespace, run_dir: Path, index: str | Path, tasks: list, log: Any) -> int:
    import uvicorn

    app = build(run_dir, index, token=args.token, max_body=args.max_body, device=args.device, tasks=tasks,
                score_cache_mb=args.score_cache)
    service = app.state.service
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/"
    info = {"url": url, "run": str(run_dir), "index": str(index), "items": len(service.index),
            "classes": service.num_classes, "threshold": service.threshold, "token": args.token is not None}
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        feed_text = f"; demo feed at {args.rate:g} images/s" if args.demo else ""
        log(f"serving {run_dir} ({service.num_classes} classes, global threshold {service.threshold:.3f}) over "
            f"{index} ({len(service.index)} items){feed_text}")
        log(f"open {url}   (API: {url}docs)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        log("warning: listening beyond this machine without --token: anyone who can reach it can /ingest")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the previous handlers:
    # make both a KeyboardInterrupt, so that this returns normally (and the demo's temporary index is removed).
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                    timeout_graceful_shutdown=2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        service.close()
    return 0
