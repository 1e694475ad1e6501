"""Why sampled NCE failed, and what the catch-up changes: one small model trained with exact NCE, sampled NCE with
Partial FC's lazy per-row momentum, and sampled NCE with the catch-up (optim module docstring), each with and
without a linear warm-up.

    .venv/bin/python tools/sampled_momentum.py --out results/many-classes/sampled_momentum

Data (documented structure, seeded): k Gaussian class means in 64 dimensions (N(0, I)), 20 training examples per
class at noise 1.5, one test example per class. Model: 64 → 256 → ReLU → 128 features → k-class linear head;
SGD momentum 0.9, the cosine rate and warm-up of ``logitsep train`` (``train.learning_rate``), batch 128. Writes
``OUT.json`` and ``OUT.md`` (with the command and the machine): test accuracy and the true logit against the
highest false one at the end, or the step where the loss became non-finite.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import torch
from torch import nn

from logitsep.core.files import write_json, write_text
from logitsep.core.provenance import command_line, environment
from logitsep.losses import SampledLoss, nce, value_checks
from logitsep.optim import RowSparseSGD
from logitsep.train import TrainConfig, learning_rate, sampled_loss


def run(mode: str, warmup: int, k: int, steps: int, lr: float, sampled: int) -> dict:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(k, 64, generator=g)
    y = torch.arange(k).repeat(20)
    x = means[y] + 1.5 * torch.randn(len(y), 64, generator=g)
    test_x = means + 1.5 * torch.randn(k, 64, generator=g)
    torch.manual_seed(1)
    body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))
    head = nn.Linear(128, k)
    params = [*body.parameters(), *head.parameters()]
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if mode == "exact"
           else RowSparseSGD(params, lr=lr, momentum=0.9, catch_up=mode == "sampled, catch-up"))
    loss_fn = SampledLoss("nce", sampled, generator=torch.Generator().manual_seed(2))
    schedule = TrainConfig(steps=steps, lr=lr, warmup=warmup)  # the cosine rate and warm-up of logitsep train
    began = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(schedule, step)
        idx = torch.randint(len(y), (128,), generator=g)
        yb = y[idx]
        if mode == "exact":
            with value_checks(False):  # a non-finite loss is reported below, not refused
                loss = nce(head(body(x[idx])), yb)
        else:
            with value_checks(False):  # candidates, their rows caught up (a no-op for the lazy rule), the loss
                loss = sampled_loss(loss_fn, opt, head, yb, functools.partial(body, x[idx]))
        if not torch.isfinite(loss):
            return {"mode": mode, "warmup": warmup, "diverged_at_step": step, "seconds": time.perf_counter() - began}
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        if isinstance(opt, RowSparseSGD):
            head.weight.copy_(opt.dense_view(head.weight))
            head.bias.copy_(opt.dense_view(head.bias))
        z = head(body(test_x))
        true = z.diagonal()
        false = z.masked_fill(torch.eye(k, dtype=torch.bool), -math.inf).amax(dim=1)
    return {"mode": mode, "warmup": warmup, "diverged_at_step": None, "final_loss": float(loss.detach()),
            "test_accuracy": float((z.argmax(1) == torch.arange(k)).float().mean()),
            "mean_true_logit": float(true.mean()), "mean_max_false_logit": float(false.mean()),
            "seconds": round(time.perf_counter() - began, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=3000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sampled", type=int, default=512)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [run(mode, w, args.classes, args.steps, args.lr, args.sampled)
            for mode in ("exact", "sampled, lazy", "sampled, catch-up") for w in (0, args.warmup)]
    for r in rows:
        print(r, flush=True)
    meta = {"command": command_line(), "machine": environment(), "classes": args.classes, "steps": args.steps,
            "lr": args.lr, "sampled": args.sampled}
    write_json(Path(args.out + ".json"), {**meta, "rows": rows})
    lines = [f"Command: `{meta['command']}`; machine: {meta['machine']['processor']}", "",
             f"k = {args.classes}, {args.steps} steps, lr {args.lr}, sampled {args.sampled}", "",
             "| optimizer | warm-up | outcome | test accuracy | mean true logit | mean max false logit |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r["diverged_at_step"] is not None:
            lines.append(f"| {r['mode']} | {r['warmup']} | non-finite loss at step {r['diverged_at_step']} | | | |")
        else:
            lines.append(f"| {r['mode']} | {r['warmup']} | trained | {r['test_accuracy']:.3f} | "
                         f"{r['mean_true_logit']:.2f} | {r['mean_max_false_logit']:.2f} |")
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
