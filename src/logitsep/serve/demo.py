"""``logitsep serve --demo``: a small PoLS-aligned MNIST run and a steady "camera feed" of test images.

The run (the paper's MLP trained with ``batch_ce``, Keren, Sabato & Schuller, ICDM 2018) is trained once and
cached (``~/.cache/logitsep/demo`` or ``--workdir``), with thresholds calibrated on its validation split. The
feed posts the test images, as 28×28 grayscale PNGs (pixel = round(256·x) clipped to 255, the inverse of the
loaders' x = pixel/256), to the service's own ingest path at a steady rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..core.images import encode_png
from ..data import is_path
from .service import Service, dataset_images

DEMO_LOSS = "batch_ce"
DEMO_LR = 0.03  # chosen on validation accuracy for batch_ce (see DEMO_LRS in logitsep/cli.py)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def demo_run(workdir: str | Path, dataset: str = "mnist", steps: int = 2000, seed: int = 0,
             log: Callable[[str], None] = _log) -> Path:
    """The cached demo run folder under ``workdir`` (trained and calibrated here when missing or incomplete)."""
    from ..classifier import calibrate_run
    from ..train import TrainConfig, train

    label = f"data-{hashlib.sha256(dataset.encode()).hexdigest()[:12]}" if is_path(dataset) else dataset
    run = Path(workdir).expanduser() / f"{label}-mlp-{DEMO_LOSS}-{steps}"
    metrics = run / "metrics.json"
    if not metrics.is_file() or json.loads(metrics.read_text()).get("steps") != steps:
        log(f"training the demo run ({dataset}, MLP 2x500, {DEMO_LOSS}, {steps} steps) into {run} ...")
        config = TrainConfig(dataset=dataset, model="mlp", loss=DEMO_LOSS, steps=steps, lr=DEMO_LR, batch_size=128,
                             seed=seed, train_split="train")
        _, result = train(config, out=run, eval_splits=("test",))
        log(f"trained in {result['train_seconds']:.0f} s: test AUPRC {result['test']['auprc']:.4f}, "
            f"pooled AUROC {result['test']['pooled_auroc']:.4f}")
    if not (run / "thresholds.json").is_file():
        log("calibrating thresholds on the validation split ...")
        calibrate_run(run)
    return run


def feed(rate: float, limit: int = 0, batch_max: int = 64,
         log: Callable[[str], None] = _log) -> Callable[[Service], Awaitable[None]]:
    """A task that ingests the test images of the served run's dataset in order (cycling) at ``rate`` images per
    second, ``limit`` in all (0: forever). Images due at the same tick go in one ingest (at most ``batch_max``)."""
    if not rate > 0:
        raise ValueError(f"rate must be a positive number of images per second, got {rate}")

    async def run(service: Service) -> None:
        loop = asyncio.get_running_loop()
        dataset = service.classifier.config.dataset
        images = await loop.run_in_executor(None, dataset_images, dataset, "test", service.input_shape)
        log(f"demo feed: the {len(images)} {dataset} test images at {rate:g}/s")
        began, sent = loop.time(), 0
        while limit <= 0 or sent < limit:
            due = min(int((loop.time() - began) * rate) + 1 - sent, batch_max)
            if limit > 0:
                due = min(due, limit - sent)
            if due > 0:
                batch = [encode_png(images[(sent + i) % len(images)]) for i in range(due)]
                try:
                    await service.ingest_async(batch)
                except Exception as err:  # keep serving the page even if the feed breaks
                    log(f"demo feed stopped: {type(err).__name__}: {err}")
                    return
                sent += due
            await asyncio.sleep(max(0.0, began + sent / rate - loop.time()))
        log(f"demo feed done: {sent} images ingested")

    return run
