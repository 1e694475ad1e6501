"""Row gathers whose gradient is sparse: the one piece that lets a step touch only the head rows it used.

``gather_rows(param, rows)`` is ``param.index_select(0, rows)`` whose backward gives ``param`` a sparse COO
gradient holding only those rows (``nn.Embedding(sparse=True)`` does the same for a 2-D table; this also takes the
1-D bias). A dense gradient of a ``[k, d]`` head is ``k·d`` numbers written every step however few rows were used;
the sparse one is ``len(rows)·d``, whatever ``k`` is. :class:`logitsep.optim.RowSparseSGD` applies it row by row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import value_checks_enabled


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param: Tensor, rows: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows)
        ctx.shape = param.shape
        return param.index_select(0, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (rows,) = ctx.saved_tensors
        # rows are sorted and distinct (checked by gather_rows), so the COO tensor is coalesced as built
        g = torch.sparse_coo_tensor(rows[None], grad.contiguous(), ctx.shape, is_coalesced=True, check_invariants=False)
        return g, None


def gather_rows(param: Tensor, rows: Tensor) -> Tensor:
    """``param[rows]`` (``rows``: sorted, distinct int64 indices, e.g. from ``torch.unique``), with a sparse
    gradient for ``param`` (see the module docstring)."""
    if rows.dtype != torch.long or rows.dim() != 1:
        raise TypeError(f"gather_rows: rows must be a 1-D int64 tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if value_checks_enabled() and rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("gather_rows: rows must be sorted and distinct (use torch.unique)")
    return _GatherRows.apply(param, rows)
