"""Multiclass max-margin (``max_margin``) of Crammer & Singer (2001); paper Eq. 2, Section III-B."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.checks import check_logits, check_positive, check_reduction, check_target
from .common import reduce
from .registry import register


def true_and_largest_false(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of validated inputs: the true logit ``z_y`` and the largest false logit ``max_{j≠y} z_j``."""
    # The index of the largest false logit is found without gradient (a masked max: ~10% cheaper than topk(2) on
    # CPU); one gather of the [true, false] columns then carries the gradient, a two-value scatter per row, far
    # cheaper than the tie-splitting mask behind amax's backward.
    with torch.no_grad():
        false_index = z.scatter(1, y[:, None], float("-inf")).max(dim=1).indices
    pair = z.gather(1, torch.stack([y, false_index], dim=1))
    return pair[:, 0], pair[:, 1]


def max_margin(logits: Tensor, target: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Multiclass max-margin ``ℓ(z, y) = max(0, γ − z_y + max_{j≠y} z_j)``, ``γ = margin > 0``.

    Not aligned with the PoLS: it orders logits only within one example (paper Section III-B).
    """
    margin = check_positive(margin, "margin", "max_margin")
    check_reduction(reduction, "max_margin")
    z = check_logits(logits, "max_margin")
    y = check_target(target, z, "max_margin")
    true_logit, false_max = true_and_largest_false(z, y)
    return reduce(torch.clamp_min(margin - true_logit + false_max, 0.0), reduction)


@register("max_margin", pols_aligned=False, functional=max_margin)
class MaxMarginLoss(nn.Module):
    """Module form of :func:`max_margin`."""

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = check_positive(margin, "margin", "max_margin")
        self.reduction = check_reduction(reduction, "max_margin")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return max_margin(logits, target, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
