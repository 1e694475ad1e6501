"""Figures: matplotlib without a screen (Agg), saved atomically. Needs the ``[plots]`` extra."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .extras import require
from .files import atomic_write


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (temporary file, rename) and close it."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)
    return path


def decade_below(values: Sequence[float]) -> float:
    """The power of ten strictly below the smallest value: where a log-axis bar chart should start, so that the
    shortest bar keeps a visible length (matplotlib's default margin would start the axis right at it)."""
    return float(10.0 ** math.floor(math.log10(min(values)) - 1e-9))
