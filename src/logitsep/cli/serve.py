"""``logitsep serve RUN | --demo``: the web service (JSON API, OpenAPI at /docs) and the live page at /."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HELP = ("serve a trained run: JSON API (OpenAPI at /docs), live page at /, class search over ingested images; "
        "--demo feeds MNIST test images")
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
                        help="bearer token that /ingest and class changes require (default: $LOGITSEP_TOKEN, the "
                             "way to pass it: a --token shows in `ps`; none: open)")
    parser.add_argument("--max-body", type=int, default=8 << 20, help="largest request body, bytes (default 8 MiB)")
    parser.add_argument("--score-cache", type=int, default=256, metavar="MB",
                        help="memory for the scores of recently searched classes (default 256 MB; 0: always scan)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model call (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    demo = parser.add_argument_group("demo", "--demo: train or reuse a small MNIST run and feed its test images")
    demo.add_argument("--demo", action="store_true", help="feed the test set to /ingest like a camera")
    demo.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "glyphs"])
    demo.add_argument("--data", metavar="PATH", help="the demo on your own image data instead of --dataset (a "
                                                     "folder of class folders of images, or uint8 image arrays)")
    demo.add_argument("--rate", type=float, default=20.0, help="images per second (default 20)")
    demo.add_argument("--limit", type=int, default=0, help="images to feed in all (default 0: cycle forever)")
    demo.add_argument("--steps", type=int, default=2000, help="training steps of the demo run (default 2000)")
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"where the demo run is cached ({DEFAULT_WORKDIR})")


def run(args: argparse.Namespace) -> int:
    """``logitsep serve``."""
    import torch

    from ..data import data_path

    if args.run is None and not args.demo:
        args.parser.error("give a RUN folder, or --demo")
    torch.set_num_threads(max(1, args.threads))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    tasks, cleanup = [], None
    run_dir = Path(args.run) if args.run else None
    if args.demo:
        from ..serve.demo import demo_run, feed

        tasks.append(feed(args.rate, args.limit, log=log))  # checks --rate before any training
        dataset = data_path(args.data) if args.data is not None else args.dataset
        run_dir = run_dir or demo_run(args.workdir, dataset=dataset, steps=args.steps, log=log)
    index = args.index
    if index is None and args.demo:
        index = cleanup = demo_index_folder()
    umask = os.umask(0o077)  # what the service creates (its index, images, keys) is for this user only
    try:
        return _serve(args, run_dir, index or run_dir / "index", tasks, log)
    finally:
        os.umask(umask)
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


DEMO_INDEX_PREFIX = "logitsep-demo-index-"


def demo_index_folder() -> str:
    """A fresh temporary serve folder for a demo, ``$TMPDIR/logitsep-demo-index-<pid>-XXXX`` (0700), removed at exit.
    A demo killed with -9 cannot remove its own: first remove this user's demo folders whose process is gone."""
    tmp = Path(tempfile.gettempdir())
    for entry in tmp.glob(f"{DEMO_INDEX_PREFIX}*-*"):
        pid = entry.name[len(DEMO_INDEX_PREFIX):].partition("-")[0]
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not pid.isdigit() or int(pid) == os.getpid() or not entry.is_dir() or entry.is_symlink() \
                or info.st_uid != os.getuid() or _alive(int(pid)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{DEMO_INDEX_PREFIX}{os.getpid()}-")  # mkdtemp makes it 0700


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _serve(args: argparse.Namespace, run_dir: Path, index: str | Path, tasks: list, log: Any) -> int:
    from ..serve.server import build, serve_forever

    app = build(run_dir, index, token=args.token, max_body=args.max_body, device=args.device, tasks=tasks,
                score_cache_mb=args.score_cache, host=args.host)
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
    if args.token is not None and args.token != os.environ.get("LOGITSEP_TOKEN"):
        log("warning: --token shows in `ps` to every user of this machine; set $LOGITSEP_TOKEN instead")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        log("warning: listening beyond this machine without --token: anyone who can reach it can /ingest")
    serve_forever(app, args.host, args.port, args.log_level)
    return 0
