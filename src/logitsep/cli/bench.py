"""``logitsep bench NAME``: speed benchmarks, each a module of :mod:`logitsep.bench` with ``add_arguments`` and
``cli``; every figure a ratio to a baseline timed in the same run, CSV/JSON (and a plot) in results/."""

from __future__ import annotations

import argparse
import importlib

HELP = "speed benchmarks; CSV/JSON and a plot in results/bench"

BENCHMARKS = {
    "metrics": "slc_metrics against np.sort of the same scores",
    "losses": "forward+backward of every loss against cross-entropy",
    "train": "steps/s of the trainer (logitsep.train.train) against a bare PyTorch loop, same model/loss/data",
    "speed": "paper Table III / Figure 1: forward time with 1 output unit (SLC) vs k units, per backbone",
    "classes": "one training step against k: exact losses vs their sampled forms (ms/step, peak memory)",
    "head": "the head alone: all k logits against one class's logit (all_ms, slc_ms, speedup)",
    "search": "exact class search scan rate vs memory bandwidth and torch.mv; FAISS IVF recall and speed-up",
    "ivf": "FAISS IVF recall and speed-up against the exact search on a trained run's embeddings of its dataset",
    "zscore": "z-score of one class from cached O(d^2) statistics against the z-score of all k logits",
    "load": "the web service under concurrent ingest/search/query clients on loopback (p50/p99 latency)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    for name, text in BENCHMARKS.items():
        q = sub.add_parser(name, help=text, description=text)
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        q.set_defaults(parser=q, what=name)
        importlib.import_module(f"logitsep.bench.{name}").add_arguments(q)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(f"logitsep.bench.{args.what}").cli(args)
