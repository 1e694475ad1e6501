"""Speed of :func:`logitsep.metrics.slc_metrics` against its lower bound, one ``np.sort`` of the same numbers.

Every SLC metric needs each class column ranked, and the pooled metrics one ranking of all n*k scores, so
no exact implementation can be much cheaper than sorting the n*k scores once. The benchmark draws random
scores [n, k] and random labels, times ``slc_metrics`` and ``np.sort(scores, axis=None)`` in alternating
rounds of the same run (shared machines drift: a ratio of interleaved medians is stable where absolute times
are not) and reports the ratio; the target is at most 3. It also times the large steps inside
``slc_metrics`` (transpose, column sort, pooled sort) so that the rest is visible.

    python -m logitsep.bench.metrics [--n 10000] [--k 1000] [--repeat 9] [--out results/bench/metrics_speed]

writes ``OUT.csv``, ``OUT.json`` (rows + environment + command) and ``OUT.png`` (a bar plot).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import json_default
from ..core.plots import pyplot, save_figure
from ..core.tables import text_table
from ..metrics import contiguous_transpose, slc_metrics
from ._common import interleaved, write_results

TARGET_RATIO = 3.0


def _bench_dtype(n: int, k: int, dtype: str, repeat: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    scores = rng.standard_normal((n, k), dtype=np.float64).astype(dtype)
    target = rng.integers(0, k, size=n)
    columns = contiguous_transpose(scores)
    fns: dict[str, Callable[[], object]] = {
        "np.sort (lower bound)": lambda: np.sort(scores, axis=None),
        "slc_metrics": lambda: slc_metrics(scores, target),
        "  transpose to [k, n]": lambda: contiguous_transpose(scores),
        "  sort each class column": lambda: np.sort(columns, axis=1),
    }
    times = interleaved(fns, repeat)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["np.sort (lower bound)"]
    round_ratios = [m / s for m, s in zip(times["slc_metrics"], times["np.sort (lower bound)"], strict=True)]
    rows = []
    for name, seconds in medians.items():
        rows.append({"dtype": dtype, "n": n, "k": k, "what": name, "median_s": seconds, "min_s": min(times[name]),
                     "ratio_to_sort": seconds / base, "repeat": repeat})
    rows[1]["median_round_ratio"] = statistics.median(round_ratios)
    return rows


def _plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    plt = pyplot()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    names = list(dict.fromkeys(r["what"] for r in rows))
    fig = plt.figure(figsize=(7.5, 1.0 + 0.55 * len(names) * len(dtypes)))
    ax = fig.add_subplot()
    height = 0.8 / len(dtypes)
    for j, dtype in enumerate(dtypes):
        ms = [next(r["median_s"] for r in rows if r["dtype"] == dtype and r["what"] == name) * 1e3 for name in names]
        ys = [i + j * height for i in range(len(names))]
        bars = ax.barh(ys, ms, height=height, label=dtype)
        ax.bar_label(bars, labels=[f"{m:.0f} ms ({m / ms[0]:.2f}x)" for m in ms], padding=3, fontsize=8)
    ax.set_yticks([i + height * (len(dtypes) - 1) / 2 for i in range(len(names))], [s.strip() for s in names])
    ax.invert_yaxis()
    ax.set_xlabel("median time per call (ms)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def run(n: int = 10_000, k: int = 1_000, repeat: int = 9, out: str = "results/bench/metrics_speed", seed: int = 0,
        dtypes: Sequence[str] = ("float32", "float64")) -> dict[str, Any]:
    """Time ``slc_metrics`` on random scores [n, k] against ``np.sort`` of the same n*k numbers.

    Returns ``{"ratio": {dtype: median slc_metrics time / median np.sort time}, "target_ratio": 3.0,
    "rows": [...], "files": [csv, json, png]}``.
    """
    if n < 1 or k < 1 or repeat < 1:
        raise ValueError(f"n, k and repeat must be >= 1, got n={n}, k={k}, repeat={repeat}")
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        rows.extend(_bench_dtype(n, k, dtype, repeat, rng))
    ratio = {r["dtype"]: r["ratio_to_sort"] for r in rows if r["what"] == "slc_metrics"}
    stem = Path(out)
    reproduce = (f"python -m logitsep.bench.metrics --n {n} --k {k} --repeat {repeat} --seed {seed} "
                 f"--dtypes {','.join(dtypes)} --out {out}")
    csv_path, json_path = write_results(stem, rows, benchmark="slc_metrics vs np.sort", reproduce=reproduce,
                                        n=n, k=k, seed=seed, ratio=ratio, target_ratio=TARGET_RATIO,
                                        note="single-threaded numpy on both sides; labels: one random class per "
                                             "example; ratio = median slc_metrics time / median np.sort time "
                                             "over interleaved rounds")
    png_path = _plot(rows, stem.with_suffix(".png"),
                     f"slc_metrics vs one np.sort of the same {n}x{k} scores (lower bound)")
    return {"ratio": ratio, "target_ratio": TARGET_RATIO, "reproduce": reproduce, "rows": rows,
            "files": [str(csv_path), str(json_path), str(png_path)]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logitsep.bench.metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="examples (default 10000)")
    parser.add_argument("--k", type=int, default=1_000, help="classes (default 1000)")
    parser.add_argument("--repeat", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", default="float32,float64", help="comma-separated score dtypes")
    parser.add_argument("--out", default="results/bench/metrics_speed", help="output stem (.csv/.json/.png)")
    args = parser.parse_args(argv)
    result = run(n=args.n, k=args.k, repeat=args.repeat, out=args.out, seed=args.seed,
                 dtypes=[d.strip() for d in args.dtypes.split(",") if d.strip()])
    for row in result["rows"]:
        print(f"{row['dtype']:>8}  {row['what']:<26} {1e3 * row['median_s']:9.1f} ms  {row['ratio_to_sort']:5.2f}x")
    for dtype, value in result["ratio"].items():
        verdict = "within" if value <= TARGET_RATIO else "ABOVE"
        print(f"{dtype}: slc_metrics / np.sort = {value:.2f}x ({verdict} the {TARGET_RATIO:g}x target)")
    print("wrote " + ", ".join(result["files"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=10_000, help="examples")
    parser.add_argument("--k", type=int, default=1000, help="classes")
    parser.add_argument("--out", default="results/bench", help="folder for metrics_speed.{csv,json,png}")


def cli(args: argparse.Namespace) -> int:
    """``logitsep bench metrics``."""
    result = run(n=args.n, k=args.k, out=f"{args.out}/metrics_speed")
    if args.json:
        print(json.dumps(result, indent=2, default=json_default))
        return 0
    print(text_table([[r["dtype"], r["what"], f"{r['median_s']:.4f}", f"{r['ratio_to_sort']:.2f}"]
                      for r in result["rows"]], ["dtype", "what", "median seconds", "× np.sort"]))
    print(f"wrote {args.out}/metrics_speed.*")
    return 0
