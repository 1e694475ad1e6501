"""Forward + backward time of every registered loss as a ratio to ``torch.nn.functional.cross_entropy``,
timed in the same run on the same logits (batch 256, 1000 classes by default).

    python -m logitsep.bench.losses          # or: logitsep bench losses

Targets (issue 3): every loss of the paper within 2× of CE; ``smooth_topk_svm`` (k = 5) within 10×.
Timing interleaves the baseline with each loss round by round (the order reversed every other round; a timing is
at least 10 ms of back-to-back calls), and the ratio is the median over ``rounds`` of the ratio within a round,
so that a slow phase of a shared machine, which hits both sides of a round, cancels (the quartiles of the
per-round ratios and the best-against-best ratio are recorded too). For the cosine losses the baseline is
``F.cross_entropy(scale·cos, y)``, the softmax they build on. On CPU the default is one thread:
on a small shared machine, two OpenMP threads contending with another process make every kernel erratic
(we saw F.cross_entropy vary 50× run to run), while one thread measures the work itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table
from ..losses import LOSSES, get_loss, loss_spec
from ._common import alternating_rounds, environment, paired_ratio, ratio_quartiles, steady_allocator, write_results

PAPER_LOSSES = ("ce", "max_margin", "self_norm", "nce", "bce", "batch_ce", "batch_max_margin")
TARGETS = {**{name: 2.0 for name in PAPER_LOSSES}, "smooth_topk_svm": 10.0}
LOSS_KWARGS: dict[str, dict[str, Any]] = {"smooth_topk_svm": {"k": 5}}


def _step(fn, base: torch.Tensor, target: torch.Tensor):
    def run() -> None:
        z = base.detach().requires_grad_(True)
        fn(z, target).backward()

    return run


def run(batch: int = 256, k: int = 1000, rounds: int = 41, out: str | Path | None = "results/bench/loss_speed",
        seed: int = 0, device: str = "cpu", plot: bool = True, threads: int | None = 1) -> dict[str, Any]:
    if threads is not None and device == "cpu":
        torch.set_num_threads(threads)
    steady_allocator()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k, generator=gen).to(device)
    cosines = (torch.rand(batch, k, generator=gen) * 1.98 - 0.99).to(device)
    target = torch.randint(0, k, (batch,), generator=gen).to(device)
    rows = []
    for name in sorted(LOSSES):
        loss_fn = get_loss(name, **LOSS_KWARGS.get(name, {}))
        if loss_spec(name).inputs == "cosines":
            # The cosine losses take a softmax of scale·cos: the baseline is cross-entropy on those same logits
            # (logits in ±scale make exp() produce subnormal numbers, which slows CE itself several-fold on CPU).
            inputs, scale = cosines, float(loss_fn.scale)
            baseline = _step(lambda c, y, s=scale: F.cross_entropy(c * s, y), inputs, target)
        else:
            inputs = logits
            baseline = _step(F.cross_entropy, inputs, target)
        candidate = _step(loss_fn, inputs, target)
        times = alternating_rounds({"ce": baseline, "loss": candidate}, rounds, device, warmup=3)
        base_times, cand_times = times["ce"], times["loss"]
        ratio = paired_ratio(cand_times, base_times)
        q25, q75 = ratio_quartiles(cand_times, base_times)
        target_ratio = TARGETS.get(name)
        rows.append({"loss": name, "kwargs": str(LOSS_KWARGS.get(name, {})), "batch": batch, "classes": k,
                     "device": device, "ce_us": round(1e6 * statistics.median(base_times), 2),
                     "loss_us": round(1e6 * statistics.median(cand_times), 2), "ratio_to_ce": round(ratio, 3),
                     "ratio_q25": round(q25, 3), "ratio_q75": round(q75, 3),
                     "best_over_best": round(min(cand_times) / min(base_times), 3), "rounds": rounds,
                     "target": target_ratio,
                     "meets_target": None if target_ratio is None else bool(ratio <= target_ratio)})
        print(f"{name:>18}: {rows[-1]['loss_us']:9.1f} us vs CE {rows[-1]['ce_us']:8.1f} us  "
              f"x{ratio:.2f}" + ("" if target_ratio is None else f"  (target <= {target_ratio:g}x)"),
              file=sys.stderr)
    result = {"rows": rows, "environment": environment()}
    if out is not None:
        write_results(out, rows, description=__doc__.strip().splitlines()[0])
        if plot:
            _plot(rows, Path(out).with_suffix(".png"))
    return result


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    import matplotlib.ticker

    rows = sorted(rows, key=lambda r: r["ratio_to_ce"])
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.5))
    colours = ["tab:green" if r["meets_target"] else ("tab:red" if r["meets_target"] is False else "tab:gray")
               for r in rows]
    ratio = [r["ratio_to_ce"] for r in rows]
    spread = None
    if all("ratio_q25" in r for r in rows):  # the quartiles of the per-round ratios as error bars
        spread = [[max(0.0, x - r["ratio_q25"]) for x, r in zip(ratio, rows, strict=True)],
                  [max(0.0, r["ratio_q75"] - x) for x, r in zip(ratio, rows, strict=True)]]
    ax.barh([r["loss"] for r in rows], ratio, color=colours, xerr=spread, ecolor="black", capsize=2)
    for limit in sorted({r["target"] for r in rows if r["target"]}):
        ax.axvline(limit, color="black", lw=0.8, ls="--")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    ax.set_xlabel(f"forward+backward time / F.cross_entropy (batch {rows[0]['batch']}, {rows[0]['classes']} classes)")
    ax.set_title("Loss speed relative to cross-entropy (dashed: targets 2x, 10x;\nbars: median of per-round ratios, "
                 "whiskers: quartiles)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main() -> None:
    run()


if __name__ == "__main__":
    main()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=256, help="batch size")
    parser.add_argument("--k", type=int, default=1000, help="classes")
    parser.add_argument("--rounds", type=int, default=41, help="interleaved rounds per loss (median of ratios)")
    parser.add_argument("--out", default="results/bench", help="folder for loss_speed.{csv,json,png}")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench losses``."""
    for label, value, least in (("--batch", args.batch, 1), ("--k", args.k, 2), ("--rounds", args.rounds, 1)):
        if value < least:
            raise ValueError(f"{label} must be at least {least}, got {value}")
    result = run(batch=args.batch, k=args.k, rounds=args.rounds, out=f"{args.out}/loss_speed")
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
        return 0
    print(text_table([[r["loss"], f"{r['loss_us']:.0f}", f"{r['ce_us']:.0f}", f"{r['ratio_to_ce']:.2f}",
                       "–" if r["target"] is None else f"≤ {r['target']:g}"] for r in result["rows"]],
                     ["loss", "µs (fwd+bwd)", "CE µs", "× CE", "target"]))
    print(f"wrote {args.out}/loss_speed.*")
    return 0
