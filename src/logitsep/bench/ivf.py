"""Approximate class search on real embeddings: FAISS IVF's recall and speed-up against the exact search, over an
``nprobe`` sweep, on the item vectors a trained run gives every example of its dataset.

    logitsep bench ivf --run /work/runs/distill-mnist/batch_ce --run /work/runs/fmnist-batch_ce \\
        --nprobes 1,2,4,8,16,32,64 --out results/bench/ivf-real

``logitsep bench search`` measures IVF on synthetic, well-separated Gaussian clusters; users' embeddings are
harder. Here the items are ``head.item_vectors(model.embed(x))`` (``[h, 1]``, what ``logitsep index`` stores) for
every example of the run's dataset (train + valid + test, ``--splits``), cached as an
:class:`~logitsep.search.EmbeddingIndex` under ``--cache`` (keyed by the head's fingerprint). The queries are the
class vectors ``[W_c, b_c]`` of ``--queries`` classes drawn with ``--seed`` (every class when there are fewer),
the query the service answers for "items of class c", with three thresholds:

* ``global``: the run's calibrated global threshold (``thresholds.json``), the default of the service's
  ``/search`` and ``/stream``;
* ``per_class``: the class's calibrated threshold, the default of ``logitsep query`` (``threshold_for``);
* ``class_size``: midway between the scores of the ``n_c``-th and the next best item, ``n_c`` the number of
  examples labelled ``c``: a query that returns as many items as the class has (the fringe of the class
  included; the hardest of the three).

For each run, each ``--nlist`` (default: the library's, ``√N``) and each ``nprobe``: the pooled recall of the
threshold query (Σ found ∩ exact / Σ exact over the queries) and of the top-100, the fraction of the items the
probed lists hold, and the speed-up: time of the exact search / time of the IVF search, one query per call for
both, the median over ``--repeats`` interleaved rounds of the ratio within each round (``paired_ratio``: a slow
phase of a shared machine hits both sides). The exact search is :meth:`EmbeddingIndex.search` as opened by default
(float16 screen, then float32 re-scoring).

Target (issue 20): ≥ 10× the exact search at recall ≥ 0.95 on real embeddings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ..core.provenance import cpu_model
from ..core.tables import text_table
from ..data import load_dataset
from ..runs import THRESHOLDS, load_run
from ..search import HEADER, EmbeddingIndex, SearchResult
from ..thresholds import Thresholds
from ._common import apply_threads, paired_ratio, ratio_quartiles, steady_allocator, write_results
from .search import TARGET_RECALL, TARGET_SPEEDUP, TOP_K, cpu_slug, pooled_recall, search_rounds

SYNTHETIC = f"results/bench/search-{cpu_slug()}.json"  # the synthetic curve of `logitsep bench search` on this CPU

SPLITS = ("train", "valid", "test")
KINDS = ("global", "per_class", "class_size")


def default_cache() -> Path:
    return Path(os.environ.get("LOGITSEP_CACHE", "~/.cache/logitsep")).expanduser() / "bench-ivf"


@torch.no_grad()
def embed_run(run_dir: str | os.PathLike, cache: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS,
              batch_size: int = 1024, log: Callable[[str], None] = lambda s: None
              ) -> tuple[EmbeddingIndex, np.ndarray, Any]:
    """The item vectors of every example of ``splits`` of the run's dataset, as an :class:`EmbeddingIndex` (opened
    read-only) under ``cache``, their labels, and the run. Built once per head (the folder is named by the head's
    fingerprint) and reused; rows are in split order, each split in its own order, as ``logitsep index`` stores
    one split."""
    run = load_run(run_dir, "cpu", enrolled=False)
    model, head = run.model.eval(), run.model.head
    fingerprint = head.fingerprint()
    base = Path(cache) if cache is not None else default_cache()
    folder = base / f"{Path(run_dir).resolve().name}-{'+'.join(splits)}-{fingerprint[:16]}"
    if (folder / "index" / HEADER).is_file() and (folder / "labels.npy").is_file():
        index, labels = EmbeddingIndex.open(folder / "index"), np.load(folder / "labels.npy")
        if index.meta.get("head_sha256") == fingerprint and len(index) == len(labels):
            log(f"{run_dir}: {len(index)} cached item vectors in {folder}")
            return index, labels, run
        index.close()
    data = load_dataset(run.config.dataset)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".build", dir=base))
    meta = {"run": str(Path(run_dir).resolve()), "dataset": data.name, "splits": list(splits),
            "model": run.spec.architecture, "loss": run.spec.loss, "step": run.step, "head_sha256": fingerprint,
            "head_rows": head.k, "num_classes": head.k, "embedding_dim": head.d}
    try:
        labels = []
        began = time.perf_counter()
        with EmbeddingIndex.create(tmp / "index", head.d + 1, meta=meta) as index:
            for split in splits:
                x, y = data.split(split)
                labels.append(torch.as_tensor(y[0:len(y)]).numpy().astype(np.int64))
                for start in range(0, len(x), batch_size):
                    index.append(head.item_vectors(model.embed(torch.as_tensor(x[start:start + batch_size]))))
                    if start % (64 * batch_size) == 0:
                        log(f"  embedding {data.name}/{split}: {start}/{len(x)} ({time.perf_counter() - began:.0f} s)")
        np.save(tmp / "labels.npy", np.concatenate(labels))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{run_dir}: embedded {len(np.load(folder / 'labels.npy'))} examples in {time.perf_counter() - began:.0f} s")
    return EmbeddingIndex.open(folder / "index"), np.load(folder / "labels.npy"), run


def class_thresholds(run: Any, index: EmbeddingIndex, labels: np.ndarray, classes: np.ndarray,
                     queries: torch.Tensor) -> dict[str, np.ndarray]:
    """The threshold of each query class under each of :data:`KINDS` (module docstring)."""
    path = Path(run.path) / THRESHOLDS
    if not path.is_file():
        raise ValueError(f"{run.path} has no {THRESHOLDS}: run `logitsep calibrate {run.path}` first")
    thresholds = Thresholds.load(path)
    sizes = np.bincount(labels, minlength=int(classes.max()) + 1)[classes]
    tops = index.search(queries, top_k=int(max(sizes.max(), 1)) + 1)

    def between(scores: np.ndarray, size: int) -> float:
        """Midway between the ``size``-th and the next best score: no item sits on the threshold, where the
        rounding of one search or the other would decide."""
        if size <= 0:
            return math.inf
        last = float(scores[min(size, len(scores)) - 1])
        return (last + float(scores[size])) / 2 if size < len(scores) else last

    size_thr = np.array([between(r.scores, int(s)) for r, s in zip(tops, sizes, strict=True)], np.float64)
    return {"global": np.full(len(classes), thresholds.global_threshold, np.float64),
            "per_class": np.array([thresholds.per_class[int(c)] for c in classes], np.float64),
            "class_size": size_thr}


def brute_force(vectors: np.ndarray, queries: np.ndarray, thresholds: Sequence[float]) -> list[np.ndarray]:
    """The ids scoring ``≥ threshold`` for each query, in float64 (the reference the tests check against)."""
    scores = vectors.astype(np.float64) @ queries.astype(np.float64).T
    return [np.flatnonzero(scores[:, j] >= t) for j, t in enumerate(thresholds)]


def one_by_one(searcher: Any, queries: torch.Tensor, thresholds: np.ndarray | None = None,
               top_k: int | None = None) -> list[SearchResult]:
    """Each query in its own call (what a client asking for one class gets)."""
    if thresholds is None:
        return [searcher.search(v, top_k=top_k) for v in queries]
    return [searcher.search(v, threshold=float(t), top_k=top_k) for v, t in zip(queries, thresholds, strict=True)]


def measure_run(run_dir: str | os.PathLike, nprobes: Sequence[int], nlists: Sequence[int | None] = (None,),
                queries: int = 16, repeats: int = 5, seed: int = 0, cache: str | os.PathLike | None = None,
                splits: Sequence[str] = SPLITS, kinds: Sequence[str] = KINDS,
                log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Rows of the benchmark (module docstring) for one run: one per nlist × threshold kind × nprobe."""
    index, labels, run = embed_run(run_dir, cache, splits, log=log)
    try:
        head = run.model.head
        k, n = head.k, len(index)
        classes = np.sort(torch.randperm(k, generator=torch.Generator().manual_seed(seed))[:min(queries, k)].numpy())
        q = head.class_vectors(torch.as_tensor(classes)).contiguous()
        thr = class_thresholds(run, index, labels, classes, q)
        exact = {kind: one_by_one(index, q, thr[kind]) for kind in kinds}
        exact_top = one_by_one(index, q, top_k=TOP_K)
        common = {"dataset": run.config.dataset, "run": str(run_dir), "loss": run.spec.loss,
                  "model": run.spec.architecture, "items": n, "dim": index.dim, "classes": k, "queries": len(classes)}
        rows: list[dict[str, Any]] = []
        for nlist in nlists:
            began = time.perf_counter()
            approx = index.approximate("ivf", nlist=nlist, seed=seed)
            build_s = time.perf_counter() - began
            probes = sorted({p for p in nprobes if 1 <= p <= approx.nlist})
            log(f"{common['dataset']}: {n} items x {index.dim}, IVF nlist {approx.nlist} built in {build_s:.1f} s")
            fns: dict[str, Callable[[], object]] = {}
            for kind in kinds:
                fns[f"exact {kind}"] = lambda kind=kind: one_by_one(index, q, thr[kind])
                for p in probes:
                    def ivf(p: int = p, kind: str = kind, approx: Any = approx) -> list[SearchResult]:
                        approx.nprobe = p
                        return one_by_one(approx, q, thr[kind])
                    fns[f"ivf {p} {kind}"] = ivf
            times = search_rounds(fns, repeats)
            for kind in kinds:
                results = sum(len(r) for r in exact[kind]) / len(classes)
                exact_ms = 1e3 * float(np.median(times[f"exact {kind}"])) / len(classes)
                for p in probes:
                    approx.nprobe = p
                    found = one_by_one(approx, q, thr[kind])
                    found_top = one_by_one(approx, q, top_k=TOP_K)
                    per_query = [len(np.intersect1d(f.ids, e.ids)) / len(e) for f, e in zip(found, exact[kind],
                                                                                            strict=True) if len(e)]
                    name = f"ivf {p} {kind}"
                    low, high = ratio_quartiles(times[f"exact {kind}"], times[name])
                    row = {**common, "nlist": approx.nlist, "nprobe": p, "threshold": kind,
                           "mean_results": round(results, 2),
                           "recall_threshold": pooled_recall(found, exact[kind]),
                           "recall_threshold_worst_query": min(per_query) if per_query else 1.0,
                           "recall_top_k": pooled_recall(found_top, exact_top),
                           "speedup_vs_exact": paired_ratio(times[f"exact {kind}"], times[name]),
                           "speedup_q25": low, "speedup_q75": high,
                           "exact_ms_per_query": exact_ms,
                           "ivf_ms_per_query": 1e3 * float(np.median(times[name])) / len(classes),
                           "scanned_fraction": float(np.mean([r.scanned for r in found])) / n,
                           "build_s": build_s, "repeats": repeats}
                    rows.append({key: (round(v, 6) if isinstance(v, float) else v) for key, v in row.items()})
                    log(f"  nlist {approx.nlist} nprobe {p:>3} {kind:>10}: recall {row['recall_threshold']:.4f} "
                        f"(top-{TOP_K} {row['recall_top_k']:.4f}), x{row['speedup_vs_exact']:.1f}, "
                        f"scans {row['scanned_fraction']:.2%}, {results:.0f} results/query")
        return rows
    finally:
        index.close()


def best_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset, nlist and threshold kind: the fastest row at recall ≥ 0.95 (None when none reaches it), and
    the best recall seen, for the summary."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["run"], r["nlist"], r["threshold"]), []).append(r)
    out = []
    for (dataset, run, nlist, kind), group in groups.items():
        ok = [r for r in group if r["recall_threshold"] >= TARGET_RECALL]
        best = max(ok, key=lambda r: r["speedup_vs_exact"]) if ok else None
        at10 = [r for r in group if r["speedup_vs_exact"] >= TARGET_SPEEDUP]
        out.append({"dataset": dataset, "run": run, "nlist": nlist, "threshold": kind,
                    "nprobe_at_target_recall": None if best is None else best["nprobe"],
                    "speedup_at_target_recall": None if best is None else best["speedup_vs_exact"],
                    "recall_at_10x": max((r["recall_threshold"] for r in at10), default=None),
                    "target_met": bool(best is not None and best["speedup_vs_exact"] >= TARGET_SPEEDUP)})
    return out


def synthetic_curve(path: str | os.PathLike) -> dict[str, Any] | None:
    """The IVF rows (one query per call) of ``logitsep bench search``'s JSON, for the comparison; None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    rows = sorted((r for r in data.get("rows", []) if r.get("method") == "ivf, one by one"),
                  key=lambda r: r["nprobe"])
    return {"file": str(path), "items": data.get("items"), "dim": data.get("dim"), "classes": data.get("classes"),
            "nlist": (data.get("approximate") or {}).get("nlist"),
            "cpu": (data.get("environment") or {}).get("processor"),
            "points": [{"nprobe": r["nprobe"], "recall_threshold": r["recall_threshold"],
                        "recall_top_k": r["recall_top_k"], "speedup_vs_exact": r["speedup_vs_exact"]} for r in rows]}


def run(runs: Sequence[str | os.PathLike], nprobes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        nlists: Sequence[int | None] = (None,), queries: int = 16, repeats: int = 5, seed: int = 0,
        cache: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS, kinds: Sequence[str] = KINDS,
        synthetic: str | os.PathLike | None = SYNTHETIC, out: str | os.PathLike | None = None,
        plot: bool = True, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every run; write ``out/ivf.{csv,json,png}`` when ``out`` is given; return the summary with
    ``rows``."""
    if not runs:
        raise ValueError("give at least one --run")
    for name, value in (("queries", queries), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"threshold kinds must be among {', '.join(KINDS)}, got {list(kinds)}")
    steady_allocator()
    rows: list[dict[str, Any]] = []
    for r in runs:
        rows += measure_run(r, nprobes, nlists, queries, repeats, seed, cache, splits, kinds, log)
    result: dict[str, Any] = {
        "description": __doc__.strip().splitlines()[0], "splits": list(splits), "threshold_kinds": list(kinds),
        "top_k": TOP_K, "target": {"recall": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "threads": torch.get_num_threads(), "cpu_model": cpu_model(), "best": best_rows(rows),
        "synthetic": synthetic_curve(synthetic) if synthetic is not None else None}
    if out is not None:
        stem = Path(out) / "ivf"
        files = [str(p) for p in write_results(stem, rows, **result)]
        if plot:
            files.append(str(_plot(rows, result, stem.with_suffix(".png"))))
        result["files"] = files
    result["rows"] = rows
    return result


def _plot(rows: Sequence[dict[str, Any]], result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    kinds = result["threshold_kinds"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.4), squeeze=False, sharey=True)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["nlist"], r["threshold"]), []).append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = sorted({(d, nl) for d, nl, _ in groups})
    datasets = sorted({d for d, _ in labels})
    nlists = sorted({nl for _, nl in labels})
    styles = ["o-", "s--", "^:", "d-.", "v-"]
    synthetic = result.get("synthetic")
    for ax, kind in zip(axes[0], kinds, strict=True):
        for dataset, nlist in labels:
            group = sorted(groups.get((dataset, nlist, kind), []), key=lambda r: r["nprobe"])
            if not group:
                continue
            colour = colours[datasets.index(dataset) % len(colours)]
            ax.plot([r["speedup_vs_exact"] for r in group], [r["recall_threshold"] for r in group],
                    styles[nlists.index(nlist) % len(styles)], color=colour, ms=4,
                    label=f"{dataset} ({group[0]['items']:,} items, nlist {nlist})")
            for r in group:
                ax.annotate(str(r["nprobe"]), (r["speedup_vs_exact"], r["recall_threshold"]), fontsize=6,
                            textcoords="offset points", xytext=(3, -8), color=colour)
        if synthetic and synthetic["points"]:
            pts = synthetic["points"]
            ax.plot([p["speedup_vs_exact"] for p in pts], [p["recall_threshold"] for p in pts], "s--",
                    color="gray", alpha=0.7,
                    label=f"synthetic ({synthetic['items']:,} items, d {synthetic['dim']}, bench search)")
        ax.axhline(TARGET_RECALL, color="black", ls="--", lw=0.8)
        ax.axvline(TARGET_SPEEDUP, color="black", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over the exact search (one query per call)")
        ax.set_title(f"threshold: {kind}", fontsize=10)
        ax.legend(fontsize=6, loc="lower left")
    axes[0][0].set_ylabel("recall of the threshold query")
    fig.suptitle("FAISS IVF on real embeddings (numbers: nprobe; target: recall ≥ 0.95 at ≥ 10×)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", action="append", required=True, help="a trained run folder (repeatable)")
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64", help="comma-separated IVF nprobe values")
    parser.add_argument("--nlist", default=None,
                        help="IVF lists, comma-separated for a sweep; auto: the library's default, √N "
                             "(default: auto)")
    parser.add_argument("--queries", type=int, default=16, help="classes searched per run (every class if fewer)")
    parser.add_argument("--threshold", default=",".join(KINDS),
                        help=f"comma-separated threshold kinds among {', '.join(KINDS)}")
    parser.add_argument("--splits", default=",".join(SPLITS), help="the dataset splits whose examples are the items")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median of the paired ratios)")
    parser.add_argument("--seed", type=int, default=0, help="the classes drawn and the k-means seed")
    parser.add_argument("--cache", default=None,
                        help="folder of the cached item vectors (default: $LOGITSEP_CACHE/bench-ivf or "
                             "~/.cache/logitsep/bench-ivf)")
    parser.add_argument("--synthetic", default=SYNTHETIC,
                        help="logitsep bench search's JSON, drawn beside for comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)")
    parser.add_argument("--out", default="results/bench/ivf-real", help="folder for ivf.{csv,json,png}")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench ivf``."""
    apply_threads(args.threads)
    tokens = [t.strip() for t in (args.nlist or "auto").split(",") if t.strip()]
    nlists: list[int | None] = [None if t == "auto" else _ints(t, "--nlist")[0] for t in tokens] or [None]
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    result = run(args.run, _ints(args.nprobes, "--nprobes"), nlists, queries=args.queries, repeats=args.repeats,
                 seed=args.seed, cache=args.cache, splits=[s for s in args.splits.split(",") if s],
                 kinds=[s for s in args.threshold.split(",") if s], synthetic=args.synthetic, out=args.out, log=log)
    if args.json:
        print(json.dumps({k: result[k] for k in ("best", "files") if k in result}, indent=2, default=json_default))
        return 0
    print(text_table([[r["dataset"], r["items"], r["nlist"], r["nprobe"], r["threshold"], f"{r['mean_results']:.0f}",
                       f"{r['recall_threshold']:.4f}", f"{r['recall_top_k']:.4f}", f"x{r['speedup_vs_exact']:.1f}",
                       f"{r['scanned_fraction']:.2%}"] for r in result["rows"]],
                     ["dataset", "items", "nlist", "nprobe", "threshold", "results", "recall", f"top-{TOP_K}",
                      "speed-up", "scanned"]))
    for b in result["best"]:
        reach = ("not reached" if b["nprobe_at_target_recall"] is None else
                 f"nprobe {b['nprobe_at_target_recall']}: x{b['speedup_at_target_recall']:.1f}")
        print(f"{b['dataset']} nlist {b['nlist']} {b['threshold']}: recall ≥ {TARGET_RECALL} {reach}; "
              f"best recall at ≥ {TARGET_SPEEDUP:.0f}x: {b['recall_at_10x']}")
    print("wrote " + ", ".join(result.get("files", [])))
    return 0


__all__ = ["KINDS", "SPLITS", "brute_force", "class_thresholds", "embed_run", "measure_run", "run"]
