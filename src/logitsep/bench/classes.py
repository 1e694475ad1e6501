"""One training step against the number of classes k: the exact losses (every logit) and their sampled forms.

A step is forward + backward + optimizer step of a small model: features ``h = ReLU(Linear(dim, dim)(x))`` of a
fixed random batch, then the head (``k × dim`` weight and bias) and the loss. ``exact``: the registered loss on all
``[batch, k]`` logits, ``torch.optim.SGD`` (momentum 0.9) over every parameter, as ``logitsep train`` does.
``sampled``: the loss's sampled form (:mod:`logitsep.losses.sampled`, ``--sampled`` candidate draws per step) and
:class:`logitsep.optim.RowSparseSGD`, as ``logitsep train --sampled`` does.

Every ``ms_per_step`` is a median over rounds in which every k of a path is timed once (order reversed every other
round); ``ratio`` is the median over rounds of the time at k over the time at the smallest k **of the same path in
the same round** (paired: the machine's drift cancels). ``peak_mb``: the peak resident memory of a fresh process that
builds the model and takes three steps, minus its resident memory before building it (``/proc/self/status``
VmHWM / VmRSS): parameters, optimizer state and the step's temporaries. Target: sampled at the largest k within
1.3x of sampled at the smallest.

**Candidates** (``--sampled``, default 512): below the smallest default k, so that every k takes the same sampled
step (draw, catch-up, sampled loss, row-sparse update) and the ratio measures how its cost grows with k. With
``num_sampled >= k`` the sampled form *is* the exact loss over every class (full coverage, no draw, every row updated
at every step: nothing to catch up); rows where that holds say ``"full_coverage": true``, and their ratio compares
two different steps (measured and kept in ``results/bench/classes-s1024``). **Huge pages**: the sampled head and its
momentum buffer are placed as training places them (:mod:`logitsep.core.hugepages`; ``"huge_pages"`` in each
sampled row); ``--pages ordinary`` measures without, ``--pages both`` both in the same rounds (``huge_vs_ordinary``:
their paired ratio at each k).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import hugepages
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table
from ..losses import LOSSES, SampledLoss, get_loss, loss_spec
from ..optim import RowSparseSGD
from ..train import sampled_loss
from ._common import (
    add_threads_argument,
    alternating_rounds,
    apply_threads,
    int_list,
    paired_ratio,
    steady_allocator,
    write_results,
)

CLASSES = (1000, 10_000, 100_000, 1_000_000)
PATHS = ("exact", "sampled")
PAGES = ("auto", "ordinary", "both")
TARGET = 1.3


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def build_step(path: str, loss: str, k: int, dim: int, batch: int, sampled: int, seed: int = 0) -> Callable[[], None]:
    """A closure taking one training step of ``path`` (see the module docstring) at ``k`` classes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen)
    y = torch.randint(k, (batch,), generator=gen)
    features = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
    head = nn.Linear(dim, k)
    params = list(features.parameters()) + list(head.parameters())
    if path == "exact":
        loss_fn = get_loss(loss)
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

        def objective() -> torch.Tensor:
            return loss_fn(head(features(x)), y)
    else:
        sampled_fn = SampledLoss(loss, sampled)
        hugepages.place(head)  # as training does (core.hugepages; off with LOGITSEP_HUGE_PAGES=0)
        opt = RowSparseSGD(params, lr=0.01, momentum=0.9)

        def objective() -> torch.Tensor:  # as training does: candidates, their rows brought up to date, the loss
            return sampled_loss(sampled_fn, opt, head, y, lambda: features(x))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        objective().backward()
        opt.step()

    return step


def _peak_child(args: tuple[str, str, int, int, int, int, int], queue: Any) -> None:
    path, loss, k, dim, batch, sampled, threads = args
    torch.set_num_threads(threads)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # reset VmHWM to the current resident size: the peak of the imports is not the step's
    before = _status_kb("VmRSS")
    step = build_step(path, loss, k, dim, batch, sampled)
    for _ in range(3):
        step()
    queue.put((_status_kb("VmHWM") - before) / 1024)


def peak_mb(path: str, loss: str, k: int, dim: int, batch: int, sampled: int, threads: int) -> float:
    """``peak_mb`` of one configuration, measured in a fresh process (module docstring)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=((path, loss, k, dim, batch, sampled, threads), queue))
    proc.start()
    value = queue.get(timeout=3600)
    proc.join()
    return round(float(value), 1)


def run(classes: Sequence[int] = CLASSES, losses: Sequence[str] = ("nce",), paths: Sequence[str] = PATHS,
        dim: int = 256, batch: int = 256, sampled: int = 512, repeats: int = 7, warmup: int = 2,
        exact_max: int | None = None, out: str | Path | None = "results/bench/classes", memory: bool = True,
        pages: str = "auto", log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time every (loss, path, k); return ``{"rows", "target", "meets_target"}`` and write ``out.{csv,json,png}``.
    ``pages`` (the sampled path's head and momentum buffer): ``"auto"`` as training places them (huge pages where
    available), ``"ordinary"``, or ``"both"``: each k timed in both in the same rounds, the rows in huge pages
    carrying ``huge_vs_ordinary``, their paired ratio."""
    classes = sorted(set(classes))
    for name in losses:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
        if "sampled" in paths and loss_spec(name).sampled is None:
            raise ValueError(f"loss {name!r} has no sampled form; choose from bce, batch_ce, nce")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown path {unknown[0]!r}; valid: {', '.join(PATHS)}")
    if pages not in PAGES:
        raise ValueError(f"unknown pages {pages!r}; valid: {', '.join(PAGES)}")
    trained = hugepages.available()  # what training does here
    if pages == "both" and not trained:
        raise ValueError("pages='both': huge pages are not available here (core.hugepages.available())")
    variants = {"auto": [trained], "ordinary": [False], "both": [True, False]}[pages]
    steady_allocator()
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    for name in losses:
        for path in paths:
            ks = [k for k in classes if path == "sampled" or exact_max is None or k <= exact_max]
            kinds = variants if path == "sampled" else [None]  # the exact path is not placed (as in training)
            steps = {}
            for k in ks:
                for huge in kinds:
                    log(f"building {name} {path} k={k}" + ("" if huge is None else f" huge pages {huge}"))
                    with _huge_pages(huge):  # the momentum buffer is made at the first step: taken here
                        steps[_key(k, huge)] = build_step(path, name, k, dim, batch, sampled)
                        steps[_key(k, huge)]()
            times = alternating_rounds(steps, repeats, warmup=warmup, min_time=0.0)
            for huge in kinds:
                base = times[_key(ks[0], huge)]
                for k in ks:
                    t = times[_key(k, huge)]
                    row = {"classes": k, "loss": name, "path": path,
                           "ms_per_step": round(1e3 * statistics.median(t), 3),
                           "ratio": round(paired_ratio(t, base), 4), "ratio_to_classes": ks[0], "dim": dim,
                           "batch": batch, "sampled": sampled if path == "sampled" else None, "repeats": repeats,
                           "threads": threads}
                    if path == "sampled":
                        row.update(full_coverage=sampled >= k, huge_pages=huge)
                        if pages == "both" and huge:
                            row["huge_vs_ordinary"] = round(paired_ratio(t, times[_key(k, False)]), 4)
                    if memory:
                        with _huge_pages(huge):  # read by the fresh process
                            row["peak_mb"] = peak_mb(path, name, k, dim, batch, sampled, threads)
                    rows.append(row)
                    log(f"{name:>9} {path:>7} k={k:>8}{'' if huge is None else f' huge {huge!s:>5}'}: "
                        f"{row['ms_per_step']:.2f} ms/step, x{row['ratio']:.3f} of k={ks[0]}"
                        + (f", peak {row['peak_mb']:.0f} MB" if memory else ""))
            del steps
            gc.collect()
    judged_pages = trained if trained in variants else variants[0]  # the pages training uses, where timed
    judged = [r for r in rows if r["path"] == "sampled" and r["huge_pages"] == judged_pages]
    meets = {n: bool(max((r for r in judged if r["loss"] == n), key=lambda r: r["classes"])["ratio"] <= TARGET)
             for n in losses if any(r["loss"] == n for r in judged)}
    result: dict[str, Any] = {"rows": rows, "target": TARGET, "meets_target": meets, "files": []}
    if out is not None and rows:
        files = write_results(out, rows, description=__doc__.strip().splitlines()[0], target=TARGET,
                              meets_target=meets)
        result["files"] = [str(p) for p in files] + [str(_plot(rows, Path(out).with_suffix(".png")))]
    return result


def _key(k: int, huge: bool | None) -> str:
    return f"{k}" if huge is None else f"{k}/{'huge' if huge else 'ordinary'}"


@contextlib.contextmanager
def _huge_pages(enabled: bool | None) -> Iterator[None]:
    """Within: :func:`logitsep.core.hugepages.available` says ``enabled`` (``None``: left as it is)."""
    if enabled is None:
        yield
        return
    before = os.environ.get("LOGITSEP_HUGE_PAGES")
    os.environ["LOGITSEP_HUGE_PAGES"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["LOGITSEP_HUGE_PAGES"]
        else:
            os.environ["LOGITSEP_HUGE_PAGES"] = before


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from ..core.provenance import environment

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    both = len({r.get("huge_pages") for r in rows if r["path"] == "sampled"}) > 1
    for i, (name, p, huge) in enumerate(dict.fromkeys((r["loss"], r["path"], r.get("huge_pages")) for r in rows)):
        mine = sorted((r for r in rows if (r["loss"], r["path"], r.get("huge_pages")) == (name, p, huge)),
                      key=lambda r: r["classes"])
        ks = [r["classes"] for r in mine]
        style = "o-" if p == "sampled" else "s--"
        label = f"{name} {p}" + (f" ({'huge' if huge else 'ordinary'} pages)" if both and huge is not None else "")
        axes[0].plot(ks, [r["ms_per_step"] for r in mine], style, color=f"C{i}", label=label)
        if "peak_mb" in mine[0]:
            axes[1].plot(ks, [r["peak_mb"] for r in mine], style, color=f"C{i}", label=label)
    for ax, label in zip(axes, ("ms per step (forward + backward + optimizer)", "peak memory of a step, MB"),
                         strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of classes k")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # the memory panel is empty under --no-memory
            ax.legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"Training step vs k: batch {r0['batch']}, d={r0['dim']}, {r0['threads']} thread(s), "
                 f"{environment()['processor']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int_list, default=list(CLASSES),
                        help="comma-separated k values (default 1000,10000,100000,1000000)")
    parser.add_argument("--loss", default="nce", help="comma-separated losses with a sampled form (default nce)")
    parser.add_argument("--paths", default="exact,sampled", help="exact, sampled or both (default both)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension d (default 256)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sampled", type=int, default=512,
                        help="candidate classes per step (default 512: below the smallest k, see the module docstring)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median; default 7)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--exact-max", type=int, default=None, metavar="K",
                        help="skip the exact path above K classes (default: none skipped)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--pages", choices=PAGES, default="auto",
                        help="the sampled head and its momentum buffer: auto (as training: huge pages where "
                             "available), ordinary, or both (timed in the same rounds; huge_vs_ordinary)")
    parser.add_argument("--out", default="results/bench", help="folder for classes.{csv,json,png}")
    add_threads_argument(parser)


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench classes``."""
    apply_threads(args.threads)
    for label in ("dim", "batch_size", "sampled", "repeats"):
        if getattr(args, label) < 1:
            raise ValueError(f"--{label.replace('_', '-')} must be a positive integer, got {getattr(args, label)}")
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    result = run(classes=args.classes, losses=[s.strip() for s in args.loss.split(",") if s.strip()],
                 paths=[s.strip() for s in args.paths.split(",") if s.strip()], dim=args.dim, batch=args.batch_size,
                 sampled=args.sampled, repeats=args.repeats, warmup=args.warmup, exact_max=args.exact_max,
                 out=f"{args.out}/classes", memory=not args.no_memory, pages=args.pages, log=log)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    pages = {None: "", True: "huge", False: "ordinary"}
    print(text_table([[r["loss"], r["path"], pages[r.get("huge_pages")], r["classes"], f"{r['ms_per_step']:.2f}",
                       f"x{r['ratio']:.3f}", f"{r.get('peak_mb', float('nan')):.0f}",
                       f"x{r['huge_vs_ordinary']:.3f}" if "huge_vs_ordinary" in r else ""] for r in result["rows"]],
                     ["loss", "path", "pages", "k", "ms/step", "vs smallest k", "peak MB", "huge / ordinary"]))
    for name, ok in result["meets_target"].items():
        print(f"{name}: sampled at the largest k {'within' if ok else 'NOT within'} x{TARGET} of the smallest")
    if result["files"]:
        print("wrote " + ", ".join(result["files"]))
    return 0
