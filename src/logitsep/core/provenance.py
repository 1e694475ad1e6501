"""Where a figure came from: the machine and library versions, and the command as the user typed it. Recorded
beside every result and benchmark figure."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Set by ``bench._common.steady_allocator`` when it applied: recorded with the environment.
STEADY_ALLOCATOR = [False]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded next to every benchmark figure and result table."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "steady_allocator": STEADY_ALLOCATOR[0],
    }


def command_line() -> str:
    """The command as the user typed it: ``logitsep ...`` for the console script, ``python -m module ...``."""
    argv = list(sys.argv)
    original = list(getattr(sys, "orig_argv", []))
    if "-m" in original:
        argv = ["python", *original[original.index("-m"):]]
    elif argv and Path(argv[0]).name == "logitsep":
        argv[0] = "logitsep"
    return " ".join(shlex.quote(a) for a in argv)
