"""The head alone: all ``k`` logits of a :class:`~logitsep.heads.LinearHead` (``forward``, an ``[B, k]`` product,
``O(B·k·d)``) against the logit of one class (``logit(h, c)``, ``O(B·d)``) on the same random embeddings.

    logitsep bench head --dim 1024 --classes 262144 --batch-size 32 --json
    # {"all_ms": ..., "slc_ms": ..., "speedup": ...}

Times are per batch in milliseconds: median over ``--repeats`` interleaved rounds (all, one, all, one, ...)
after warm-up, with device synchronisation; ``speedup = all_ms / slc_ms``. The whole network is timed by
``logitsep bench speed``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import torch

from ..core.tables import text_table
from ..heads import LinearHead
from ._common import add_threads_argument, apply_threads, environment, steady_allocator, time_call


def random_head(dim: int, classes: int, device: str = "cpu", seed: int = 0) -> LinearHead:
    """A ``LinearHead(dim, classes)`` with its default random initialisation, created directly on ``device``."""
    torch.manual_seed(seed)
    with torch.device(device):
        head = LinearHead(dim, classes)
    return head.requires_grad_(False)


def run(dim: int = 1024, classes: int = 1 << 16, batch: int = 32, repeats: int = 7, device: str = "cpu",
        seed: int = 0) -> dict[str, Any]:
    """Time ``head(h)`` and ``head.logit(h, c)``; returns ``all_ms``, ``slc_ms``, ``speedup`` and details."""
    for name, value in (("dim", dim), ("classes", classes), ("batch", batch), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    steady_allocator()
    head = random_head(dim, classes, device, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    h = torch.randn(batch, dim, device=device, generator=gen)
    c = int(torch.randint(classes, (1,), generator=torch.Generator().manual_seed(seed)))
    all_t, one_t = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            all_t.append(time_call(lambda: head(h), repeat=1, device=device))
            one_t.append(time_call(lambda: head.logit(h, c), repeat=1, device=device))
    all_ms, slc_ms = 1e3 * statistics.median(all_t), 1e3 * statistics.median(one_t)
    return {"all_ms": all_ms, "slc_ms": slc_ms, "speedup": all_ms / slc_ms, "dim": dim, "classes": classes,
            "batch": batch, "device": str(device), "repeats": repeats, "environment": environment()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=1024, help="embedding dimension d")
    parser.add_argument("--classes", type=int, default=1 << 16, help="number of classes k")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_threads_argument(parser)


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench head``: prints ``{"all_ms", "slc_ms", "speedup"}`` with ``--json``."""
    if args.device == "cpu":
        apply_threads(args.threads)
    result = run(dim=args.dim, classes=args.classes, batch=args.batch_size, repeats=args.repeats, device=args.device)
    if args.json:
        print(json.dumps({key: round(result[key], 6) for key in ("all_ms", "slc_ms", "speedup")}))
        return 0
    print(text_table([[f"all {args.classes} logits", f"{result['all_ms']:.4f}"],
                      ["one logit (SLC)", f"{result['slc_ms']:.4f}"],
                      ["speed-up", f"x{result['speedup']:.1f}"]],
                     [f"LinearHead d={args.dim}, batch {args.batch_size}, {args.device}", "ms per batch"]))
    return 0
