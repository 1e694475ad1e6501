"""Z-score of one class per example: :meth:`logitsep.heads.LinearHead.zscore` against the z-score of all logits.

The Z-loss z-score ``(z_c − μ)/σ`` needs the mean and standard deviation of all ``k`` logits. Computed from the
logits it costs ``O(k·d)`` per example (the ``[n, k]`` product); ``LinearHead.zscore`` gets ``μ`` and ``σ`` from
statistics of ``W`` and ``b`` cached once (``O(k·d²)``, reported as ``stats_s``) in ``O(d²)`` per example,
independent of ``k`` (DESIGN.md, "Heads and single-logit inference"). Both are timed in the same run on random
weights (``nn.Linear`` init), random embeddings and random classes, batches of ``--batch``; the ratio is
all-logits time / cached time. ``max_err_*``: the largest deviation from a float64 z-score of all logits
(the cached path is float64 inside; the all-logits path is float32).

    logitsep bench zscore [--ks 10,12,14,16,18] [--d 256] [--batch 32] [--device cpu] [--threads N]
                          [--out results/bench]

``--ks`` are log2 of k. Writes ``OUT/zscore_speed.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table
from ..heads import LinearHead
from ..losses.spherical import z_score
from ._common import add_threads_argument, apply_threads, steady_allocator, sync, time_call, write_results


def _reference(head: LinearHead, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Float64 z-score from all logits (two-pass mean and population variance)."""
    z = h.double() @ head.weight.detach().double().T + head.bias.detach().double()
    mean = z.mean(dim=1, keepdim=True)
    std = (z - mean).square().mean(dim=1).sqrt()
    return (z.gather(1, c[:, None])[:, 0] - mean[:, 0]) / std


def _bench_k(k: int, d: int, batch: int, device: torch.device, repeat: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    head = LinearHead(d, k).to(device)
    h = torch.randn(batch, d, device=device)
    c = torch.randint(0, k, (batch,), device=device)
    sync(device)
    start = time.perf_counter()
    head._zstats_now()
    sync(device)
    stats_s = time.perf_counter() - start

    def all_logits() -> torch.Tensor:
        return z_score(head(h), c)

    with torch.inference_mode():
        cached_s = time_call(lambda: head.zscore(h, c), repeat=repeat, device=device)
        full_s = time_call(all_logits, repeat=repeat, device=device)
        ref = _reference(head, h, c)
        err_cached = float((head.zscore(h, c).double() - ref).abs().max())
        err_full = float((all_logits().double() - ref).abs().max())
    return {"k": k, "log2_k": k.bit_length() - 1, "d": d, "batch": batch, "device": str(device),
            "zscore_cached_s_per_example": cached_s / batch, "zscore_all_logits_s_per_example": full_s / batch,
            "speedup": full_s / cached_s, "stats_s": stats_s, "max_err_cached": err_cached,
            "max_err_all_logits": err_full, "repeat": repeat}


def _plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = pyplot()
    fig = plt.figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    ks = [r["k"] for r in rows]
    full = [1e6 * r["zscore_all_logits_s_per_example"] for r in rows]
    cached = [1e6 * r["zscore_cached_s_per_example"] for r in rows]
    ax.plot(ks, full, "o-", label="z-score from all k logits, O(k·d)")
    ax.plot(ks, cached, "s-", label="LinearHead.zscore, cached O(d²)")
    for k, f, r in zip(ks, full, rows, strict=True):
        ax.annotate(f"×{r['speedup']:.1f}", (k, f), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.margins(y=0.15)
    ax.set_xlabel("number of classes k")
    ax.set_ylabel("time per example (µs)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def run(ks_log2: Sequence[int] = (10, 12, 14, 16, 18), d: int = 256, batch: int = 32, device: str = "cpu",
        repeat: int = 7, out: str = "results/bench/zscore_speed", seed: int = 0) -> dict[str, Any]:
    """Time both z-scores for every ``k = 2**e``, ``e`` in ``ks_log2``; write ``out.{csv,json,png}``.

    Returns ``{"rows": [...], "files": [csv, json, png]}``; each row has the seconds per example of both paths,
    their ratio ``speedup``, the one-time ``stats_s`` and the errors against float64.
    """
    if not ks_log2 or any(e < 1 or e > 24 for e in ks_log2) or d < 1 or batch < 1 or repeat < 1:
        raise ValueError(f"need 1 <= log2 k <= 24 and d, batch, repeat >= 1; got ks={list(ks_log2)}, d={d}, "
                         f"batch={batch}, repeat={repeat}")
    dev = torch.device(device)
    steady_allocator()
    rows = [_bench_k(1 << e, d, batch, dev, repeat, seed) for e in ks_log2]
    stem = Path(out)
    csv_path, json_path = write_results(
        stem, rows, benchmark="LinearHead.zscore vs z-score of all logits", d=d,
        batch=batch, seed=seed, note="time per example = median batch time / batch; speedup = all-logits time / "
                                     "cached time, both measured in this run; stats_s = one-time cache build")
    png = _plot(rows, stem.with_suffix(".png"), f"z-score of one class per example (d={d}, batch {batch}, {dev})")
    return {"rows": rows, "files": [str(csv_path), str(json_path), str(png)]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ks", default="10,12,14,16,18", help="comma-separated log2 of the number of classes")
    parser.add_argument("--d", type=int, default=256, help="embedding dimension")
    parser.add_argument("--batch", type=int, default=32, help="examples per call")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)
    parser.add_argument("--out", default="results/bench", help="folder for zscore_speed.{csv,json,png}")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench zscore``."""
    try:
        ks = [int(v) for v in args.ks.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--ks must be comma-separated integers (log2 of k), got {args.ks!r}") from err
    if args.device == "cpu":
        apply_threads(args.threads)
    result = run(ks, d=args.d, batch=args.batch, device=args.device, repeat=args.repeat,
                 out=f"{args.out}/zscore_speed")
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
        return 0
    print(text_table([[r["k"], f"{1e6 * r['zscore_all_logits_s_per_example']:.2f}",
                       f"{1e6 * r['zscore_cached_s_per_example']:.2f}", f"{r['speedup']:.1f}", f"{r['stats_s']:.3f}",
                       f"{r['max_err_cached']:.1e}", f"{r['max_err_all_logits']:.1e}"] for r in result["rows"]],
                     ["k", "all logits µs/ex", "cached µs/ex", "speedup", "stats s", "err cached", "err all"]))
    print("wrote " + ", ".join(result["files"]))
    return 0
