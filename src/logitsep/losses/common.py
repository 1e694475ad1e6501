"""Small pieces the loss families share: torch's reduction convention and sums over the positive classes."""

from __future__ import annotations

from torch import Tensor


def reduce(per_example: Tensor, reduction: str) -> Tensor:
    """torch's reduction convention over a per-example vector (``reduction`` already checked)."""
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def sum_at_positives(values: Tensor, target: Tensor) -> Tensor:
    """Per row, the sum of ``values`` over the positive classes (class indices ``[m]`` or a boolean ``[m, k]``)."""
    if target.dim() == 1:
        return values.gather(1, target[:, None]).squeeze(1)
    return (values * target).sum(dim=1)
