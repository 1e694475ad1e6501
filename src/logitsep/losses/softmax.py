"""Softmax losses: cross-entropy (``ce``), self-normalization (``self_norm``), decoupled softmax
(``decoupled_softmax``).

Keren, Sabato & Schuller (ICDM 2018), Sections III-A and IV-A; Devlin et al. (ACL 2014) for
self-normalization; Gupta et al. (2023, DEXML) for the decoupled softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_logits, check_positive, check_reduction, check_target
from .common import reduce
from .registry import register


def cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy ``ℓ(z, y) = −log softmax(z)_y`` (paper Eq. 1). Not aligned with the PoLS."""
    check_reduction(reduction, "ce")
    z = check_logits(logits, "ce")
    y = check_target(target, z, "ce")
    return F.cross_entropy(z, y, reduction=reduction)


def self_normalization(logits: Tensor, target: Tensor, alpha: float = 0.1, reduction: str = "mean") -> Tensor:
    """Self-normalization ``ℓ(z, y) = −log softmax(z)_y + α·(lse_j z_j)²`` (Devlin et al. 2014; paper Sec. IV-A).

    The second term pushes the softmax normaliser to 1, so ``exp(z_j)`` alone is a probability: PoLS-aligned
    for any ``α > 0`` (paper, Appendix A). Devlin et al. used ``α = 0.1``, the default here.
    """
    alpha = check_positive(alpha, "alpha", "self_norm")
    check_reduction(reduction, "self_norm")
    z = check_logits(logits, "self_norm")
    y = check_target(target, z, "self_norm")
    # One log-softmax pass (torch's fused cross-entropy) gives both terms: lse(z) = −log softmax(z)_y + z_y.
    nll = F.cross_entropy(z, y, reduction="none")
    log_normaliser = nll + z.gather(1, y[:, None]).squeeze(1)
    return reduce(nll + alpha * log_normaliser.square(), reduction)


def decoupled_softmax(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Decoupled softmax (Gupta et al. 2023, DEXML) for multi-label targets.

    ``ℓ_i = −(1/n_i)·Σ_{l∈P_i} log[ e^{z_il} / (e^{z_il} + Σ_{j∉P_i} e^{z_ij}) ]`` with ``P_i`` the positives of
    row ``i`` and ``n_i = |P_i|``: each positive competes only with the negatives, never with the other
    positives. ``target`` is a ``[m, k]`` 0/1 matrix (every row needs a positive) or ``[m]`` class indices,
    where it equals ``ce``.
    """
    check_reduction(reduction, "decoupled_softmax")
    z = check_logits(logits, "decoupled_softmax")
    t = check_target(target, z, "decoupled_softmax", multilabel=True)
    if t.dim() == 1:
        return F.cross_entropy(z, t, reduction=reduction)
    n_pos = t.sum(dim=1)
    if bool((n_pos == 0).any()):
        rows = torch.nonzero(n_pos == 0).flatten()[:5].tolist()
        raise ValueError(f"decoupled_softmax: every row needs at least one positive; rows {rows} have none")
    neg_lse = torch.logsumexp(z.masked_fill(t, float("-inf")), dim=1, keepdim=True)  # -inf if no negatives
    # log[e^z / (e^z + N)] = z - logaddexp(z, log N), evaluated only at the positives.
    log_p = z - torch.logaddexp(z, neg_lse.expand_as(z))
    per_row = -(log_p * t).sum(dim=1) / n_pos
    return reduce(per_row, reduction)


@register("ce", pols_aligned=False, functional=cross_entropy)
class CrossEntropyLoss(nn.Module):
    """Module form of :func:`cross_entropy`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "ce")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(logits, target, reduction=self.reduction)


@register("self_norm", pols_aligned=True, functional=self_normalization)
class SelfNormalizationLoss(nn.Module):
    """Module form of :func:`self_normalization`."""

    def __init__(self, alpha: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha = check_positive(alpha, "alpha", "self_norm")
        self.reduction = check_reduction(reduction, "self_norm")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self_normalization(logits, target, alpha=self.alpha, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


@register("decoupled_softmax", pols_aligned=None, functional=decoupled_softmax, multilabel=True)
class DecoupledSoftmaxLoss(nn.Module):
    """Module form of :func:`decoupled_softmax`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "decoupled_softmax")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return decoupled_softmax(logits, target, reduction=self.reduction)
