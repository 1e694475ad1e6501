"""Class search speed: the exact scan of :class:`~logitsep.search.EmbeddingIndex` against the machine's memory
bandwidth and a plain ``torch.mv`` over the same vectors, and FAISS IVF's recall and speed-up against it.

    logitsep bench search --items 1000000 --dim 512 --json
    # {"items_per_s", "gb_per_s", "bandwidth_gb_per_s", "torch_ratio", ...}

Data, realistic for class search: ``--classes`` unit class means ``m_c`` in ``--dim`` dimensions, items
``h = m_y + ε`` with ``‖ε‖ ≈ --noise`` (Gaussian), stored as ``[h, 1]`` (``dim + 1`` float32) in a temporary index;
the queries are the class vectors ``[m_c, −½]`` of the Gaussian-class linear classifier, whose threshold-0 range
query returns the class's items. The default noise, 0.7, puts the within-class spread at half the distance between
class means (0.7/1.41), about what the paper's MLP gives on digits (test embeddings: 2.0 against 4.1).

Timings are medians over ``--repeats`` rounds that interleave the measurements (a slow phase of a shared machine
hits all of them), after warm-up, all in the same process with the same threads:

* ``bandwidth_gb_per_s``: ``tensor.sum()`` over a tensor as large as the index (a pure streaming read);
* ``torch.mv``: one matrix-vector product over the whole memory-mapped float32 matrix (no filtering);
* every exact path forced in turn (``path screen``, ``path numpy``, ``path torch``, ``path faiss``: the float16
  screen and the float32 kernels of numpy's BLAS, torch and FAISS; :mod:`logitsep.search.paths`), each with its
  ``torch_ratio`` = time(torch.mv) / time(path) (≥ 1: no slower than torch) and ``bandwidth_ratio``, the bytes it
  reads (float16 rows plus the candidates scored from the float32 rows, or every float32 row) per second as a
  share of the bandwidth; like every ratio here, the median of the ratio within each round, where a slow phase of
  the machine hits both sides, not a ratio of two medians;
* exact: ``index.search(class_vector, threshold=0)`` on an index opened with the default ``exact_path="auto"``:
  the path it measured and chose on this machine (``chosen_path``; ``chosen_batch_path`` for 16 queries in one
  call), ``items_per_s``, ``torch_ratio``, ``bandwidth_ratio``; ``float32_equivalent_bandwidth_ratio``: its items
  per second as float32 bytes (the share of the bandwidth a float32 scan would need to keep up);
* ``float32 scan``: the same search with ``screen=False`` (the fastest float32 kernel here);
* IVF (``IndexIVFFlat``, inner product, ``--nlist`` lists) for each ``nprobe`` of ``--nprobes``: recall of the
  threshold query's items and of the top-100 against the exact search, and the speed-up per query (one query
  per call for both; batched calls are reported too).

Targets (issues 5 and 20) at N = 10⁶, d = 512, on every CPU: the default exact search ≥ 75% of the measured
bandwidth and ``torch_ratio ≥ 1``; the IVF index ≥ 10× faster than the exact scan at recall ≥ 0.95 (reported for
the smallest such ``nprobe``). Files: ``OUT/search-<cpu>.{csv,json,png}``, the CPU's model name in the file name,
so that the figures of every machine the benchmark ran on sit side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
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
from ..search import EmbeddingIndex, SearchResult
from ..search.paths import SINGLE_PATHS
from ..search.scan import faiss_available
from ._common import environment, paired_ratio, steady_allocator, write_results

TARGET_BANDWIDTH = 0.75
TARGET_TORCH = 1.0
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0
TOP_K = 100


def make_data(folder: str | Path, items: int, dim: int, classes: int, noise: float = 0.7, seed: int = 0,
              batch_rows: int = 65536) -> tuple[EmbeddingIndex, torch.Tensor]:
    """A synthetic collection clustered by class, as an index at ``folder``, and the ``[classes, dim+1]`` class
    vectors (see the module docstring). Returns the index opened read-only."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    sigma = np.float32(noise / math.sqrt(dim))
    meta = {"synthetic": {"items": items, "dim": dim, "classes": classes, "noise": noise, "seed": seed}}
    with EmbeddingIndex.create(folder, dim + 1, meta=meta) as index:
        for start in range(0, items, batch_rows):
            n = min(batch_rows, items - start)
            rows = np.empty((n, dim + 1), dtype=np.float32)
            rows[:, :dim] = rng.standard_normal((n, dim), dtype=np.float32)
            rows[:, :dim] *= sigma
            rows[:, :dim] += means[rng.integers(classes, size=n)]
            rows[:, dim] = 1.0
            index.append(rows)
    queries = np.concatenate([means, np.full((classes, 1), -0.5, np.float32)], axis=1)
    return EmbeddingIndex.open(folder), torch.from_numpy(queries)


def cpu_slug() -> str:
    """The CPU's model name as a file name part: ``amd-epyc-7b13``, ``intel-xeon-platinum-8481c``."""
    words = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*|\d+-core", " ", cpu_model().lower())
    return "-".join(re.findall(r"[a-z0-9]+", words)) or "cpu"


def exact_paths() -> list[str]:
    """The exact search paths this machine can run (FAISS's only with the ``[search]`` extra)."""
    return [p for p in SINGLE_PATHS if p != "faiss" or faiss_available()]


def pooled_recall(found: Sequence[SearchResult], exact: Sequence[SearchResult]) -> float:
    """Σ |found ∩ exact| / Σ |exact| over the queries (1.0 when the exact results are all empty)."""
    total = sum(len(e) for e in exact)
    hits = sum(len(np.intersect1d(f.ids, e.ids)) for f, e in zip(found, exact, strict=True))
    return hits / total if total else 1.0


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def search_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each function in each of ``repeats`` interleaved rounds, after one warm-up call each.

    A short pause precedes every call: torch and FAISS each bring an OpenMP runtime whose idle threads keep
    spinning for a while after a parallel region, and would otherwise steal the cores of the next measurement.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(0.01)
            times[name].append(_timed(fn))
    return times


def _medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in times.items()}


def run(items: int = 1_000_000, dim: int = 512, classes: int = 1000, queries: int = 16, noise: float = 0.7,
        nlist: int | None = None, nprobes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), repeats: int = 9,
        seed: int = 0, out: str | Path | None = "results/bench/search", plot: bool = True,
        tmp_dir: str | None = None, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the benchmark (module docstring); write ``out.{csv,json,png}``; return the summary with ``rows``."""
    for name, value in (("items", items), ("dim", dim), ("classes", classes), ("queries", queries),
                        ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if queries > classes:
        raise ValueError(f"queries ({queries}) must not exceed classes ({classes}): each query is one class")
    steady_allocator()
    with tempfile.TemporaryDirectory(prefix="logitsep-bench-search-", dir=tmp_dir) as tmp:
        log(f"writing {items} x {dim + 1} float32 vectors ({items * (dim + 1) * 4 / 1e9:.2f} GB) to {tmp}")
        index, class_vecs = make_data(Path(tmp) / "index", items, dim, classes, noise, seed)
        q = class_vecs[torch.randperm(classes, generator=torch.Generator().manual_seed(seed))[:queries]]
        try:
            result = _measure(index, q, nlist, nprobes, repeats, seed, log)
        finally:
            index.close()
    result.update(items=items, dim=dim, stored_dim=dim + 1, classes=classes, queries=queries, noise=noise,
                  threads=torch.get_num_threads(), repeats=repeats, environment=environment())
    if out is not None:
        rows = result.pop("rows")
        files = [str(p) for p in write_results(out, rows, description=__doc__.strip().splitlines()[0],
                                               **{k: v for k, v in result.items() if k != "environment"})]
        if plot:
            files.append(str(_plot(rows, result, Path(out).with_suffix(".png"))))
        result["rows"], result["files"] = rows, files
    return result


def _measure(index: EmbeddingIndex, q: torch.Tensor, nlist: int | None, nprobes: Sequence[int], repeats: int,
             seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    n, nbytes = len(index), len(index) * index.row_bytes
    matrix = index.vectors
    plain = EmbeddingIndex.open(index.path, screen=False)  # the same vectors, float32 paths only
    forced = {p: EmbeddingIndex.open(index.path, exact_path=p) for p in exact_paths()}
    probe_bytes = max(nbytes, 64 << 20)  # the bandwidth probe: as large as the index (at least 64 MiB)
    big = torch.empty(probe_bytes // 4).uniform_()
    q0 = q[0].contiguous()
    single = {"tensor.sum": lambda: big.sum(), "torch.mv": lambda: torch.mv(matrix, q0),
              "exact threshold": lambda: index.search(q0, threshold=0.0),
              f"exact top-{TOP_K}": lambda: index.search(q0, top_k=TOP_K),
              "float32 scan threshold": lambda: plain.search(q0, threshold=0.0)}
    for p, ix in forced.items():
        single[f"path {p}"] = lambda ix=ix: ix.search(q0, threshold=0.0)
    rounds = search_rounds(single, repeats)  # the warm-up call of the auto index measures and chooses its path
    t = _medians(rounds)
    chosen = index.last_path

    def bytes_read(ix: EmbeddingIndex, search: Callable[[], object]) -> float:
        """Bytes a search reads: the float16 rows plus the candidates scored from the float32 rows when the screen
        answered, else every float32 row."""
        search()
        candidates = -1 if ix._screen is None or ix.last_path != "screen" else ix._screen.last_candidates
        return n * index.dim * 2 + candidates * index.row_bytes if candidates >= 0 else nbytes

    read: dict[str, float] = {"tensor.sum": probe_bytes, "torch.mv": nbytes, "float32 scan threshold": nbytes,
                              "exact threshold": bytes_read(index, single["exact threshold"]),
                              f"exact top-{TOP_K}": bytes_read(index, single[f"exact top-{TOP_K}"])}
    for p, ix in forced.items():
        read[f"path {p}"] = bytes_read(ix, single[f"path {p}"])
    single.clear()  # frees the probe tensor
    bandwidth = probe_bytes / t["tensor.sum"] / 1e9
    rows: list[dict[str, Any]] = []
    for name, seconds in t.items():
        rows.append({"method": name, "nprobe": None, "ms_per_query": 1e3 * seconds,
                     "gb_per_s": read[name] / seconds / 1e9,
                     "items_per_s": n / seconds if name != "tensor.sum" else None,
                     "torch_ratio": paired_ratio(rounds["torch.mv"], rounds[name]) if name != "tensor.sum" else None,
                     "bandwidth_ratio": read[name] / probe_bytes * paired_ratio(rounds["tensor.sum"], rounds[name]),
                     "recall_threshold": 1.0 if name.startswith(("exact", "float32", "path")) else None,
                     "recall_top_k": None, "speedup_vs_exact": None, "scanned_fraction": 1.0})
    exact_s = t["exact threshold"]
    by_method = {r["method"]: r for r in rows}
    summary = {"items_per_s": n / exact_s, "gb_per_s": read["exact threshold"] / exact_s / 1e9,
               "bandwidth_gb_per_s": bandwidth, "chosen_path": chosen, "screened": chosen == "screen",
               "torch_ratio": by_method["exact threshold"]["torch_ratio"],
               "bandwidth_ratio": by_method["exact threshold"]["bandwidth_ratio"],
               "float32_scan_torch_ratio": by_method["float32 scan threshold"]["torch_ratio"],
               "float32_scan_bandwidth_ratio": by_method["float32 scan threshold"]["bandwidth_ratio"],
               "paths": {p: {k: by_method[f"path {p}"][k] for k in ("ms_per_query", "torch_ratio", "bandwidth_ratio")}
                         for p in forced},
               "cpu": cpu_model()}
    # items per second as float32 bytes: the share of the bandwidth a float32 scan would need to keep up
    summary["float32_equivalent_bandwidth_ratio"] = nbytes / probe_bytes * paired_ratio(rounds["tensor.sum"],
                                                                                        rounds["exact threshold"])
    plain.close()
    for ix in forced.values():
        ix.close()
    log(f"bandwidth (tensor.sum) {bandwidth:.1f} GB/s; torch.mv {nbytes / t['torch.mv'] / 1e9:.1f} GB/s; "
        + "; ".join(f"{p} x{v['torch_ratio']:.2f} torch.mv ({v['bandwidth_ratio']:.0%} of bandwidth)"
                    for p, v in summary["paths"].items())
        + f"; chosen: {chosen}, x{summary['torch_ratio']:.2f} torch.mv ({summary['bandwidth_ratio']:.0%})")

    # the batch: every query one at a time, and all of them in one call (one scan)
    exact_thr = index.search(q, threshold=0.0)
    summary["chosen_batch_path"] = index.last_path
    exact_top = index.search(q, top_k=TOP_K)
    loops = {"exact one by one": lambda: [index.search(v, threshold=0.0) for v in q],
             "exact batched": lambda: index.search(q, threshold=0.0)}

    approx = None
    if n >= 2:
        began = time.perf_counter()
        approx = index.approximate("ivf", nlist=nlist, seed=seed)
        build_s = time.perf_counter() - began
        log(f"IVF: nlist {approx.nlist}, built in {build_s:.1f} s")
    probes = sorted({p for p in nprobes if approx is not None and 1 <= p <= approx.nlist})
    for p in probes:
        def one_by_one(p: int = p) -> list[SearchResult]:
            approx.nprobe = p
            return [approx.search(v, threshold=0.0) for v in q]

        def batched(p: int = p) -> list[SearchResult]:
            approx.nprobe = p
            return approx.search(q, threshold=0.0)

        loops[f"ivf {p} one by one"], loops[f"ivf {p} batched"] = one_by_one, batched
    lt = _medians(search_rounds(loops, repeats))
    nq = len(q)
    exact_one = lt["exact one by one"] / nq
    for name in ("exact one by one", "exact batched"):
        rows.append({"method": name.replace("exact", "exact threshold,"),
                     "nprobe": None, "ms_per_query": 1e3 * lt[name] / nq,
                     "gb_per_s": None if "one by one" in name else nq * nbytes / lt[name] / 1e9,
                     "items_per_s": nq * n / lt[name], "recall_threshold": 1.0, "recall_top_k": 1.0,
                     "speedup_vs_exact": exact_one / (lt[name] / nq), "scanned_fraction": 1.0,
                     "torch_ratio": None, "bandwidth_ratio": None})
    best = None
    for p in probes:
        approx.nprobe = p
        found = approx.search(q, threshold=0.0)
        found_top = approx.search(q, top_k=TOP_K)
        recall, recall_top = pooled_recall(found, exact_thr), pooled_recall(found_top, exact_top)
        scanned = float(np.mean([r.scanned for r in found])) / n
        for mode in ("one by one", "batched"):
            per_query = lt[f"ivf {p} {mode}"] / nq
            row = {"method": f"ivf, {mode}", "nprobe": p, "ms_per_query": 1e3 * per_query, "gb_per_s": None,
                   "items_per_s": None, "recall_threshold": recall, "recall_top_k": recall_top,
                   "speedup_vs_exact": exact_one / per_query if mode == "one by one"
                   else (lt["exact batched"] / nq) / per_query, "scanned_fraction": scanned,
                   "torch_ratio": None, "bandwidth_ratio": None}
            rows.append(row)
            if mode == "one by one":
                log(f"IVF nprobe {p:>3}: recall {recall:.4f} (top-{TOP_K} {recall_top:.4f}), "
                    f"x{row['speedup_vs_exact']:.1f} faster than the exact scan, scans {scanned:.2%}")
                if best is None and recall >= TARGET_RECALL:
                    best = row
    summary["exact_ms_per_query"] = 1e3 * exact_one
    summary["exact_batched_ms_per_query"] = 1e3 * lt["exact batched"] / nq
    summary["approximate"] = None if approx is None else {
        "kind": "ivf", "nlist": approx.nlist, "build_s": build_s,
        "nprobe": None if best is None else best["nprobe"],
        "recall": None if best is None else best["recall_threshold"],
        "recall_top_k": None if best is None else best["recall_top_k"],
        "speedup": None if best is None else best["speedup_vs_exact"],
        "scanned_fraction": None if best is None else best["scanned_fraction"]}
    summary["targets"] = {
        "bandwidth_ratio >= 0.75": bool(summary["bandwidth_ratio"] >= TARGET_BANDWIDTH),
        "torch_ratio >= 1": bool(summary["torch_ratio"] >= TARGET_TORCH),
        "ivf speedup >= 10 at recall >= 0.95": bool(best is not None and best["speedup_vs_exact"] >= TARGET_SPEEDUP)}
    summary["rows"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    return summary


def _plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"tensor.sum": "tab:gray", "torch.mv": "tab:blue", "float32 scan threshold": "tab:orange",
               "exact threshold": "tab:green", f"exact top-{TOP_K}": "tab:green",
               **{f"path {p}": "tab:olive" for p in SINGLE_PATHS}}
    scans = [r for r in rows if r["method"] in colours]
    # items per second, as GB/s of float32 rows: the speed of a scan that reads every float32 row
    left.barh([r["method"] for r in scans], [r["items_per_s"] * summary["stored_dim"] * 4 / 1e9
                                             if r["items_per_s"] else r["gb_per_s"] for r in scans],
              color=[colours[r["method"]] for r in scans])
    left.axvline(summary["bandwidth_gb_per_s"], color="black", ls="--", lw=0.8)
    left.set_xlabel("float32 rows searched per second, in GB/s (dashed: the tensor.sum bandwidth;\n"
                    "the float16 screen reads half the bytes, then scores candidates in float32)", fontsize=8)
    left.set_title(f"Exact search, {summary['items']:,} × {summary['stored_dim']} float32, "
                   f"{summary['threads']} threads\n{summary['cpu']}; auto chose: {summary['chosen_path']}",
                   fontsize=9)
    ivf = sorted((r for r in rows if r["method"] == "ivf, one by one"), key=lambda r: r["nprobe"])
    if ivf:
        right.plot([r["speedup_vs_exact"] for r in ivf], [r["recall_threshold"] for r in ivf], "o-",
                   label="threshold query")
        right.plot([r["speedup_vs_exact"] for r in ivf], [r["recall_top_k"] for r in ivf], "s--",
                   label=f"top-{TOP_K}", alpha=0.7)
        for r in ivf:
            right.annotate(f"nprobe {r['nprobe']}", (r["speedup_vs_exact"], r["recall_threshold"]), fontsize=7,
                           textcoords="offset points", xytext=(4, -10))
        right.axhline(TARGET_RECALL, color="black", ls="--", lw=0.8)
        right.axvline(TARGET_SPEEDUP, color="black", ls=":", lw=0.8)
        right.set_xscale("log")
        right.legend(fontsize=8)
    approx = summary.get("approximate") or {}
    right.set_xlabel("speed-up over the exact scan (one query per call)")
    right.set_ylabel("recall against the exact search")
    right.set_title(f"FAISS IVF, nlist {approx.get('nlist')}, {summary['classes']} classes", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=1_000_000, help="stored items N")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension d (stored: d + 1)")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the synthetic collection")
    parser.add_argument("--queries", type=int, default=16, help="classes searched (one query each)")
    parser.add_argument("--noise", type=float, default=0.7,
                        help="norm of the within-class noise; class means have norm 1, so are ≈ 1.41 apart")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default √N)")
    parser.add_argument("--nprobes", default="1,2,4,8,16,32,64", help="comma-separated IVF nprobe values")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (median)")
    parser.add_argument("--tmp-dir", default=None, help="where the temporary index is written (default: $TMPDIR)")
    parser.add_argument("--out", default="results/bench", help="folder for search.{csv,json,png}")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench search``."""
    try:
        nprobes = [int(p) for p in args.nprobes.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--nprobes must be comma-separated integers, got {args.nprobes!r}") from None
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    result = run(items=args.items, dim=args.dim, classes=args.classes, queries=args.queries, noise=args.noise,
                 nlist=args.nlist, nprobes=nprobes, repeats=args.repeats, out=f"{args.out}/search-{cpu_slug()}",
                 tmp_dir=args.tmp_dir, log=log)
    if args.json:
        keys = ["cpu", "chosen_path", "chosen_batch_path", "paths", "items_per_s", "gb_per_s", "bandwidth_gb_per_s",
                "torch_ratio", "bandwidth_ratio", "screened",
                "float32_scan_torch_ratio", "float32_scan_bandwidth_ratio", "float32_equivalent_bandwidth_ratio",
                "exact_ms_per_query", "exact_batched_ms_per_query", "approximate", "targets"]
        print(json.dumps({k: result[k] for k in keys}, indent=2, default=json_default))
        return 0
    print(text_table([[r["method"], r["nprobe"] if r["nprobe"] is not None else "",
                       f"{r['ms_per_query']:.3f}", "" if r["gb_per_s"] is None else f"{r['gb_per_s']:.1f}",
                       "" if r["recall_threshold"] is None else f"{r['recall_threshold']:.4f}",
                       "" if r["speedup_vs_exact"] is None else f"x{r['speedup_vs_exact']:.1f}"]
                      for r in result["rows"]],
                     ["method", "nprobe", "ms/query", "GB/s", "recall", "speed-up"]))
    print(f"{result['cpu']}: exact search ({result['chosen_path']}, chosen by measurement): {result['gb_per_s']:.1f} "
          f"GB/s read = {result['bandwidth_ratio']:.0%} of the measured {result['bandwidth_gb_per_s']:.1f} GB/s; "
          f"x{result['torch_ratio']:.2f} the speed of torch.mv")
    print("wrote " + ", ".join(result.get("files", [])))
    return 0
