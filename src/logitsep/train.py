"""Training loop: a model, a registered loss, plain SGD; checkpoints in safetensors, exact resume.

The batch order is a pure function of ``(seed, epoch)``, so a run resumed from a checkpoint sees the same
batches as an uninterrupted one. Files in the run folder (each written atomically):

- ``model.safetensors``: model weights and batch-norm statistics;
- ``optimizer.safetensors``: optimizer buffers (momentum), with the param groups in its metadata;
- ``state.json``: the config and the step reached (written last: it marks a complete checkpoint);
- ``metrics.json``: SLC metrics of the final model (see :func:`evaluate_model`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._io import atomic_write, write_json
from .data import Splits, load_dataset
from .losses import LOSSES, get_loss
from .metrics import all_logits_scores, slc_metrics
from .models import MODELS, SLCModel, build_model


@dataclass
class TrainConfig:
    """Everything that defines a run. ``train_split`` is ``"train"`` (model selection on ``"valid"``) or
    ``"train_full"`` (train + valid, as the demo does)."""

    dataset: str = "mnist"
    model: str = "mlp"
    loss: str = "ce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    lr: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    seed: int = 0
    train_split: str = "train"
    head_scale: float = 1.0
    device: str = "cpu"

    def validate(self) -> TrainConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid names: {', '.join(sorted(LOSSES))}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; valid names: {', '.join(sorted(MODELS))}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.train_split not in ("train", "train_full"):
            raise ValueError(f"train_split must be 'train' or 'train_full', got {self.train_split!r}")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        return self


def head_kind(loss: str) -> str:
    """Cosine-margin losses take cosines, so their model ends with a cosine head; the others a linear one."""
    return "cosine" if getattr(LOSSES[loss], "expects_cosines", False) else "linear"


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> Tensor:
    """Indices of the batch at ``step``: epochs are seeded permutations, the tail of an epoch is dropped."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size]


def learning_rate(config: TrainConfig, step: int) -> float:
    if config.schedule == "constant":
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * step / config.steps))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


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
    scores = predict(model, x, device=device)
    metrics = slc_metrics(scores, y)
    metrics["all_logits"] = slc_metrics(all_logits_scores(scores * softmax_scale), y)
    return metrics


def softmax_scale(config: TrainConfig) -> float:
    """The factor between the model's outputs and the logits its loss takes a softmax of (1 for a linear head)."""
    if head_kind(config.loss) == "linear":
        return 1.0
    return float(getattr(get_loss(config.loss, **config.loss_kwargs), "scale", 1.0))


def _save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig,
                     step: int) -> None:
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(weights, tmp))
    opt_state = optimizer.state_dict()
    buffers = {f"{pid}.{key}": value.detach().cpu().contiguous()
               for pid, state in opt_state["state"].items() for key, value in state.items()
               if isinstance(value, Tensor)}
    groups = json.dumps(opt_state["param_groups"])
    atomic_write(out / "optimizer.safetensors", lambda tmp: save_file(buffers, tmp, metadata={"param_groups": groups}))
    write_json(out / "state.json", {"step": step, "config": asdict(config)})


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict[str, Tensor]] = {}
        for key in f.keys():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = f.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_run(out: str | Path, device: str = "cpu") -> tuple[SLCModel, TrainConfig, int]:
    """The model, config and step of a run folder written by :func:`train`."""
    out = Path(out)
    state_path = out / "state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{out} holds no complete checkpoint (no state.json)")
    state = json.loads(state_path.read_text())
    config = TrainConfig(**state["config"])
    data = load_dataset(config.dataset)
    model = build_model(config.model, data.input_shape, data.num_classes, head=head_kind(config.loss),
                        scale=config.head_scale)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    return model.to(device), config, int(state["step"])


def train(config: TrainConfig, data: Splits | None = None, out: str | Path | None = None, resume: bool = False,
          progress: bool | None = None, eval_splits: tuple[str, ...] = ("test",),
          checkpoint_every: int = 1000) -> tuple[SLCModel, dict[str, Any]]:
    """Train ``config.model`` with ``config.loss``; return the model and its metrics (also ``out/metrics.json``).

    ``progress``: None shows a bar only on a terminal. ``resume`` continues from ``out``'s checkpoint.
    """
    config.validate()
    data = data if data is not None else load_dataset(config.dataset)
    x, y = data.split(config.train_split)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, head=head_kind(config.loss),
                        scale=config.head_scale).to(config.device)
    optimizer = make_optimizer(model, config)
    loss_fn = get_loss(config.loss, **config.loss_kwargs).to(config.device)
    start = 0
    out_path = Path(out) if out is not None else None
    if resume:
        if out_path is None or not (out_path / "state.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out_path}")
        saved = json.loads((out_path / "state.json").read_text())
        start = int(saved["step"])
        model.load_state_dict(load_file(str(out_path / "model.safetensors")))
        _load_optimizer(out_path / "optimizer.safetensors", optimizer)
    began = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc=f"{config.loss}", unit="step", leave=False,
               disable=(None if progress is None else not progress), dynamic_ncols=True)
    losses: list[float] = []
    model.train()
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        idx = batch_indices(len(x), config.batch_size, step, config.seed)
        xb, yb = x[idx].to(config.device), y[idx].to(config.device)
        loss = loss_fn(model(xb), yb)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {config.loss} became {float(loss)} at step {step} (lr={config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if out_path is not None and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
            _save_checkpoint(out_path, model, optimizer, config, step + 1)
    bar.close()
    seconds = time.perf_counter() - began
    result: dict[str, Any] = {"config": asdict(config), "steps": config.steps, "train_seconds": round(seconds, 2),
                              "final_train_loss": float(np.mean(losses[-50:])) if losses else None}
    for split in eval_splits:
        ex, ey = data.split(split)
        result[split] = evaluate_model(model, ex, ey, device=config.device, softmax_scale=softmax_scale(config))
    if out_path is not None:
        _save_checkpoint(out_path, model, optimizer, config, config.steps)
        write_json(out_path / "metrics.json", result)
    return model, result
