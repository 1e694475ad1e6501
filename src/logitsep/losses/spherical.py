"""The Z-loss (``z_loss``) of de Brébisson & Vincent (2016), a member of the spherical family.

Not to be confused with the ``(log Z)²`` regulariser called "z-loss" in PaLM / ST-MoE / Megatron: that one
is the second term of ``self_norm`` here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_logits, check_positive, check_reduction, check_target
from .common import reduce
from .registry import register


def _check_b(b: object) -> float:
    if isinstance(b, bool) or not isinstance(b, (int, float)):
        raise TypeError(f"z_loss: b must be a real number, got {type(b).__name__}")
    if not math.isfinite(float(b)):
        raise ValueError(f"z_loss: b must be finite, got {b}")
    return float(b)


def z_score(logits: Tensor, target: Tensor) -> Tensor:
    """``ẑ_i = (z_{i,y_i} − μ_i)/σ_i`` with ``μ_i``, ``σ_i`` the mean and population std (÷k) of row i.

    Rows whose logits are all equal (``σ_i = 0``) get ``ẑ_i = 0`` and a zero gradient: the z-score is
    undefined there (it has no limit as σ → 0), and 0, "the target is at the mean", is the neutral value.
    ``|ẑ_i| ≤ √(k−1)`` always, so the value is bounded even for tiny σ.
    """
    mean = logits.mean(dim=1)
    var = (logits - mean[:, None]).square().mean(dim=1)
    # Decided on the logits themselves, not on ``var``: the float mean of k equal numbers can differ from them
    # by a rounding error, leaving a tiny non-zero variance that would turn the undefined ẑ into ±1.
    constant_row = (logits.amax(dim=1) == logits.amin(dim=1)) | (var <= 0)
    std = torch.sqrt(torch.where(constant_row, torch.ones_like(var), var))
    true_logit = logits.gather(1, target[:, None]).squeeze(1)
    return torch.where(constant_row, torch.zeros_like(var), (true_logit - mean) / std)


def z_loss(logits: Tensor, target: Tensor, a: float = 1.0, b: float = 2.0, reduction: str = "mean") -> Tensor:
    """Z-loss (de Brébisson & Vincent 2016): ``ℓ(z, y) = (1/a)·softplus(a·(b − ẑ_y))``, ``ẑ`` = :func:`z_score`.

    Shift- and scale-invariant in ``z``; a spherical loss (depends on Σz, Σz² and z_y only), so it can be
    trained in O(d²) per example independently of k. ``a > 0`` sets the sharpness (``a → ∞``: the hinge
    ``max(0, b − ẑ)``; small ``a``: close to linear in ``ẑ``); ``b`` is the z-score that counts as "enough".

    Defaults ``a = 1``, ``b = 2``: the largest z-score a single logit can reach among k is ``√(k−1)``
    (3 for 10 classes), so ``b`` must stay below it for the hinge ever to switch off; 2 keeps room on
    10-class problems while still asking the true logit to stand two deviations above the row mean.
    Raise ``b`` for many classes. PoLS alignment is not established (``pols_aligned = None``): the
    z-score is invariant to shifts of a row, which is exactly what the PoLS does not allow, so the
    project measures it instead.
    """
    a = check_positive(a, "a", "z_loss")
    b = _check_b(b)
    check_reduction(reduction, "z_loss")
    z = check_logits(logits, "z_loss")
    y = check_target(target, z, "z_loss")
    return reduce(F.softplus(a * (b - z_score(z, y))) / a, reduction)


@register("z_loss", pols_aligned=None, functional=z_loss)
class ZLoss(nn.Module):
    """Module form of :func:`z_loss`."""

    def __init__(self, a: float = 1.0, b: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        self.a = check_positive(a, "a", "z_loss")
        self.b = _check_b(b)
        self.reduction = check_reduction(reduction, "z_loss")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return z_loss(logits, target, a=self.a, b=self.b, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}"


__all__ = ["ZLoss", "z_loss", "z_score"]
