"""Multiclass max-margin (``max_margin``) of Crammer & Singer (2001); paper Eq. 2, Section III-B."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_logits, check_positive, check_reduction, check_target, reduce
from .registry import register


def _hinge_per_example(z: Tensor, y: Tensor, margin: float) -> Tensor:
    """``max(0, γ − z_y + max_{j≠y} z_j)`` per row, for validated inputs."""
    true_logit = z.gather(1, y[:, None]).squeeze(1)
    false_max = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return torch.clamp_min(margin - true_logit + false_max, 0.0)


def max_margin(logits: Tensor, target: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Multiclass max-margin ``ℓ(z, y) = max(0, γ − z_y + max_{j≠y} z_j)``, ``γ = margin > 0``.

    Not aligned with the PoLS: it orders logits only within one example (paper Section III-B).
    """
    margin = check_positive(margin, "margin", "max_margin")
    check_reduction(reduction, "max_margin")
    z = check_logits(logits, "max_margin")
    y = check_target(target, z, "max_margin")
    return reduce(_hinge_per_example(z, y, margin), reduction)


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
