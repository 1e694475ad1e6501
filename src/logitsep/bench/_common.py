"""What every benchmark shares: robust timers, paired ratios and the result writer (with the environment
record of :mod:`logitsep.core.provenance`)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.files import write_csv, write_json
from ..core.provenance import STEADY_ALLOCATOR, command_line, environment


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc ``mallopt``: no mmap/trim for blocks under 1 GiB).

    Every [256, 1000] float32 temporary is 1 MiB; by default glibc maps such blocks fresh and unmaps them on free,
    so each call of a loss pays ~256 page faults per temporary (about 2 µs each on these VMs): timings then
    measure the kernel's page-fault path more than the arithmetic, and vary with glibc's adaptive threshold.
    Benchmarks call this first so that both sides of a ratio are measured the same, steady way.
    Returns whether it applied (False off glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    STEADY_ALLOCATOR[0] = (bool(libc.mallopt(m_mmap_threshold, 1 << 30))
                           and bool(libc.mallopt(m_trim_threshold, 1 << 30)))
    return STEADY_ALLOCATOR[0]


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], *, repeat: int = 7, number: int | None = None, warmup: int = 2,
              device: torch.device | str | None = None, min_time: float = 0.05) -> float:
    """Median over ``repeat`` rounds of the seconds per call of ``fn``.

    ``number`` calls make a round; when None it is chosen so that a round lasts at least ``min_time``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if number is None:
        number = 1
        while True:
            start = time.perf_counter()
            for _ in range(number):
                fn()
            sync(device)
            if time.perf_counter() - start >= min_time or number >= 1 << 20:
                break
            number *= 2
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - start) / number)
    return statistics.median(rounds)


def write_results(stem: str | os.PathLike, rows: Sequence[Mapping[str, Any]], **meta: Any) -> tuple[Path, Path]:
    """Write ``stem.csv`` (the rows, with the environment repeated as columns so one file is self-contained)
    and ``stem.json`` (rows + environment + command + ``meta``)."""
    stem = Path(stem)
    env = environment()
    command = command_line()
    csv_rows = [{**row, **{f"env_{k}": v for k, v in env.items()}, "command": command} for row in rows]
    csv_path = write_csv(stem.with_suffix(".csv"), csv_rows)
    json_path = write_json(stem.with_suffix(".json"), {"command": command, "environment": env, **meta,
                                                         "rows": list(rows)})
    return csv_path, json_path


def add_threads_argument(parser: argparse.ArgumentParser, default: int = 1) -> None:
    """``--threads``: torch CPU threads for a benchmark (0: torch's default). One by default: on this project's
    2-vCPU machine a second OpenMP thread made small kernels stall for milliseconds (an MLP forward on 32
    examples, an ad-hoc timing: 0.66 ms median with one thread, 9 ms with two), which times the scheduler."""
    parser.add_argument("--threads", type=int, default=default,
                        help=f"torch CPU threads (default {default}; 0: torch's default)")


def apply_threads(threads: int | None) -> int:
    """Set torch's CPU threads from ``--threads`` (None or 0 keeps torch's default); return the count in use."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"--threads must be a non-negative integer, got {threads!r}")
        if threads > 0:
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of one call of each function, the functions taking turns round after round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of the ratio of two timings taken in the same round: drift in the machine's speed
    between rounds (other jobs, frequency changes) cancels in each ratio, where a ratio of medians keeps it."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def ratio_quartiles(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles of the within-round ratios: how much the rounds disagree."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    return ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]


def alternating_rounds(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device | str | None = None,
                       warmup: int = 1, min_time: float = 0.01) -> dict[str, list[float]]:
    """Seconds per call of each function, one timing (at least ``min_time`` of back-to-back calls) of every
    function per round, ``rounds`` rounds, after ``warmup`` calls each; the order is reversed every other round
    so that no function always runs right after the same one."""
    for fn in fns.values():  # warm-up: allocator, kernels, caches
        time_call(fn, repeat=1, warmup=warmup, device=device, min_time=0.0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(time_call(fns[name], repeat=1, warmup=0, device=device, min_time=min_time))
    return times


def int_list(text: str) -> list[int]:
    """``"1024,16384"`` or powers of two as ``"2^10,2^18.5"`` (rounded to the nearest integer)."""
    values = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        try:
            values.append(round(2 ** float(item[2:])) if item.startswith("2^") else int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers or 2^x, got {item!r}") from None
        if values[-1] < 1:
            raise argparse.ArgumentTypeError(f"class counts must be positive, got {item!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one class count")
    return values
