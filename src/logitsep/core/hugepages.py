"""Large CPU tensors in 2 MiB transparent huge pages: random rows of a big head without a page walk each.

A sampled training step reads and writes about a thousand random rows of the head and of its momentum buffer. In
4 KiB pages each such row is a TLB miss and a page walk (a 10⁶ × 256 float32 head spans 250,000 pages; a core's TLB
holds about 2,000); in 2 MiB pages the whole head is 500 pages. Linux backs memory marked ``MADV_HUGEPAGE`` with huge
pages when ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (common, and this project's VMs) or
``always``; the mark must come before the pages are first touched, so a tensor is placed in a fresh private anonymous
mapping (:func:`empty`), not marked where torch already wrote it (Linux's ``MADV_COLLAPSE`` does that: 6 s for a
GB in an ad-hoc timing on this project's VM, too slow to do at start).

Only tensors of at least :data:`THRESHOLD` bytes on the CPU are placed (a smaller one is within the TLB's reach
anyway); elsewhere, and where huge pages are unavailable or ``LOGITSEP_HUGE_PAGES=0``, the functions return ordinary
tensors. The effect is measured by ``logitsep bench classes --pages both`` (``huge_vs_ordinary``).
Used by :func:`place` (training's and the benchmark's sampled heads) and by :class:`logitsep.optim.RowSparseSGD`
for its momentum buffers. A placed tensor is an ordinary CPU tensor to torch (views, ``torch.save``, safetensors);
its memory is unmapped when the last tensor using it is freed.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys

import torch
from torch import Tensor, nn

__all__ = ["THRESHOLD", "available", "empty", "moved", "place", "zeros_like"]

THRESHOLD = 64 << 20  # bytes
_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
    """Whether tensors can be placed in huge pages here: Linux with transparent huge pages ``always`` or
    ``madvise``, and ``LOGITSEP_HUGE_PAGES`` not set to ``0``."""
    return os.environ.get("LOGITSEP_HUGE_PAGES", "1") != "0" and _kernel_allows()


@functools.lru_cache(maxsize=1)
def _kernel_allows() -> bool:
    return _mode() in ("always", "madvise")


def _mode() -> str:
    """The kernel's policy for 2 MiB (PMD-size) anonymous pages: ``always``, ``madvise`` or ``never``. Kernels with
    per-size control (6.8+) set it in ``hugepages-<size>kB/enabled``, where ``inherit`` defers to the top-level
    file; a 2 MiB setting of ``always`` under a top-level ``madvise`` is possible, and the other way round."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "never"
    try:
        mode = _selected(_SYSFS)
    except OSError:
        return "never"
    folder = os.path.dirname(_SYSFS)
    try:
        with open(os.path.join(folder, "hpage_pmd_size"), encoding="ascii") as f:
            size_kb = int(f.read()) // 1024
        per_size = _selected(os.path.join(folder, f"hugepages-{size_kb}kB", "enabled"))
    except (OSError, ValueError):
        per_size = "inherit"  # an older kernel: the top-level setting is the only one
    return mode if per_size == "inherit" else per_size


def _selected(path: str) -> str:
    """The bracketed choice of a sysfs setting such as ``always [madvise] never``."""
    with open(path, encoding="ascii") as f:
        text = f.read()
    start = text.find("[")
    return text[start + 1:text.index("]", start)] if start >= 0 else "never"


def _wanted(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> bool:
    large = torch.Size(shape).numel() * dtype.itemsize >= THRESHOLD
    return large and torch.device(device or "cpu").type == "cpu" and available()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
          device: torch.device | str | None = None) -> Tensor:
    """An uninitialised contiguous tensor, in huge pages where :func:`_wanted` (module docstring), else
    ``torch.empty``."""
    shape = tuple(shape)
    if not _wanted(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, torch.Size(shape).numel() * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: they fault in as 2 MiB pages
    return torch.frombuffer(region, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def zeros_like(t: Tensor) -> Tensor:
    """``torch.zeros_like(t)`` (contiguous), in huge pages where :func:`_wanted`."""
    return empty(t.shape, t.dtype, t.device).zero_()


def moved(t: Tensor) -> Tensor:
    """A copy of ``t`` in huge pages where :func:`_wanted`; else ``t`` itself."""
    if not _wanted(tuple(t.shape), t.dtype, t.device):
        return t
    return empty(t.shape, t.dtype, t.device).copy_(t)


@torch.no_grad()
def place(module: nn.Module) -> list[str]:
    """Move ``module``'s large CPU parameters into huge pages, in place (the same ``Parameter`` objects, new
    storage: call it before building the optimizer and before taking views of them). Returns the names moved."""
    names = []
    for name, param in module.named_parameters():
        data = param.data  # (a new tensor object at each access)
        new = moved(data)
        if new is not data:
            param.data = new
            names.append(name)
    return names
