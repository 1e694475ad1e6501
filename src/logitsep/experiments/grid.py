"""The paper's protocol on one dataset (Keren, Sabato & Schuller, ICDM 2018, Section VI-A): train each loss at
each learning rate of a grid, keep per loss the rate with the best validation accuracy, report its test metrics.

:class:`Grid` says what is trained (its fields are the settings every result row records, ``SETTING_KEYS``);
:func:`run_losses` trains it, one run after the other or ``jobs`` at a time in worker processes.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.checks import check_positive_int
from ..core.keys import ROW_KEYS
from ..data import Splits, load_dataset
from ..losses import loss_spec
from ..train import TrainConfig, metrics_of_scores, predict, softmax_scale, train


@dataclass(frozen=True)
class Grid:
    """A learning-rate grid of runs: every loss of ``losses`` at every rate of ``lrs``, the rest shared."""

    dataset: str
    losses: tuple[str, ...]
    steps: int
    lrs: tuple[float, ...]
    batch_size: int = 128
    model: str = "mlp"
    seed: int = 0
    train_split: str = "train"
    weight_decay: float = 0.0

    def settings(self) -> dict[str, Any]:
        """The ``SETTING_KEYS`` of the grid, JSON-ready (recorded in every row)."""
        return {"dataset": self.dataset, "model": self.model, "steps": int(self.steps),
                "lr_grid": [float(x) for x in self.lrs], "batch_size": int(self.batch_size), "seed": int(self.seed),
                "train_split": self.train_split, "weight_decay": float(self.weight_decay)}

    def configs(self) -> list[TrainConfig]:
        """One validated :class:`TrainConfig` per (loss, rate), loss by loss."""
        return [TrainConfig(dataset=self.dataset, model=self.model, loss=loss, steps=self.steps, lr=lr,
                            batch_size=self.batch_size, seed=self.seed, train_split=self.train_split,
                            weight_decay=self.weight_decay).validate()
                for loss in self.losses for lr in self.lrs]

    def with_losses(self, losses: Sequence[str]) -> Grid:
        return dataclasses.replace(self, losses=tuple(losses))


def run_losses(grid: Grid, data: Splits | None = None, progress: bool | None = None,
               log: Callable[[str], None] = print, test_scores: dict[str, np.ndarray] | None = None,
               jobs: int = 1) -> list[dict[str, Any]]:
    """Train the grid; keep, per loss, the run with the best validation accuracy (when there is a single rate, no
    validation is needed) and return its test metrics as one row. ``test_scores``, when given, receives each kept
    model's test scores ``[n, k]`` under the loss name.

    ``jobs`` > 1 trains that many (loss, rate) runs at once in worker processes, each with
    ``torch.get_num_threads() // jobs`` threads (at least 1); the rows are those of ``jobs=1`` up to the
    last bits of float arithmetic when the thread counts differ."""
    check_positive_int(jobs, "jobs")
    data = data if data is not None else load_dataset(grid.dataset)
    select = len(grid.lrs) > 1
    configs = grid.configs()
    outcomes = _train_grid(configs, data, select, progress, jobs)
    test_y = np.asarray(data.test_y)
    rows = []
    for loss in grid.losses:
        best: dict[str, Any] | None = None
        for config in (c for c in configs if c.loss == loss):
            outcome = next(outcomes)
            if isinstance(outcome, FloatingPointError):  # a diverging rate is a legitimate outcome of the grid
                log(f"  {loss} lr={config.lr}: diverged ({outcome})")
                continue
            result, valid_acc, scores = outcome
            valid = f"valid acc={valid_acc:.4f}  " if select else ""
            log(f"  {loss:>18} lr={config.lr:<6g} {valid}test acc={_accuracy(scores, test_y):.4f}  "
                f"({result['train_seconds']:.0f}s)")
            if best is None or (select and valid_acc > best["valid_accuracy"]):
                best = {"result": result, "lr": config.lr, "valid_accuracy": valid_acc, "scores": scores}
        if best is None:
            raise FloatingPointError(f"{loss}: every learning rate in {list(grid.lrs)} diverged")
        if test_scores is not None:
            test_scores[loss] = best["scores"]
        scale = softmax_scale(TrainConfig(**best["result"]["config"]))
        test = metrics_of_scores(best.pop("scores"), data.test_y, scale)  # the kept run's only: all k columns
        rows.append({"loss": loss, "pols_aligned": loss_spec(loss).pols_aligned, "lr": best["lr"],
                     **{k: test[k] for k in ROW_KEYS},
                     "valid_accuracy": None if not select else best["valid_accuracy"],
                     "all_logits": {k: test["all_logits"][k] for k in ROW_KEYS},
                     "softmax_scale": scale,
                     "train_seconds": best["result"]["train_seconds"], **grid.settings()})
    return rows


Outcome = tuple[dict[str, Any], float, np.ndarray] | FloatingPointError


def _accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (the first index on ties), as ``slc_metrics`` computes it; for multi-label targets the
    fraction of examples whose top class is one of theirs."""
    top = np.argmax(scores, axis=1)
    hit = top == y if y.ndim == 1 else y[np.arange(len(y)), top] != 0
    return float(np.mean(hit))


def _train_one(config: TrainConfig, data: Splits, select: bool, progress: bool | None) -> Outcome:
    """One run of the grid: its training result, validation accuracy (when a rate is to be selected) and test
    scores, or the FloatingPointError of a diverging rate. The SLC metrics are computed later, for the kept run
    only (at many classes they cost more than the predictions)."""
    try:
        trained, result = train(config, data=data, progress=progress, eval_splits=())
    except FloatingPointError as err:
        return err
    valid = _accuracy(predict(trained, data.valid_x).numpy(), np.asarray(data.valid_y)) if select else math.nan
    return result, valid, predict(trained, data.test_x).numpy()


_WORKER_DATA: Splits | None = None


def _die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies (a killed ``reproduce`` leaves no worker training)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _worker_init(arrays: dict[str, Any] | str, threads: int) -> None:
    """The worker's data: the arrays of a dataset held in memory, or the name of one read from disk (a worker
    memory-maps its own files)."""
    global _WORKER_DATA
    _die_with_parent()
    if isinstance(arrays, str):
        _WORKER_DATA = load_dataset(arrays)
    else:
        _WORKER_DATA = Splits(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                 for k, v in arrays.items()})
    torch.set_num_threads(threads)


def _worker_run(config: TrainConfig, select: bool) -> Outcome:
    assert _WORKER_DATA is not None, "worker used before its initializer ran"
    return _train_one(config, _WORKER_DATA, select, progress=False)


def _train_grid(configs: Sequence[TrainConfig], data: Splits, select: bool, progress: bool | None,
                jobs: int) -> Iterator[Outcome]:
    """The outcomes of ``configs``, in order: one after the other here, or ``jobs`` at a time in fresh
    ("spawn") processes that each get the data once."""
    if jobs == 1 or len(configs) == 1:
        yield from (_train_one(c, data, select, progress) for c in configs)
        return
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    # The data travel as numpy arrays, pickled by value. Tensors would go through torch's multiprocessing
    # reductions, which move the parent's storages into shared memory and leave every numpy view taken
    # before (such as table2's test labels) pointing at freed memory.
    arrays = data.name if data.on_disk else {
        f.name: (v.numpy() if isinstance(v := getattr(data, f.name), torch.Tensor) else v)
        for f in dataclasses.fields(data)}
    with ProcessPoolExecutor(max_workers=min(jobs, len(configs)), mp_context=context, initializer=_worker_init,
                             initargs=(arrays, threads)) as pool:
        futures = [pool.submit(_worker_run, c, select) for c in configs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
