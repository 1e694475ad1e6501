"""Classification heads with single-logit scoring.

A head maps an embedding ``h [m, d]`` to class scores. ``forward(h)`` gives all ``k`` of them (``[m, k]``, for
training); ``score(h, c)`` gives the score of **one** class per example at the cost of one dot product per
example, ``O(d)``, never the ``[m, k]`` product: the fast single-class query of Single Logit Classification
(Keren, Sabato & Schuller, ICDM 2018).

* :class:`CosineHead`: cosines between the normalised embedding and normalised class weights, the input of the
  cosine-margin losses (``norm_softmax``, ``cosface``, ``arcface``, ``elasticface``).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses._checks import check_positive

__all__ = ["CosineHead"]


# ------------------------------------------------------------------------------------------------- helpers


def _check_size(value: object, name: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{head}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _check_embeddings(h: object, d: int, head: str) -> Tensor:
    if not isinstance(h, Tensor):
        raise TypeError(f"{head}: h must be a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"{head}: h must be a floating-point tensor, got dtype {h.dtype}")
    if h.dim() != 2 or h.shape[1] != d:
        raise ValueError(f"{head}: h must be [batch, {d}], got shape {tuple(h.shape)}")
    return h


def _check_classes(c: object, m: int, k: int, head: str) -> int | Tensor:
    """One class for every example (an int, or a 0-d integer tensor) or one per example (a ``[m]`` tensor)."""
    if isinstance(c, Tensor):
        if c.dtype == torch.bool or c.is_floating_point() or c.is_complex():
            raise TypeError(f"{head}: class indices must be integers, got dtype {c.dtype}")
        if c.dim() == 0:
            c = int(c)
        elif c.dim() != 1 or c.shape[0] != m:
            raise ValueError(f"{head}: c must be an int or a [{m}] tensor of class indices, got shape {tuple(c.shape)}")
        else:
            if m > 0:
                lo, hi = int(c.min()), int(c.max())
                if lo < 0 or hi >= k:
                    raise ValueError(f"{head}: class indices must be in [0, {k}), got range [{lo}, {hi}]")
            return c.long()
    if isinstance(c, bool) or not isinstance(c, numbers.Integral):
        raise TypeError(f"{head}: c must be an int or an integer tensor, got {type(c).__name__}")
    c = int(c)
    if not 0 <= c < k:
        raise ValueError(f"{head}: class index must be in [0, {k}), got {c}")
    return c


def _normalize(x: Tensor) -> Tensor:
    """``x / max(‖x‖₂, ε)`` along the last dim, ``ε = 1e-12`` (float16: its smallest normal number, ~6.1e-5,
    because 1e-12 underflows to 0 there). A zero vector stays zero, so its cosines are 0, never NaN."""
    return F.normalize(x, dim=-1, eps=max(1e-12, torch.finfo(x.dtype).tiny))


# ---------------------------------------------------------------------------------------------------- heads


class CosineHead(nn.Module):
    """Cosine head: ``cos θ_ij = ĥ_i · ŵ_j`` with ``ĥ = h/‖h‖``, ``ŵ_j = W_j/‖W_j‖`` and ``W`` of shape ``[k, d]``.

    * ``forward(h)`` → ``[m, k]`` cosines in ``[−1, 1]`` (clamped against rounding): the input of the
      cosine-margin losses, e.g. ``get_loss("arcface")(head(h), y)``.
    * ``logits(h)`` → ``scale·forward(h)``, the scores of the normalised softmax at test time.
    * ``score(h, c)`` → ``[m]`` cosines of one class per example (``c`` an int or a ``[m]`` index tensor),
      computed from the rows ``W[c]`` only: one dot product per example, ``O(m·d)`` whatever ``k``.

    Normalisation divides by ``max(‖x‖, 1e-12)`` (``F.normalize``), so zero vectors give cosine 0. The
    weights are initialised ``N(0, 1/d)``, rows of norm ≈ 1: the gradient of ``ŵ`` scales as ``1/‖W_j‖``, so unit
    rows keep the effective step of the directions equal to the learning rate.
    """

    def __init__(self, d: int, k: int, scale: float = 1.0) -> None:
        super().__init__()
        self.d = _check_size(d, "d", "CosineHead")
        self.k = _check_size(k, "k", "CosineHead")
        self.scale = check_positive(scale, "scale", "CosineHead")
        self.weight = nn.Parameter(torch.empty(self.k, self.d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.d))

    def forward(self, h: Tensor) -> Tensor:
        h = _check_embeddings(h, self.d, "CosineHead")
        return (_normalize(h) @ _normalize(self.weight).T).clamp(-1.0, 1.0)

    def logits(self, h: Tensor) -> Tensor:
        """``scale·cos θ``, ``[m, k]``."""
        return self.scale * self.forward(h)

    def score(self, h: Tensor, c: int | Tensor) -> Tensor:
        """Cosine of class ``c`` for each example, ``[m]``: ``ĥ_i · ŵ_{c_i}``, one dot product per example.

        Only the rows ``W[c]`` are read and normalised; equal to ``forward(h)[i, c_i]`` up to rounding.
        """
        h = _check_embeddings(h, self.d, "CosineHead")
        c = _check_classes(c, h.shape[0], self.k, "CosineHead")
        rows = self.weight[c] if isinstance(c, int) else self.weight[c.to(self.weight.device)]  # [d] or [m, d]
        cos = (_normalize(h) * _normalize(rows)).sum(dim=-1)
        return cos.clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, scale={self.scale}"
