"""Paper Table III and Figure 1: forward time per example with a top layer of one unit (single logit
classification) against a top layer of ``k`` units, ``k ∈ {2¹⁰, 2¹⁴, 2¹⁶, 2¹⁸, 2^18.5}``, batches of 32,
random inputs and random weights (Keren, Sabato & Schuller, ICDM 2018, Section VI-C).

    logitsep bench speed                                  # mlp and cnn (+ torchvision backbones when importable)
    logitsep bench speed --device cuda --backbones alexnet,vgg16,inception_v3,resnet50,resnet101

For every backbone and ``k`` four forward passes are timed, interleaved round by round (``--repeats`` rounds, the
order reversed every other round, after warm-up, with device synchronisation), all under ``torch.inference_mode``.
Times are medians over rounds; every ratio is the median of the ratios taken within one round, so that the
machine's drift between rounds cancels:

* ``backbone``: the network up to its embedding ``h`` (``d`` units);
* ``slc``: backbone + ``LinearHead.logit(h, c)``: one class's logit, the embedding dotted with one class vector;
* ``all``: backbone + ``LinearHead.forward(h)``: all ``k`` logits;
* ``linear``: backbone + a plain ``nn.Linear(d, k)`` sharing the head's weights (the baseline of ``all``).

``speedup = all / slc``; the bound next to it is ``(B + k·d)/(B + d)``, with ``B`` the backbone's multiply-adds per
example (``torch.utils.flop_counter``: matrix products and convolutions): the speed-up if time were proportional
to multiply-adds. Targets (issue 5): ``slc / backbone ≤ 1.05`` (one logit is free) and ``all / linear ≤ 1.10``
(our head is as fast as ``nn.Linear``). Writes ``speed.{csv,json,png}``; the plot is the paper's Figure 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table
from ._common import (
    add_threads_argument,
    alternating_rounds,
    apply_threads,
    environment,
    int_list,
    paired_ratio,
    ratio_quartiles,
    steady_allocator,
    write_results,
)

CLASSES = (1 << 10, 1 << 14, 1 << 16, 1 << 18, round(2 ** 18.5))
# name → (build_model name, input shape); the paper's networks, then the backbones of the paper's Table III
BACKBONES: dict[str, tuple[str, tuple[int, ...]]] = {
    "mlp": ("mlp", (784,)),
    "cnn": ("cnn", (3, 32, 32)),
    "alexnet": ("torchvision:alexnet", (3, 224, 224)),
    "vgg16": ("torchvision:vgg16", (3, 224, 224)),
    "inception_v3": ("torchvision:inception_v3", (3, 299, 299)),
    "resnet50": ("torchvision:resnet50", (3, 224, 224)),
    "resnet101": ("torchvision:resnet101", (3, 224, 224)),
}
PAPER = ("mlp", "cnn", "alexnet", "vgg16", "inception_v3", "resnet50", "resnet101")
TARGET_SLC = 1.05
TARGET_ALL = 1.10


def build_backbone(name: str, device: str = "cpu") -> tuple[nn.Module, tuple[int, ...]]:
    """The embedding network of backbone ``name`` (``SLCModel.features``), eval mode, on ``device``, and its
    input shape. torchvision backbones raise ``MissingDependencyError`` when torchvision cannot be imported."""
    from ..models import build_model

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    model_name, shape = BACKBONES[name]
    model = build_model(model_name, shape, 1)
    return model.features.to(device).eval().requires_grad_(False), shape


def multiply_adds(module: nn.Module, x: Tensor) -> int:
    """Multiply-adds per example of ``module(x)``: FLOPs of matrix products and convolutions counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add), halved, divided by the batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(x)
    return int(counter.get_total_flops() // (2 * x.shape[0]))


def bound(macs: int, k: int, d: int) -> float:
    """Speed-up of one logit over ``k`` if time were proportional to multiply-adds: ``(B + k·d)/(B + d)``."""
    return (macs + k * d) / (macs + d)


def _forward_passes(backbone: nn.Module, x: Tensor, head: nn.Module, linear: nn.Linear,
                    c: int) -> dict[str, Callable[[], object]]:
    return {"backbone": lambda: backbone(x), "slc": lambda: head.logit(backbone(x), c),
            "all": lambda: head(backbone(x)), "linear": lambda: linear(backbone(x))}


def measure(name: str, classes: Sequence[int], batch: int = 32, repeats: int = 31, device: str = "cpu",
            seed: int = 0, log: Callable[[str], None] = lambda s: None, warmup: int = 5) -> list[dict[str, Any]]:
    """One row per ``k`` for backbone ``name`` (see the module docstring for the four timings)."""
    from .head import random_head

    backbone, shape = build_backbone(name, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, *shape, device=device, generator=gen)
    with torch.inference_mode():
        d = int(backbone(x[:1]).shape[1])
    macs = multiply_adds(backbone, x[:1])
    rows = []
    for k in classes:
        head = random_head(d, k, device, seed)
        linear = nn.Linear(d, k, device="meta")
        linear.weight, linear.bias = head.weight, head.bias  # the same weights: only the code path differs
        fns = _forward_passes(backbone, x, head, linear, c=k // 2)
        with torch.inference_mode():
            times = alternating_rounds(fns, repeats, device, warmup=warmup)
        med = {key: statistics.median(value) for key, value in times.items()}
        slc_q25, slc_q75 = ratio_quartiles(times["slc"], times["backbone"])
        row = {"backbone": name, "d": d, "classes": k, "log2_classes": round(float(torch.tensor(k).log2()), 3),
               "batch": batch, "device": str(device), "backbone_macs": macs,
               **{f"{key}_ms_per_example": round(1e3 * value / batch, 6) for key, value in med.items()},
               "speedup": round(paired_ratio(times["all"], times["slc"]), 4), "bound": round(bound(macs, k, d), 4),
               "slc_over_backbone": round(paired_ratio(times["slc"], times["backbone"]), 4),
               "slc_over_backbone_q25": round(slc_q25, 4), "slc_over_backbone_q75": round(slc_q75, 4),
               "all_over_linear": round(paired_ratio(times["all"], times["linear"]), 4), "repeats": repeats,
               "warmup": warmup}
        row["meets_slc_target"] = bool(row["slc_over_backbone"] <= TARGET_SLC)
        row["meets_all_target"] = bool(row["all_over_linear"] <= TARGET_ALL)
        rows.append(row)
        log(f"{name:>12} k={k:>7}: slc {row['slc_ms_per_example']:.4f} ms/ex, all {row['all_ms_per_example']:.4f}"
            f" ms/ex, speed-up x{row['speedup']:.2f} (bound x{row['bound']:.2f}); slc/backbone "
            f"{row['slc_over_backbone']:.3f}, all/nn.Linear {row['all_over_linear']:.3f}")
        del head, linear, fns
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(backbones: Sequence[str] | None = None, classes: Sequence[int] = CLASSES, batch: int = 32,
        repeats: int = 31, device: str = "cpu", out: str | Path | None = "results/bench/speed", seed: int = 0,
        plot: bool = True, log: Callable[[str], None] = lambda s: None, warmup: int = 5) -> dict[str, Any]:
    """Measure every backbone (default: all of ``PAPER``, torchvision ones only if importable) at every ``k``;
    write ``out.{csv,json,png}``. Returns ``{"rows", "skipped", "environment", "files"}``."""
    from ..core.extras import MissingDependencyError

    for label, value in (("batch", batch), ("repeats", repeats), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if not classes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in classes):
        raise ValueError(f"classes must be positive integers, got {list(classes)!r}")
    explicit = backbones is not None
    names = list(backbones) if explicit else list(PAPER)
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown backbone {', '.join(map(repr, unknown))}; valid names: {', '.join(BACKBONES)}")
    if device == "cpu":
        steady_allocator()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            rows += measure(name, classes, batch=batch, repeats=repeats, device=device, seed=seed, log=log,
                            warmup=warmup)
        except MissingDependencyError as err:
            skipped[name] = str(err)
            log(f"note: skipping {name}: torchvision cannot be imported here")
    env = environment()
    files: list[str] = []
    if out is not None and rows:
        device_name = env["cuda"] if torch.device(device).type == "cuda" else env["processor"]
        files += [str(p) for p in write_results(out, rows, description=__doc__.strip().splitlines()[0],
                                                device=device, device_name=device_name, skipped=skipped,
                                                targets={"slc_over_backbone": TARGET_SLC,
                                                         "all_over_linear": TARGET_ALL})]
        if plot:
            files.append(str(_plot(rows, Path(out).with_suffix(".png"), device_name)))
    return {"rows": rows, "skipped": skipped, "environment": env, "files": files}


def _plot(rows: list[dict[str, Any]], path: Path, device_name: str) -> Path:
    """Figure 1 of the paper: speed-up of one logit over k logits against k (log₂ axis), the bound dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["backbone"] for r in rows)):
        mine = sorted((r for r in rows if r["backbone"] == name), key=lambda r: r["classes"])
        ks = [r["log2_classes"] for r in mine]
        colour = f"C{i}"
        ax.plot(ks, [r["speedup"] for r in mine], "o-", color=colour, label=f"{name} (d={mine[0]['d']})")
        ax.plot(ks, [r["bound"] for r in mine], "--", color=colour, alpha=0.6, lw=1)
    ax.set_yscale("log")
    ticks = sorted({r["log2_classes"] for r in rows})
    ax.set_xticks(ticks, [f"$2^{{{t:g}}}$" for t in ticks])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("number of classes k (log₂)")
    ax.set_ylabel("speed-up: time(k logits) / time(1 logit)")
    ax.set_title(f"Single-logit speed-up, batch {rows[0]['batch']}, {device_name}\n"
                 "(solid: measured; dashed: multiply-add bound (B + k·d)/(B + d))", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in BACKBONES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backbone {', '.join(map(repr, unknown))}; "
                                         f"valid names: {', '.join(BACKBONES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--classes", type=int_list, default=list(CLASSES),
                        help="comma-separated k values, integers or 2^x (default 2^10,2^14,2^16,2^18,2^18.5)")
    parser.add_argument("--backbones", type=_name_list, default=None,
                        help=f"comma-separated, from {', '.join(BACKBONES)} (default: all; torchvision ones "
                             "are skipped with a note when torchvision cannot be imported)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=31, help="timed rounds per measurement (median)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed calls of each forward pass first (default 5; 1 is enough for the seconds-long "
                             "torchvision backbones on a CPU)")
    parser.add_argument("--out", default="results/bench", help="folder for speed.{csv,json,png}")
    add_threads_argument(parser)


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench speed``."""
    if args.device == "cpu":
        apply_threads(args.threads)
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    result = run(backbones=args.backbones, classes=args.classes, batch=args.batch_size, repeats=args.repeats,
                 device=args.device, out=f"{args.out}/speed", log=log, warmup=args.warmup)
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
        return 0
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    print(text_table([[r["backbone"], r["classes"], f"{r['slc_ms_per_example']:.4f}", f"{r['all_ms_per_example']:.4f}",
                       f"x{r['speedup']:.2f}", f"x{r['bound']:.2f}", f"{r['slc_over_backbone']:.3f}",
                       f"{r['all_over_linear']:.3f}"] for r in result["rows"]],
                     ["backbone", "k", "1 logit ms/ex", "k logits ms/ex", "speed-up", "bound",
                      f"slc/backbone (≤{TARGET_SLC})", f"all/nn.Linear (≤{TARGET_ALL})"]))
    if result["files"]:
        print("wrote " + ", ".join(result["files"]))
    return 0
