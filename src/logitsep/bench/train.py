"""Steps per second of the trainer against a bare PyTorch loop over the same model, loss, batch and data.

The trainer is the real code path, :func:`logitsep.train.train` without evaluation and without a run folder (no
checkpoints, no log file): learning-rate schedule, batch order from :func:`~logitsep.train.batch_indices`,
indexing of the batch, loss bookkeeping, progress bar object (disabled), non-finite check. The bare loop has
the batches pre-indexed before the clock starts and does only ``zero_grad``, forward, loss, ``backward``,
``SGD.step`` (the same momentum SGD, the same initial weights). Both include building the model and the
optimizer. Rounds alternate trainer, bare, trainer, bare, ... so that a slow phase of a shared machine hits
both; the ratio is the median over rounds of (trainer steps/s) / (bare steps/s) in the same round
(``best_ratio``: best against best). Target: at least 0.9.

    logitsep bench train [--dataset mnist] [--losses ce,batch_ce] [--steps 200] [--rounds 5] [--device cpu]

On CPU the default is one thread (as in ``logitsep bench losses``): two OpenMP threads contending with another
process make every kernel erratic, while one thread measures the work itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table
from ..data import Splits, load_dataset
from ..losses import get_loss, loss_spec
from ..models import build_model
from ..train import TrainConfig, batch_indices, train
from ._common import interleaved, steady_allocator, sync, write_results

TARGET_RATIO = 0.9
MAX_STORED_BATCHES = 256  # the bare loop cycles through at most this many pre-indexed batches (memory bound)


def _trainer(config: TrainConfig, data: Splits) -> Callable[[], None]:
    def run() -> None:
        train(config, data=data, out=None, progress=False, eval_splits=())
        sync(config.device)

    return run


def _bare(config: TrainConfig, data: Splits) -> Callable[[], None]:
    x, y = data.split(config.train_split)
    batches = [(x[idx].to(config.device), y[idx].to(config.device))
               for idx in (batch_indices(len(x), config.batch_size, s, config.seed)
                           for s in range(min(config.steps, MAX_STORED_BATCHES)))]

    def run() -> None:
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.input_shape, data.num_classes, head=loss_spec(config.loss).head,
                            scale=config.head_scale).to(config.device)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        loss_fn = get_loss(config.loss, **config.loss_kwargs).to(config.device)
        for step in range(config.steps):
            xb, yb = batches[step % len(batches)]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            optimizer.step()
        sync(config.device)

    return run


def _on_device(data: Splits, split: str, device: str) -> Splits:
    """The training split moved to ``device`` once (the trainer's ``.to(device)`` is then free), as the bare
    loop's pre-indexed batches are."""
    if torch.device(device).type == "cpu":
        return data
    x, y = data.split(split)
    return replace(data, train_x=x.to(device), train_y=y.to(device)) if split == "train" else data


def run(dataset: str = "mnist", losses: Sequence[str] = ("ce", "batch_ce"), model: str = "mlp", steps: int = 200,
        batch_size: int = 128, lr: float = 0.01, rounds: int = 5, device: str = "cpu", threads: int | None = 1,
        seed: int = 0, out: str | Path | None = "results/bench/train_speed", data: Splits | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """Time ``train()`` and the bare loop for each loss in interleaved rounds; write ``out.{csv,json,png}``.

    Returns ``{"rows": [...], "ratio": {loss: median round ratio}, "target_ratio": 0.9, "files": [...]}``.
    """
    if steps < 1 or rounds < 1 or batch_size < 1:
        raise ValueError(f"steps, rounds and batch_size must be >= 1, got {steps}, {rounds}, {batch_size}")
    if threads is not None and torch.device(device).type == "cpu":
        torch.set_num_threads(threads)
    steady_allocator()
    data = data if data is not None else load_dataset(dataset)
    data = _on_device(data, "train", device)
    rows = []
    for loss in losses:
        config = TrainConfig(dataset=dataset, model=model, loss=loss, steps=steps, lr=lr, batch_size=batch_size,
                             seed=seed, device=device).validate()
        fns = {"trainer": _trainer(config, data), "bare": _bare(config, data)}
        seconds = interleaved(fns, rounds, warmup=1)  # warm-up: allocator, kernels, lazy imports
        ratios = [b / t for t, b in zip(seconds["trainer"], seconds["bare"], strict=True)]
        trainer_sps = steps / statistics.median(seconds["trainer"])
        bare_sps = steps / statistics.median(seconds["bare"])
        ratio = statistics.median(ratios)
        rows.append({"loss": loss, "dataset": dataset, "model": model, "batch_size": batch_size, "steps": steps,
                     "rounds": rounds, "device": device, "threads": torch.get_num_threads(),
                     "trainer_steps_per_s": round(trainer_sps, 2), "bare_steps_per_s": round(bare_sps, 2),
                     "ratio": round(ratio, 4), "best_ratio": round(min(seconds["bare"]) / min(seconds["trainer"]), 4),
                     "overhead_us_per_step": round(1e6 * (1 / trainer_sps - 1 / bare_sps), 1),
                     "target": TARGET_RATIO, "meets_target": bool(ratio >= TARGET_RATIO)})
        log(f"{loss:>18}: trainer {trainer_sps:8.1f} steps/s, bare loop {bare_sps:8.1f} steps/s, "
            f"ratio {ratio:.3f} (target >= {TARGET_RATIO})")
    ratio_by_loss = {r["loss"]: r["ratio"] for r in rows}
    result: dict[str, Any] = {"rows": rows, "ratio": ratio_by_loss, "target_ratio": TARGET_RATIO, "files": []}
    if out is not None:
        stem = Path(out)
        reproduce = (f"logitsep bench train --dataset {dataset} --losses {','.join(losses)} --model {model} "
                     f"--steps {steps} --batch-size {batch_size} --lr {lr:g} --rounds {rounds} --device {device}"
                     + (f" --threads {threads}" if threads is not None else ""))
        paths = write_results(stem, rows, benchmark="trainer vs bare PyTorch loop", reproduce=reproduce,
                              ratio=ratio_by_loss, target_ratio=TARGET_RATIO,
                              note="ratio = median over interleaved rounds of trainer steps/s / bare-loop steps/s; "
                                   "both include building the model and optimizer; the bare loop's batches are "
                                   "indexed before timing")
        png = _plot(rows, stem.with_suffix(".png"))
        result["files"] = [str(p) for p in (*paths, png)]
    return result


def _plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig = plt.figure(figsize=(7, 1.4 + 0.7 * len(rows)))
    ax = fig.add_subplot()
    height = 0.38
    ys = range(len(rows))
    bare = ax.barh([y - height / 2 for y in ys], [r["bare_steps_per_s"] for r in rows], height, label="bare loop")
    trainer = ax.barh([y + height / 2 for y in ys], [r["trainer_steps_per_s"] for r in rows], height,
                      label="logitsep train()")
    ax.bar_label(bare, fmt="%.0f", padding=3, fontsize=8)
    ax.bar_label(trainer, labels=[f"{r['trainer_steps_per_s']:.0f} ({r['ratio']:.2f}x)" for r in rows],
                 padding=3, fontsize=8)
    ax.set_yticks(list(ys), [r["loss"] for r in rows])
    ax.invert_yaxis()
    ax.margins(x=0.25)
    r0 = rows[0]
    ax.set_xlabel(f"steps per second ({r0['dataset']} {r0['model']}, batch {r0['batch_size']}, {r0['device']}, "
                  f"{r0['threads']} thread(s))")
    ax.set_title(f"Trainer vs bare PyTorch loop (target ratio >= {TARGET_RATIO})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--losses", default="ce,batch_ce", help="comma-separated registry names")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--steps", type=int, default=200, help="steps per timed run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (trainer, bare) per loss")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", default="results/bench", help="folder for train_speed.{csv,json,png}")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench train``."""
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    result = run(dataset=args.dataset, losses=losses, model=args.model, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, rounds=args.rounds, device=args.device, threads=args.threads or None,
                 out=f"{args.out}/train_speed")
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
        return 0
    print(text_table([[r["loss"], f"{r['trainer_steps_per_s']:.1f}", f"{r['bare_steps_per_s']:.1f}",
                       f"{r['ratio']:.3f}", f"{r['overhead_us_per_step']:.0f}", "yes" if r["meets_target"] else "NO"]
                      for r in result["rows"]],
                     ["loss", "trainer steps/s", "bare steps/s", "ratio", "overhead µs/step", f"≥ {TARGET_RATIO}"]))
    print(f"wrote {args.out}/train_speed.*")
    return 0
