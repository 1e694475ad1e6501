"""Multiclass max-margin (``max_margin``) of Crammer & Singer (2001); paper Eq. 2, Section III-B."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_logits, check_positive, check_reduction, check_target, reduce
from .registry import register


def true_and_largest_false(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of validated inputs: the true logit ``z_y`` and the largest false logit ``max_{j≠y} z_j``."""
    true_logit = z.gather(1, y[:, None]).squeeze(1)
    # The two largest logits of the row: the largest false one is the first unless the first is the true one.
    # (topk's backward is a scatter of two values per row, far cheaper than amax's tie-splitting mask.)
    top_values, top_indices = torch.topk(z, 2, dim=1)
    false_max = torch.where(top_indices[:, 0] == y, top_values[:, 1], top_values[:, 0])
    return true_logit, false_max


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


@register("max_margin", pols_aligned=False)
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
