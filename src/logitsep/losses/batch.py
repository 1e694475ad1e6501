"""Batch losses, the paper's new PoLS-aligned objectives (Keren, Sabato & Schuller, ICDM 2018, Section V):
batch cross-entropy (``batch_ce``, Definition 2) and batch max-margin (``batch_max_margin``, Definition 3).

Both compare logits *across* the examples of a batch, so they need at least two examples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.checks import check_batch_size, check_logits, check_positive, check_reduction, check_target
from .common import sum_at_positives
from .margin import true_and_largest_false
from .registry import register


def batch_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Batch cross-entropy ``KL(P_B ‖ Q_B)`` (paper Definition 2).

    ``Q_B`` is the softmax over **all m·k logits of the batch flattened together**; ``P_B`` puts ``1/N`` on
    each positive pair (``N = m`` for class indices, ``N`` = number of positives for a multi-label 0/1
    matrix). Exactly ``−log N − (1/N)·Σ_{(i,j)∈P} log_softmax(flatten(z))[i, j]``; no epsilon inside the log
    (the authors' TensorFlow code adds 1e-6 there, which shrinks the loss and its gradient).

    ``reduction``: ``"mean"`` is the KL itself; ``"sum"`` is ``N·KL``; ``"none"`` gives, for each row, the sum
    over its positives of ``−log N − log Q_B(i, j)`` (so that the mean over positives is the KL).
    """
    check_reduction(reduction, "batch_ce")
    z = check_logits(logits, "batch_ce")
    check_batch_size(z, "batch_ce")
    t = check_target(target, z, "batch_ce", multilabel=True)
    n_pos = int(t.sum()) if t.dim() == 2 else z.shape[0]
    if n_pos == 0:
        raise ValueError("batch_ce: the multi-label target has no positive pair in the batch")
    # log Q_B(i, j) = z_ij − log Z(B): one log-softmax over the flattened batch (torch's fused kernel, as in CE;
    # logsumexp and a separate gather cost twice as much here, forward and backward, for the same values)
    log_q = torch.log_softmax(z.reshape(1, -1), dim=1).view_as(z)
    positives_per_row = t.sum(dim=1).to(z.dtype) if t.dim() == 2 else 1  # class indices: one per row
    per_row = -sum_at_positives(log_q, t) - positives_per_row * math.log(n_pos)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / n_pos if reduction == "mean" else total


def batch_max_margin(logits: Tensor, target: Tensor, margin: float = 1.0, reduction: str = "mean") -> Tensor:
    """Batch max-margin (paper Definition 3).

    ``L = (1/m)·max(0, γ − z₊ + z₋) + (1/m)·Σ_i max(0, γ − z_{i,y_i} + max_{j≠y_i} z_ij)`` with
    ``z₊ = min_i z_{i,y_i}`` the smallest true logit and ``z₋`` the largest false logit of the batch
    (any row, any class other than that row's label), ``γ = margin > 0``.

    ``reduction="mean"`` is ``L``; ``"sum"`` is ``m·L``. There is no per-example value (``z₊`` and ``z₋``
    belong to the batch), so ``"none"`` is refused.
    """
    margin = check_positive(margin, "margin", "batch_max_margin")
    check_reduction(reduction, "batch_max_margin", allowed=("mean", "sum"))
    z = check_logits(logits, "batch_max_margin")
    check_batch_size(z, "batch_max_margin")
    y = check_target(target, z, "batch_max_margin")
    true_logit, false_max = true_and_largest_false(z, y)  # per row; their min / max are z₊ / z₋
    batch_hinge = torch.clamp_min(margin - true_logit.amin() + false_max.amax(), 0.0)
    total = batch_hinge + torch.clamp_min(margin - true_logit + false_max, 0.0).sum()
    return total / z.shape[0] if reduction == "mean" else total


@register("batch_ce", pols_aligned=True, functional=batch_cross_entropy, multilabel=True, global_batch=True)
class BatchCrossEntropyLoss(nn.Module):
    """Module form of :func:`batch_cross_entropy`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "batch_ce")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return batch_cross_entropy(logits, target, reduction=self.reduction)


@register("batch_max_margin", pols_aligned=True, functional=batch_max_margin, global_batch=True)
class BatchMaxMarginLoss(nn.Module):
    """Module form of :func:`batch_max_margin`."""

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = check_positive(margin, "margin", "batch_max_margin")
        self.reduction = check_reduction(reduction, "batch_max_margin", allowed=("mean", "sum"))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return batch_max_margin(logits, target, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
