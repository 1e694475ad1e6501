"""Score matrices too large to hold, read a block of classes at a time.

At ``n = 10^4`` examples and ``k = 10^5`` classes the ``[n, k]`` float32 scores take 4 GB. The block forms of the
metrics (``logitsep.metrics.slc_metrics_blocked``) and of calibration (``logitsep.thresholds.calibrate_blocked``)
take instead a function ``score_block(start, stop)`` returning the scores ``[n, stop - start]`` of the classes
``start .. stop - 1`` (a numpy array or a torch tensor, e.g. ``head.logits(h, range(start, stop))`` or
``h @ W[start:stop].T + b[start:stop]``), call it for every block in a few passes and keep ``O(n·block_size)``
scores at a time. :class:`ScoreBlocks` runs the passes: the block ranges, the checks of every block, a progress
bar.

``score_block`` is called once per block per pass (two or three passes) and must return the same values every
time: the functions check that the positives' scores come back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from .checks import check_positive_int, check_scores

#: Above this many scores (``n·k``; 256 MiB of float32) the commands compute metrics and thresholds in blocks.
BLOCKS_ABOVE = 2**26
#: The scores of one block by default (``block_size = max(1, BLOCK_SCORES // n)``; 16 MiB of float32).
BLOCK_SCORES = 2**22

ScoreBlock = Callable[[int, int], object]


def use_blocks(n: int, k: int, block_size: int | None = None) -> bool:
    """The one rule for when scores are read a block of classes at a time: a ``block_size`` is given, or the ``n·k``
    scores are more than :data:`BLOCKS_ABOVE`."""
    return block_size is not None or n * k > BLOCKS_ABOVE


def default_block_size(n: int) -> int:
    """Classes per block for ``n`` examples: ``max(1, BLOCK_SCORES // n)``."""
    return max(1, BLOCK_SCORES // max(1, n))


class ScoreBlocks:
    """The blocks of classes ``[start, stop)`` of ``num_classes`` classes, ``block_size`` at a time (default:
    :func:`default_block_size`), each read with ``score_block(start, stop)`` and checked: a floating ``[n,
    stop - start]`` matrix without NaN (``logitsep.core.checks.check_scores``: float16 upcast to float32, a
    tensor moved to the CPU). ``progress``: a tqdm bar over the blocks of each pass (None: only on a terminal).
    ``dtype``: the common dtype of the blocks read so far (what ``np.concatenate`` of them would have)."""

    def __init__(self, score_block: ScoreBlock, num_classes: int, n: int, *, block_size: int | None = None,
                 progress: bool | None = None, where: str = "score blocks") -> None:
        if not callable(score_block):
            raise TypeError(f"{where}: score_block must be a function (start, stop) -> scores [n, stop - start], "
                            f"got {type(score_block).__name__}")
        self.score_block, self.where = score_block, where
        self.k = check_positive_int(num_classes, "num_classes", where)
        self.n = check_positive_int(n, "the number of examples", where)
        self.block_size = (default_block_size(self.n) if block_size is None
                           else check_positive_int(block_size, "block_size", where))
        self.ranges = [(a, min(a + self.block_size, self.k)) for a in range(0, self.k, self.block_size)]
        self.progress = progress
        self.dtype: np.dtype | None = None

    def read(self, start: int, stop: int) -> np.ndarray:
        """The checked scores ``[n, stop - start]`` of the classes ``start .. stop - 1``."""
        x = check_scores(self.score_block(start, stop), f"score_block({start}, {stop})")
        if x.shape != (self.n, stop - start):
            raise ValueError(f"{self.where}: score_block({start}, {stop}) must return [{self.n}, {stop - start}] "
                             f"scores (n examples, one column per class of the block), got {tuple(x.shape)}")
        self.dtype = x.dtype if self.dtype is None else np.result_type(self.dtype, x.dtype)
        return x

    def scan(self, desc: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """One pass: ``(start, stop, scores)`` of every block, in class order."""
        disable = None if self.progress is None else not self.progress  # tqdm: None = only on a terminal
        with tqdm(total=len(self.ranges), desc=desc, unit="block", leave=False, dynamic_ncols=True,
                  disable=disable) as bar:
            for start, stop in self.ranges:
                yield start, stop, self.read(start, stop)
                bar.update(1)

    def same_again(self, start: int, stop: int, before: np.ndarray, now: np.ndarray) -> None:
        """Refuse a ``score_block`` that returned other values for the same block in an earlier pass."""
        if not np.array_equal(before, now):
            raise ValueError(f"{self.where}: score_block({start}, {stop}) returned other scores than in the "
                             "previous pass; it must return the same values every time it is called")
