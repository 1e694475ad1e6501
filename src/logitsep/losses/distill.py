"""Distillation objectives: a student learns from the logits of one or more teachers (``logitsep distill``).

Teachers' logits ``z_T^(1..m)`` (computed without gradient), the student's ``z_S``, all ``[n, k]``:

* ``kd`` (Hinton, Vinyals & Dean 2015): ``τ² · KL(p̄_τ ‖ softmax(z_S/τ))`` averaged over the batch, with
  ``p̄_τ = mean_i softmax(z_T^(i)/τ)`` (the ensemble's soft label at temperature τ). The τ² keeps the gradient's
  scale independent of τ.
* ``logit_match``: ``mean over the batch of mean_j (z_S − z̄_T)²_j`` with ``z̄_T`` the teachers' mean logits (Ba &
  Caruana 2014; MSE on logits).
* ``meal_v2`` (Shen & Savvides 2020, their public code): the soft label is the mean of the teachers' softmax at
  temperature 1, the student minimises ``−Σ_j p̄_j log softmax(z_S)_j`` (the hard labels unused), plus the loss of
  a discriminator (:class:`Discriminator`, a small MLP on logits) trained with BCE-with-logits to tell student
  logits (target ``[1, 0]``) from the teachers' mean logits (target ``[0, 1]``); student and discriminator both
  **minimise** that sum (one optimizer, as in MEAL V2's ``train.py``: it is not a minimax game).

What matters for single logits: all three terms are functions of per-example softmaxes or logits relative to the
teacher. ``kd`` and ``meal_v2``'s soft CE are unchanged when one example's logits all shift together, so alone they
cannot give separated single logits; ``logit_match`` copies the teacher's logits, and with them the teacher's
(lack of) separation. A registered loss on the hard labels (``alpha``) is what adds the Principle of Logit
Separation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OBJECTIVES", "Discriminator", "check_objective", "discriminator_loss", "kd_loss", "logit_match_loss",
           "meal_v2_soft_loss", "objective_loss"]

OBJECTIVES = ("kd", "meal_v2", "logit_match")


def check_objective(objective: object, temperature: object = 1.0) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown distillation objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    return str(objective)


def _stack(teachers: Sequence[Tensor] | Tensor, student: Tensor) -> Tensor:
    t = torch.stack(list(teachers)) if not isinstance(teachers, Tensor) else teachers
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[1:] != student.shape:
        raise ValueError(f"teacher logits must be [m, n, k] (or a list of [n, k]) matching the student's "
                         f"{tuple(student.shape)}, got {tuple(t.shape)}")
    return t.detach().to(student.dtype)


def kd_loss(student: Tensor, teachers: Sequence[Tensor] | Tensor, temperature: float = 4.0) -> Tensor:
    """``τ²·KL(p̄_τ ‖ softmax(z_S/τ))``, batch mean (module docstring)."""
    t = _stack(teachers, student)
    p = torch.softmax(t / temperature, dim=-1).mean(0)
    log_q = torch.log_softmax(student / temperature, dim=-1)
    kl = (p * (torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) - log_q)).sum(-1)
    return temperature ** 2 * kl.mean()


def logit_match_loss(student: Tensor, teachers: Sequence[Tensor] | Tensor) -> Tensor:
    """Mean squared difference between the student's logits and the teachers' mean logits."""
    return (student - _stack(teachers, student).mean(0)).square().mean()


def meal_v2_soft_loss(student: Tensor, teachers: Sequence[Tensor] | Tensor) -> Tensor:
    """``−Σ_j p̄_j log softmax(z_S)_j``, batch mean, ``p̄`` the mean of the teachers' softmax (temperature 1)."""
    p = torch.softmax(_stack(teachers, student), dim=-1).mean(0)
    return -(p * torch.log_softmax(student, dim=-1)).sum(-1).mean()


class Discriminator(nn.Module):
    """MEAL V2's discriminator on logits: ``k → h₁ → h₂ → 2`` linear layers (their 1×1 convolutions), a ReLU after
    each, the last included (as in their ``models/discriminator.py``); ``h₁ = max(k // 8, 16)``,
    ``h₂ = max(h₁ // 8, 8)`` (their K = 8, with floors so that small k still has a hidden layer)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        h1 = max(k // 8, 16)
        h2 = max(h1 // 8, 8)
        self.net = nn.Sequential(nn.Linear(k, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2),
                                 nn.ReLU())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def discriminator_loss(disc: nn.Module, student: Tensor, teachers: Sequence[Tensor] | Tensor) -> Tensor:
    """BCE-with-logits of ``disc`` on the student's logits (target ``[1, 0]``) and the teachers' mean logits
    (target ``[0, 1]``), one batch of both: the mean over ``2n × 2`` entries."""
    t = _stack(teachers, student).mean(0)
    out = disc(torch.cat([student, t]))
    n = student.shape[0]
    target = torch.zeros_like(out)
    target[:n, 0] = 1.0
    target[n:, 1] = 1.0
    return F.binary_cross_entropy_with_logits(out, target)


def objective_loss(objective: str, student: Tensor, teachers: Sequence[Tensor] | Tensor, *,
                   temperature: float = 4.0, discriminator: nn.Module | None = None) -> Tensor:
    """The distillation term of ``objective`` (``meal_v2`` needs its ``discriminator``)."""
    if objective == "kd":
        return kd_loss(student, teachers, temperature)
    if objective == "logit_match":
        return logit_match_loss(student, teachers)
    if objective == "meal_v2":
        if discriminator is None:
            raise ValueError("meal_v2 needs a discriminator")
        return meal_v2_soft_loss(student, teachers) + discriminator_loss(discriminator, student, teachers)
    raise ValueError(f"unknown distillation objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
