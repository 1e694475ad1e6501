"""Training loop: a model, a registered loss, SGD with momentum; safetensors checkpoints, exact resume, DDP.

Sampled training (``sampled`` > 0 in the config, ``--sampled N``): the loss's sampled form
(:mod:`logitsep.losses.sampled`) scores the batch's classes plus ``N`` drawn ones, the head gets a sparse gradient
and :class:`logitsep.optim.RowSparseSGD` updates those rows only, so a step's cost does not grow with k. The
candidates are drawn first and their rows brought up to date (the momentum steps they skipped) before the forward
pass reads them; ``model.safetensors`` and the evaluation hold every row caught up, the checkpoint the rows as the
optimizer left them (a resumed run takes the same steps).

Class-sharded head (``shard_head`` in the config, ``--shard-head`` under ``torchrun``): the backbone stays
data-parallel and every process holds ``k/N`` rows of the head (:mod:`logitsep.sharded`; the loss of the global
batch from collectives, exact). The full head is built once at start (the same seeded numbers as one process), then
only rank 0 keeps it, brought up to date from the shards at each checkpoint: the files are those of a one-process
run (momentum buffers included), so a resume may use another number of processes, and every consumer of a run
folder reads it unchanged.

Optimiser: ``torch.optim.SGD`` with heavy-ball momentum μ (default 0.9) and optional weight decay λ:
``v ← μ·v + (g + λ·θ)``, ``θ ← θ − η_t·v``, with the learning rate η_t decayed by a cosine from ``lr`` at step 0
towards 0 at step ``steps`` (``schedule="cosine"``), or constant, times a linear warm-up over the first
``warmup`` steps (default none). The paper (Keren, Sabato & Schuller, ICDM 2018,
Section VI-A) picks ``lr`` from {1, 0.1, 0.01, 0.001} by validation accuracy; ``logitsep reproduce`` does that.

The batch order is a pure function of ``(seed, step)`` (:func:`batch_indices`), and the checkpoint holds the
weights, the momentum buffers and the random-number state, so a run resumed from a checkpoint takes the same
steps as an uninterrupted one. Under ``torchrun`` every rank takes its shard of the same global batch
(:mod:`logitsep.distributed`). Files in the run folder (their layout: :mod:`logitsep.runs`), written by rank 0
only:

- ``model.json``: the model spec, written when training starts (a run describes itself from its first step);
- ``checkpoint.safetensors``: everything a resume needs in **one** file (weights ``model/…``, momentum buffers
  ``optimizer/…``, RNG state ``rng/…``; step, config, optimizer param groups, the losses of the open log window
  and the elapsed time in its metadata). One file written by one atomic rename: a kill at any instant leaves
  the previous checkpoint or the new one, never a mix of two steps;
- ``model.safetensors``: the weights and batch-norm statistics (metadata ``step``), for :func:`logitsep.runs.load_run`;
- ``state.json``: the config and the step reached (written last: it marks a complete checkpoint);
- ``log.csv``: ``step, loss, lr, elapsed_s`` every ``log_every`` steps and at the end; ``loss`` is the mean
  training loss over the steps since the previous row, ``step`` counts the steps done. On resume the rows past
  the checkpoint are dropped, so the log reads as that of an uninterrupted run (elapsed times aside);
- ``tensorboard/``: the same scalars, with ``tensorboard=True`` (needs the ``tensorboard`` package);
- ``metrics.json``: SLC metrics of the final model (see :func:`evaluate_model`);
- ``thresholds.json``: per-class and global score thresholds for a precision of 0.99 on the validation split
  (:mod:`logitsep.thresholds`, from the single logits :meth:`~logitsep.heads.Head.logit_columns` computes;
  ``logitsep calibrate RUN`` recalibrates).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, sharded
from .core import hugepages
from .core.blocks import use_blocks
from .core.checks import check_positive_int
from .core.files import atomic_write, write_csv, write_json
from .data import Splits, load_dataset
from .losses import SampledLoss, get_loss, loss_spec, value_checks
from .losses.distill import Discriminator, objective_loss
from .metrics import all_logits_blocks, all_logits_scores, slc_metrics, slc_metrics_blocked
from .models import SLCModel, build_model
from .optim import RowSparseSGD
from .runs import (
    CHECKPOINT,
    LOG,
    METRICS,
    STATE,
    THRESHOLDS,
    WEIGHTS,
    Run,
    TrainConfig,
    load_run,
    model_spec,
    read_state,
    write_spec,
)
from .thresholds import calibrate_blocked, calibrate_scores

__all__ = ["TrainConfig", "batch_indices", "distill", "evaluate_blocked", "evaluate_model", "learning_rate",
           "make_optimizer", "predict", "read_log", "sampled_loss", "softmax_scale", "train"]

LOG_FIELDS = ("step", "loss", "lr", "elapsed_s")
RESUMABLE_CHANGES = ("steps", "device", "shard_head")  # config fields a resumed run may change


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, device: str) -> Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order if device == "cpu" else order.to(device)


def batch_indices(n: int, batch_size: int, step: int, seed: int, device: str | torch.device = "cpu") -> Tensor:
    """Indices of the batch at ``step``: epochs are seeded permutations, the tail of an epoch is dropped.

    The permutation of an epoch is computed once and cached (a training loop asks for it every step); with a
    ``device``, the cached copy lives there (one host→device copy per epoch instead of one per step)."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    return _epoch_order(n, seed, epoch, str(device))[offset * batch_size:(offset + 1) * batch_size].clone()


def learning_rate(config: TrainConfig, step: int) -> float:
    """η_step: ``lr`` (constant) or ``lr·(1 + cos(π·step/steps))/2`` (cosine), times ``(step + 1)/warmup`` for
    the first ``warmup`` steps (a linear warm-up; sampled NCE diverges without one at rates the exact loss takes:
    README, "Many classes")."""
    rate = config.lr if config.schedule == "constant" else \
        0.5 * config.lr * (1.0 + math.cos(math.pi * step / config.steps))
    return rate * (step + 1) / config.warmup if step < config.warmup else rate


def make_optimizer(model: nn.Module, config: TrainConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD with heavy-ball momentum and weight decay (see the module docstring); :class:`RowSparseSGD` (the same
    rule, row by row on the head's sparse gradients) for sampled training. ``extra``: a module trained alongside
    (meal_v2's discriminator: one optimizer for both, as MEAL V2 does). Frozen parameters (``--head-only``'s
    features) get no gradient, so SGD leaves them as they are."""
    params = [*model.parameters(), *(extra.parameters() if extra is not None else [])]
    if config.sampled:
        hugepages.place(model.head)  # a large head's random rows without a page walk each (core.hugepages)
        return RowSparseSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def sampled_loss(loss_fn: SampledLoss, optimizer: torch.optim.Optimizer, head: nn.Module, target: Tensor,
                 embed: Callable[[], Tensor]) -> Tensor:
    """The loss of one sampled step, in the order that keeps the head's rows right: draw the candidates, bring their
    rows of ``head.weight`` / ``head.bias`` up to date (:meth:`RowSparseSGD.catch_up`: the momentum steps they
    skipped; nothing for another optimizer), then the sampled loss of the features ``embed()`` on those rows.
    Training, ``bench classes`` and ``tools/sampled_momentum.py`` step through it."""
    candidates = loss_fn.candidates(target, head.weight.shape[0], head.weight.dtype)
    if isinstance(optimizer, RowSparseSGD):
        for p in (head.weight, head.bias):
            if p is not None:
                optimizer.catch_up(p, candidates.classes)
    return loss_fn(embed(), head.weight, head.bias, target, candidates=candidates)


# ---------------------------------------------------------------------------------------------- distillation


def _load_teachers(config: TrainConfig, data: Splits, device: torch.device) -> list[Run]:
    """The teacher runs (models in evaluation mode, no gradient); ``ValueError`` for a teacher of other classes or
    inputs."""
    out = []
    for path in config.teachers:
        run = load_run(path, device=device, enrolled=False)
        if run.spec.num_classes != data.num_classes or tuple(run.spec.input_shape) != tuple(data.input_shape):
            raise ValueError(f"teacher {path} was trained on {run.spec.num_classes} classes of inputs "
                             f"{list(run.spec.input_shape)}; this data has {data.num_classes} of "
                             f"{list(data.input_shape)}")
        if list(run.spec.class_names) != list(data.class_names):
            raise ValueError(f"teacher {path}'s classes are not this data's (names or order differ)")
        for p in run.model.parameters():
            p.requires_grad_(False)
        run.model.eval()
        out.append(run)
    return out


def _start_from_teacher(model: SLCModel, config: TrainConfig, teacher: Run) -> None:
    """``head_only``: the first teacher's weights (same architecture and head kind), the features frozen."""
    if teacher.spec.architecture != config.model:
        raise ValueError(f"head_only keeps the teacher's features: the student's model must be the teacher's "
                         f"({teacher.spec.architecture!r}), got {config.model!r}")
    try:
        model.load_state_dict(teacher.model.state_dict())
    except RuntimeError as err:
        raise ValueError(f"head_only: the teacher's weights do not fit loss {config.loss!r}'s head "
                         f"({loss_spec(config.loss).head}): {err}") from err
    for p in model.features.parameters():
        p.requires_grad_(False)


def _distill_loss(s: _Session, xb: Tensor, logits: Tensor, hard: Tensor | None) -> Tensor:
    """The objective on the teachers' logits of ``xb`` (computed without gradient) plus ``alpha`` × the hard-label
    loss. Logits, not a cosine head's cosines: outputs times their softmax scale."""
    config = s.config
    with torch.no_grad():
        teacher_logits = [t(xb).float() * scale for t, scale in s.teachers]
    student = logits * softmax_scale(config)
    term = objective_loss(config.objective, student, teacher_logits, temperature=config.temperature,
                          discriminator=s.disc)
    return term if hard is None else term + config.alpha * hard


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 2048, device: str = "cpu") -> Tensor:
    """Scores of every class for ``x`` in evaluation mode (logits, or cosines for a cosine head)."""
    model.eval()
    outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def evaluate_model(model: nn.Module, x: Tensor, y: Tensor, device: str = "cpu",
                   softmax_scale: float = 1.0) -> dict[str, Any]:
    """SLC metrics of the single logits, plus the paper's "all logits" baseline: softmax of every logit
    (of ``softmax_scale``·cosine for a cosine head, the scale its loss trains with)."""
    return metrics_of_scores(predict(model, x, device=device), y, softmax_scale)


@torch.no_grad()
def evaluate_blocked(model: torch.nn.Module, x: Tensor, y: Tensor, device: str | torch.device = "cpu",
                     softmax_scale: float = 1.0, block_size: int | None = None, progress: bool | None = None,
                     batch_size: int = 1024) -> dict[str, Any]:
    """``evaluate_model``'s metrics (the SLC metrics of the single logits and ``"all_logits"``,
    those of the softmax of ``softmax_scale``·score) without the ``[n, k]`` scores: the embeddings ``h`` are
    computed once (``model.embed_in_batches``), then every block of classes is scored from them,
    ``head.outputs(h, range(a, b))`` (those columns of ``model(x)``) as float32 on the CPU, and the metrics are
    :func:`~logitsep.metrics.slc_metrics_blocked` (the all-logits softmax: :func:`~logitsep.metrics.all_logits_blocks`).

    The metrics are exactly those of ``slc_metrics`` on the scores the blocks give. Those scores are ``model(x)``'s
    up to float rounding: ``head.outputs`` is ``forward``'s formula on the rows of the block (``F.linear``; a cosine
    head's clamped cosine), but a matrix product of another shape may sum in another order, so a tie or a near-tie
    of scores can come out differently from the in-memory path (the integer-valued scores of the tests agree to
    the bit); the all-logits row sums are summed block by block (also up to rounding).
    """
    head = model.head
    h = model.embed_in_batches(x, batch_size, device)
    y = np.asarray(y.cpu() if isinstance(y, Tensor) else y)
    k = head.k

    def outputs(start: int, stop: int) -> Tensor:  # called within this function: under its no_grad
        return head.outputs(h, range(start, stop)).float().cpu()

    metrics = slc_metrics_blocked(outputs, k, y, block_size=block_size, progress=progress)
    scaled = outputs if softmax_scale == 1.0 else (lambda start, stop: outputs(start, stop) * softmax_scale)
    softmax = all_logits_blocks(scaled, k, h.shape[0], block_size=block_size, progress=progress)
    metrics["all_logits"] = slc_metrics_blocked(softmax, k, y, block_size=block_size, progress=progress)
    return metrics


def metrics_of_scores(scores: Tensor | np.ndarray, y: Tensor, softmax_scale: float = 1.0) -> dict[str, Any]:
    """:func:`evaluate_model` from scores already computed (``[n, k]``)."""
    metrics = slc_metrics(scores, y)
    metrics["all_logits"] = slc_metrics(all_logits_scores(scores * softmax_scale), y)
    return metrics


def softmax_scale(config: TrainConfig) -> float:
    """The factor between the model's outputs and the logits its loss takes a softmax of: 1 for a linear head,
    the loss's ``scale`` for the cosine-margin losses (their model's outputs are cosines)."""
    if loss_spec(config.loss).head == "linear":
        return 1.0
    return float(get_loss(config.loss, **config.loss_kwargs).scale)


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(out: Path, model: nn.Module, opt_state: dict[str, Any], config: TrainConfig,
                     step: int, window: list[float], elapsed: float, world_size: int,
                     disc: nn.Module | None = None, resume_entries: dict[str, Tensor] | None = None) -> None:
    """``model.safetensors`` holds ``model``; the checkpoint holds it too, with ``resume_entries`` in place of its
    entries of those names (sampled training: the head's rows before their catch-up, see :func:`_dense_head`)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    resume = {**weights, **{k: v.detach().cpu().contiguous() for k, v in (resume_entries or {}).items()}}
    tensors = {f"model/{k}": v for k, v in resume.items()}
    if disc is not None:  # meal_v2's discriminator: in the checkpoint only (the model files hold the student)
        tensors.update({f"disc/{k}": v.detach().cpu().contiguous() for k, v in disc.state_dict().items()})
    tensors.update({f"optimizer/{pid}/{key}": value.detach().cpu().contiguous()
                    for pid, state in opt_state["state"].items() for key, value in state.items()
                    if isinstance(value, Tensor)})
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"step": str(step), "config": json.dumps(asdict(config)), "log_window": json.dumps(window),
            "param_groups": json.dumps(opt_state["param_groups"]), "elapsed_s": repr(elapsed)}
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write(out / WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"step": str(step)}))
    write_json(out / STATE, {"step": step, "config": asdict(config), "world_size": world_size})


def _load_checkpoint(out: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer,
                     config: TrainConfig, disc: nn.Module | None = None) -> tuple[int, float, list[float]]:
    """Restore ``model``, ``optimizer`` and the RNG from ``out/checkpoint.safetensors``; return the step, the
    elapsed seconds and the open log window stored with it. Refuses a checkpoint of a different run."""
    path = None if out is None else out / CHECKPOINT
    if path is None or not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out} (no checkpoint.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        step, saved = int(meta["step"]), json.loads(meta["config"])
        groups, window = json.loads(meta["param_groups"]), json.loads(meta["log_window"])
        elapsed = float(meta["elapsed_s"])
        rng = tensors["rng/cpu"]
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    defaults = asdict(TrainConfig())  # a field added since the checkpoint was written has its default there
    changed = [f"{k}={saved.get(k, defaults[k])!r} in the checkpoint, {v!r} now" for k, v in asdict(config).items()
               if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
    if changed:
        raise ValueError(f"--resume: {out} holds a different run: " + "; ".join(changed))
    state: dict[int, dict[str, Tensor]] = {}
    weights, disc_weights = {}, {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "model":
            weights[name] = value
        elif kind == "disc":
            disc_weights[name] = value
        elif kind == "optimizer":
            pid, _, buffer = name.partition("/")
            state.setdefault(int(pid), {})[buffer] = value
    try:
        model.load_state_dict(weights)
        if disc is not None:
            disc.load_state_dict(disc_weights)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"--resume: {path} does not fit the model of this config: {err}") from err
    torch.set_rng_state(rng)
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return step, elapsed, [float(v) for v in window]


# ---------------------------------------------------------------------------------------------- logging


class RunLog:
    """``log.csv`` (and optionally TensorBoard) of a run. Rows are appended one line at a time; opening the log
    of a resumed run keeps only the rows up to the checkpoint's step that an uninterrupted run also has (and
    drops a line a kill may have cut short)."""

    def __init__(self, out: Path, keep_until: int | None, log_every: int, tensorboard: bool = False) -> None:
        self.path = out / LOG
        rows = []
        if keep_until is not None and self.path.is_file():
            for row in _read_log(self.path):
                if row["step"] <= keep_until and row["step"] % log_every == 0:
                    rows.append(row)
        write_csv(self.path, rows, header=list(LOG_FIELDS))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=keep_until)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerow([repr(row[k]) for k in LOG_FIELDS])
        if self.writer is not None:
            self.writer.add_scalar("train/loss", row["loss"], row["step"])
            self.writer.add_scalar("train/lr", row["lr"], row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read_log(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({"step": int(row["step"]), "loss": float(row["loss"]), "lr": float(row["lr"]),
                             "elapsed_s": float(row["elapsed_s"])})
            except (TypeError, ValueError, KeyError):
                continue  # a line cut short by a kill
    return rows


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """The rows of ``out/log.csv`` as dicts with numbers (``step`` an int)."""
    return _read_log(Path(out) / LOG)


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ValueError("--tensorboard needs the tensorboard package, which does not import here "
                         f"({err}); install it with `pip install tensorboard`, or leave the option out: "
                         "the CSV log RUN/log.csv is written either way") from None


# ---------------------------------------------------------------------------------------------- training


@dataclass
class _Session:
    """What one training run holds while it runs (built by :func:`_start`, stepped by :func:`_loop`)."""

    config: TrainConfig
    data: Splits
    out: Path | None
    ctx: distributed.Context
    model: SLCModel
    net: nn.Module  # the model, wrapped by DDP under several processes
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    resumed: bool = False
    start: int = 0
    elapsed_before: float = 0.0
    window: list[float] | None = None  # losses of the open log window
    head_shard: sharded.ShardedLinearHead | None = None  # this rank's rows of the head, under --shard-head
    teachers: list[tuple[nn.Module, float]] = field(default_factory=list)  # (model, softmax scale), distillation
    disc: nn.Module | None = None  # meal_v2's discriminator

    @property
    def writes(self) -> bool:
        return self.out is not None and self.ctx.is_main


def train(config: TrainConfig, data: Splits | None = None, out: str | Path | None = None, resume: bool = False,
          progress: bool | None = None, eval_splits: tuple[str, ...] = ("test",), checkpoint_every: int = 1000,
          log_every: int = 50, tensorboard: bool = False) -> tuple[SLCModel, dict[str, Any]]:
    """Train ``config.model`` with ``config.loss``; return the model and its metrics (also ``out/metrics.json``).

    ``progress``: None shows a bar only on a terminal. ``resume`` continues from ``out``'s checkpoint (the same
    config; ``steps`` may grow). A checkpoint is written every ``checkpoint_every`` steps and at the end, a log
    row every ``log_every`` steps. A non-finite loss (or non-finite logits, which the losses refuse) raises
    ``FloatingPointError`` naming the first step where it happened; no checkpoint is written after that step.
    Losses reach the host only at log rows and checkpoints (no per-step device synchronisation).

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) or in an initialised process group, it trains data-parallel
    (:mod:`logitsep.distributed`); only rank 0 writes files and evaluates (other ranks return the model and a
    result without metrics).
    """
    config.validate()
    check_positive_int(checkpoint_every, "checkpoint_every")
    check_positive_int(log_every, "log_every")
    out_path = Path(out) if out is not None else None
    if tensorboard:
        if out_path is None:
            raise ValueError("tensorboard=True needs a run folder (out)")
        _check_tensorboard()
    data = data if data is not None else load_dataset(config.dataset)
    ctx = distributed.setup(config.device)
    try:
        session = _start(config, data, out_path, resume, ctx)
        began = time.perf_counter()
        last_loss = _loop(session, progress, checkpoint_every, log_every, tensorboard)
        model, result = _finish(session, time.perf_counter() - began, last_loss, eval_splits)
        # Leave together: drop the DDP wrapper (its reducer holds the process group) and wait for every rank before
        # the group is destroyed. A gloo rank that tore its group down while rank 0 still evaluated was once seen to
        # leave rank 0 hanging in the group's destructor (--shard-head under torchrun, a loaded machine).
        session.net = session.model
        distributed.wait_for_all(ctx)
        return model, result
    finally:
        ctx.close()


def distill(teachers: list[str] | str, loss: str, objective: str = "", out: str | Path | None = None, *,
            alpha: float = 1.0, temperature: float = 4.0, head_only: bool = False, dataset: str | None = None,
            model: str | None = None, steps: int = 2000, lr: float = 0.1, batch_size: int = 128, seed: int = 0,
            device: str = "cpu", schedule: str = "cosine", resume: bool = False, data: Splits | None = None,
            progress: bool | None = None) -> tuple[SLCModel, dict[str, Any]]:
    """A student trained from teacher runs (``logitsep distill``): ``objective`` (``kd``, ``meal_v2``,
    ``logit_match`` or ``""``) plus ``alpha`` × ``loss`` on the hard labels; ``head_only`` keeps the first
    teacher's features frozen and trains its head. Dataset and model default to the first teacher's. The run is a
    :func:`train` run (its config records the teachers): resume, checkpoints and DDP as for ``train``."""
    teachers = [teachers] if isinstance(teachers, (str, Path)) else list(teachers)
    if not teachers:
        raise ValueError("distill needs at least one teacher run")
    first, _ = read_state(teachers[0])
    config = TrainConfig(dataset=dataset or first.dataset, model=model or first.model, loss=loss, steps=steps, lr=lr,
                         batch_size=batch_size, seed=seed, device=device, schedule=schedule,
                         teachers=[str(t) for t in teachers],
                         objective=objective, alpha=alpha, temperature=temperature, head_only=head_only)
    return train(config, data=data, out=out, resume=resume, progress=progress, eval_splits=("valid", "test"))


def _start(config: TrainConfig, data: Splits, out: Path | None, resume: bool, ctx: distributed.Context) -> _Session:
    """The model, optimizer and loss of the run, restored from ``out``'s checkpoint when resuming; ``model.json``."""
    x, _ = data.split(config.train_split)
    if config.sampled and ctx.world_size > 1:
        raise ValueError("sampled training (--sampled) runs in one process: its sparse head gradients are not "
                         "averaged by DDP; for heads too large for one device see --shard-head")
    if ctx.world_size > 1 and config.batch_size > len(x):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(x)} training examples")
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, head=loss_spec(config.loss).head,
                        scale=config.head_scale).to(ctx.device)
    runs = _load_teachers(config, data, ctx.device)
    teachers = [(r.model, softmax_scale(r.config)) for r in runs] if config.objective else []
    disc = None
    if config.head_only:  # the first teacher's weights; its features frozen (no gradient, evaluation mode)
        _start_from_teacher(model, config, runs[0])
    if config.objective == "meal_v2":
        disc = Discriminator(data.num_classes).to(ctx.device)
    model = distributed.convert_batchnorm(model, ctx)
    optimizer = make_optimizer(model, config, extra=disc)
    loss_fn = SampledLoss(config.loss, config.sampled, **config.loss_kwargs) if config.sampled \
        else get_loss(config.loss, **config.loss_kwargs)
    session = _Session(config, data, out, ctx, model, model, optimizer, loss_fn.to(ctx.device), window=[],
                       teachers=teachers, disc=disc)
    if resume:
        session.resumed = True
        session.start, session.elapsed_before, session.window = _load_checkpoint(out, model, optimizer, config,
                                                                                 disc)
        if session.start > config.steps:
            raise ValueError(f"--resume: the checkpoint in {out} is at step {session.start}, beyond "
                             f"steps={config.steps}")
    if session.writes:
        write_spec(out, model_spec(config, data, model))
    if config.shard_head:
        _shard_head(session)
    else:
        session.net = distributed.data_parallel(model, ctx)
    return session


def _shard_head(s: _Session) -> None:
    """Split the head over the processes (:mod:`logitsep.sharded`): this rank keeps its rows (and their momentum),
    the optimizer takes the backbone's parameters and the shard's, in the full model's order; ranks other than 0
    drop the full head."""
    config = s.config
    if config.loss not in sharded.SHARDED_LOSSES:
        raise ValueError(f"--shard-head: loss {config.loss!r} has no sharded form; those with one: "
                         f"{', '.join(sharded.SHARDED_LOSSES)}")
    shard = sharded.ShardedLinearHead.from_full(s.model.head)
    full = s.optimizer.state_dict()
    num_features = len(list(s.model.features.parameters()))
    state = {pid: ({**st, "momentum_buffer": st["momentum_buffer"][shard.start:shard.stop].clone()}
                   if pid >= num_features and st.get("momentum_buffer") is not None else st)
             for pid, st in full["state"].items()}
    s.optimizer = torch.optim.SGD([*s.model.features.parameters(), *shard.parameters()], lr=config.lr,
                                  momentum=config.momentum, weight_decay=config.weight_decay)
    s.optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})
    if not s.ctx.is_main:
        s.model.head.to("meta")  # its rows live in the shards; rank 0 keeps the full head for the files
    s.head_shard = shard
    s.net = distributed.data_parallel(s.model.features, s.ctx)


def _optimizer_state(s: _Session) -> dict[str, Any]:
    """The optimizer's state dict as one process would have it. Under --shard-head (a collective: every rank calls
    it) the head's rows and momentum buffers are gathered from the shards, and rank 0's full head updated."""
    state = s.optimizer.state_dict()
    shard = s.head_shard
    if shard is None:
        return state
    with torch.no_grad():
        weight = sharded.gather_shards(shard.weight, shard.k, shard.group)
        bias = None if shard.bias is None else sharded.gather_shards(shard.bias, shard.k, shard.group)
        if s.ctx.is_main:
            s.model.head.weight.copy_(weight)
            if bias is not None:
                s.model.head.bias.copy_(bias)
    num_features = len(list(s.model.features.parameters()))
    for pid in sorted(state["state"]):  # the same order on every rank
        buf = state["state"][pid].get("momentum_buffer")
        if pid >= num_features and buf is not None:  # a new dict: state_dict() shares the live ones
            state["state"][pid] = {**state["state"][pid],
                                   "momentum_buffer": sharded.gather_shards(buf, shard.k, shard.group)}
    return state


def _checkpoint(s: _Session, step: int, elapsed: float) -> None:
    """Check the weights (on every rank: all stop alike) and write the checkpoint (rank 0)."""
    opt_state = _optimizer_state(s)
    if s.head_shard is None:
        _check_finite_weights(s.model, step)
    else:  # each rank checks what it holds; every rank learns whether any failed
        bad = torch.tensor([0.0 if _finite(s.model.features) and _finite(s.head_shard) else 1.0])
        bad = distributed.mean_over_ranks(bad.to(s.ctx.device))
        if float(bad) > 0:
            raise FloatingPointError(f"the weights became non-finite in the {step} steps done; no checkpoint was "
                                     "written with them")
    if s.writes:
        with _dense_head(s) as lagging:
            _save_checkpoint(s.out, s.model, opt_state, s.config, step, s.window, elapsed, s.ctx.world_size,
                             s.disc, lagging)


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in module.state_dict().values() if v.is_floating_point())


def _loop(s: _Session, progress: bool | None, checkpoint_every: int, log_every: int, tensorboard: bool) -> float | None:
    """Steps ``s.start .. steps − 1``: log rows, checkpoints and the progress bar; returns the last logged loss."""
    config, device = s.config, s.ctx.device
    x, y = (t.to(device) for t in s.data.split(config.train_split))
    shard = s.ctx.shard(config.batch_size)
    log = RunLog(s.out, s.start if s.resumed else None, log_every, tensorboard) if s.writes else None
    bar = tqdm(total=config.steps, initial=s.start, desc=config.loss, unit="step", leave=False, dynamic_ncols=True,
               disable=(not s.ctx.is_main) or (None if progress is None else not progress))
    # The losses' value checks read a number from the device each call; on CUDA that would wait for the queued step
    # every step, so they are off there: the labels were checked when loaded, and a non-finite loss still stops the
    # run at the next flush (naming its step), before any checkpoint of a later step is written.
    check_values = torch.device(device).type != "cuda"
    began = time.perf_counter()
    pending: list[Tensor] = []  # losses of the steps since the last flush, still on the device
    last_loss: float | None = None
    s.net.train()
    if s.config.head_only:
        s.model.features.eval()  # frozen: batch-norm statistics stay the teacher's
    try:
        for step in range(s.start, config.steps):
            lr = learning_rate(config, step)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(len(x), config.batch_size, step, config.seed, device)
            if s.ctx.world_size > 1:
                idx = idx[shard]
            # index_select: several times faster than x[idx] on CPU; inputs read from disk (data.Rows) move here
            xb, yb = x.index_select(0, idx).to(device), y.index_select(0, idx).to(device)
            loss = _step_loss(s, xb, yb, step, lr, pending, check_values)
            s.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.disc is not None and s.ctx.world_size > 1:  # DDP averages the student's gradients, not these
                distributed.average_gradients(s.disc)
            s.optimizer.step()
            pending.append(loss.detach())
            bar.update(1)
            done = step + 1
            row_due = done % log_every == 0 or done == config.steps
            checkpoint_due = s.out is not None and done % checkpoint_every == 0 and done < config.steps
            if not (row_due or checkpoint_due):
                continue
            # One device→host copy per flush (not per step); a non-finite loss is caught here, before any
            # checkpoint of a later step is written.
            s.window += _flush(pending, done, config)
            pending = []
            elapsed = s.elapsed_before + time.perf_counter() - began
            if row_due:
                last_loss = sum(s.window) / len(s.window)
                if log is not None:
                    log.append({"step": done, "loss": last_loss, "lr": lr, "elapsed_s": round(elapsed, 3)})
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if done % log_every == 0:
                    s.window = []  # a final partial window stays open, so that a later resume can extend it
            if checkpoint_due:
                _checkpoint(s, done, elapsed)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return last_loss


def _step_loss(s: _Session, xb: Tensor, yb: Tensor, step: int, lr: float, pending: list[Tensor],
               check_values: bool) -> Tensor:
    """The loss of one step (over the global batch where the loss needs it); non-finite logits are reported
    as the step where training diverged."""
    if s.head_shard is not None:  # this rank's logits of the global batch; the loss from collectives
        grad = "ddp" if s.ctx.world_size > 1 else "exact"
        with value_checks(check_values):
            return sharded.sharded_loss(s.config.loss, s.net(xb), yb, s.head_shard, feature_grad=grad,
                                        **s.config.loss_kwargs)
    if s.config.sampled:  # the head's rows of the candidate classes only (losses.sampled)
        with value_checks(check_values):  # a non-finite loss is caught at the next flush, naming its step
            return sampled_loss(s.loss_fn, s.optimizer, s.model.head, yb, lambda: s.net.embed(xb))
    logits = s.net(xb)
    try:
        with value_checks(check_values):
            hard = distributed.batch_loss(s.loss_fn, logits, yb) if s.config.alpha > 0 or not s.teachers else None
            return _distill_loss(s, xb, logits, hard) if s.teachers else hard
    except ValueError as err:  # the losses refuse non-finite logits: training diverged at this step
        if bool(torch.isfinite(logits).all()):
            raise
        if s.ctx.world_size == 1:
            _flush(pending, step, s.config)  # an earlier non-finite loss is the first failure
        raise FloatingPointError(f"the logits became non-finite at step {step} (steps count from 0; "
                                 f"loss {s.config.loss}, lr={lr:g}, base lr={s.config.lr:g}); no checkpoint "
                                 "was written after it") from err


@contextlib.contextmanager
def _dense_head(s: _Session, keep: bool = False) -> Iterator[dict[str, Tensor]]:
    """Sampled training: within, the head's rows are all caught up (what dense SGD has: the model that is saved
    and evaluated); yields the head's entries as they were, which the checkpoint keeps, so that a resumed run takes
    the steps of one never stopped. On exit the head is put back, unless ``keep``. Otherwise a no-op."""
    if not isinstance(s.optimizer, RowSparseSGD):
        yield {}
        return
    params = dict(s.model.head.named_parameters(prefix="head"))  # the names of model.state_dict()
    lagging = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.copy_(s.optimizer.dense_view(p))
    try:
        yield lagging
    finally:
        if not keep:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(lagging[name])


def _finish(s: _Session, seconds: float, last_loss: float | None,
            eval_splits: tuple[str, ...]) -> tuple[SLCModel, dict[str, Any]]:
    """Evaluate on ``eval_splits`` and write the final checkpoint, ``metrics.json`` and ``thresholds.json``."""
    config = s.config
    result: dict[str, Any] = {"config": asdict(config), "steps": config.steps, "train_seconds": round(seconds, 2),
                              "final_train_loss": last_loss, "world_size": s.ctx.world_size}
    opt_state = _optimizer_state(s)  # a collective under --shard-head: rank 0's head gets its rows for evaluation
    with _dense_head(s, keep=True) as lagging:  # sampled training: the model returned, evaluated and saved
        return _evaluate_and_save(s, seconds, opt_state, result, lagging, eval_splits)


def _evaluate_and_save(s: _Session, seconds: float, opt_state: dict[str, Any], result: dict[str, Any],
                       lagging: dict[str, Tensor], eval_splits: tuple[str, ...]) -> tuple[SLCModel, dict[str, Any]]:
    """:func:`_finish`'s work on the model as saved (``lagging``: the checkpoint's head entries, see
    :func:`_dense_head`)."""
    config, model = s.config, s.model
    if s.out is not None:
        _check_finite_weights(model if s.head_shard is None or s.ctx.is_main else model.features, config.steps)
    if not s.ctx.is_main:
        return model, result
    device = str(s.ctx.device)
    for split in eval_splits:
        ex, ey = s.data.split(split)
        if use_blocks(ex.shape[0], s.data.num_classes):  # the [n, k] scores would not fit: blocks of classes
            result[split] = evaluate_blocked(model, ex, ey, device=device, softmax_scale=softmax_scale(config))
        else:
            result[split] = evaluate_model(model, ex, ey, device=device, softmax_scale=softmax_scale(config))
    if s.out is not None:
        write_json(s.out / METRICS, result)
        _save_checkpoint(s.out, model, opt_state, config, config.steps, s.window,
                         s.elapsed_before + seconds, s.ctx.world_size, s.disc, lagging)
        _write_thresholds(s)
    return model, result


def _write_thresholds(s: _Session) -> None:
    """Thresholds for single-logit decisions (precision 0.99), calibrated on the validation split from the logits
    a single-logit decision computes (:meth:`~logitsep.heads.Head.logit_columns`), saved with the checkpoint and
    tied to it by the SHA-256 of ``model.safetensors``."""
    x, y = s.data.split("valid")
    h = s.model.embed_in_batches(x, device=s.ctx.device)
    if use_blocks(h.shape[0], s.data.num_classes):  # a block of classes at a time, the same thresholds
        th = calibrate_blocked(lambda a, b: s.model.head.logit_columns(h, range(a, b)).float().cpu(),
                               s.data.num_classes, y, class_names=s.data.class_names)
    else:
        th = calibrate_scores(s.model.head.logit_columns(h).float().cpu(), y, class_names=s.data.class_names)
    th.model = {"sha256": hashlib.sha256((s.out / WEIGHTS).read_bytes()).hexdigest(), "step": s.config.steps}
    th.target.update(split="valid", trained_on=s.config.train_split)
    th.save(s.out / THRESHOLDS)


def _check_finite_weights(model: nn.Module, done: int) -> None:
    """Refuse to checkpoint weights that an overflowing update made non-finite."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"the weights ({name}) became non-finite in the {done} steps done; "
                                     "no checkpoint was written with them")


def _flush(pending: list[Tensor], done: int, config: TrainConfig) -> list[float]:
    """The pending losses as floats (averaged over ranks: the global-batch loss); raise at a non-finite one."""
    if not pending:
        return []
    values = distributed.mean_over_ranks(torch.stack(pending).float()).tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            step = done - len(values) + i
            raise FloatingPointError(f"loss {config.loss} became {value} at step {step} "
                                     f"(steps count from 0; lr={learning_rate(config, step):g}, "
                                     f"base lr={config.lr:g}); no checkpoint was written after it")
    return values
