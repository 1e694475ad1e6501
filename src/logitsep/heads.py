"""Classification heads with single-logit scoring.

A head maps an embedding ``h [n, d]`` to class scores. ``forward(h)`` gives all ``k`` of them (``[n, k]``, for
training); ``logit(h, c)`` gives the logit of **one** class per example at the cost of one dot product per
example, ``O(d)``, never the ``[n, k]`` product: the fast single-class query of Single Logit Classification
(Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of Logit Separation", ICDM 2018).
``logits(h, classes)`` scores a small subset of classes, ``O(n·d·len(classes))``.

* :class:`LinearHead`: ``z_j = W_j·h + b_j`` (an ``nn.Linear``: same state-dict keys, init and attributes, so
  checkpoints of models built with ``nn.Linear`` heads load unchanged). ``zscore(h, c)`` gives the Z-loss
  z-score of one class in ``O(d²)`` per example, independent of ``k``.
* :class:`CosineHead`: cosines between the normalised embedding and normalised class weights, the input of the
  cosine-margin losses (``norm_softmax``, ``cosface``, ``arcface``, ``elasticface``); its logits are
  ``scale·cos``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses._checks import check_positive

__all__ = ["CosineHead", "LinearHead"]

# Rows of W per QR step when the z-score statistics are (re)computed: bounds the float64 scratch memory.
_ZSTATS_CHUNK = 8192


# ------------------------------------------------------------------------------------------------- helpers


def _check_size(value: object, name: str, head: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{head}: {name} must be a positive integer, got {value!r}")
    return int(value)


def _check_embeddings(h: object, weight: Tensor, head: str, *, same_dtype: bool = True) -> Tensor:
    """``h`` must be a floating ``[n, d]`` tensor on the weights' device (and, unless autocast is on or
    ``same_dtype`` is False, of the weights' dtype)."""
    d = weight.shape[1]
    if not isinstance(h, Tensor):
        raise TypeError(f"{head}: h must be a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"{head}: h must be a floating-point tensor, got dtype {h.dtype}")
    if h.dim() != 2 or h.shape[1] != d:
        raise ValueError(f"{head}: h must be [batch, {d}] (embedding dimension {d}), got shape {tuple(h.shape)}")
    if h.device != weight.device:
        raise ValueError(f"{head}: h is on {h.device} but the head's weights are on {weight.device}")
    if same_dtype and h.dtype != weight.dtype and not torch.is_autocast_enabled(h.device.type):
        raise TypeError(f"{head}: h has dtype {h.dtype} but the head's weights have dtype {weight.dtype}")
    return h


def _check_classes(c: object, m: int, k: int, head: str) -> int | Tensor:
    """One class for every example (an int, or a 0-d integer tensor) or one per example (a ``[m]`` tensor)."""
    if type(c) is int and 0 <= c < k:  # the common query, checked without the ABC machinery below
        return c
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


def _check_class_list(classes: object, k: int, head: str) -> Tensor:
    """A 1-D integer tensor (or a sequence of ints) of class indices in ``[0, k)``; duplicates are allowed."""
    if not isinstance(classes, Tensor):
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
            raise TypeError(f"{head}: classes must be a 1-D integer tensor or a list of ints, "
                            f"got {type(classes).__name__}")
        if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in classes):
            raise TypeError(f"{head}: classes must be integers, got {list(classes)!r}")
        classes = torch.tensor([int(v) for v in classes], dtype=torch.long)
    if classes.dtype == torch.bool or classes.is_floating_point() or classes.is_complex():
        raise TypeError(f"{head}: class indices must be integers, got dtype {classes.dtype}")
    if classes.dim() != 1:
        raise ValueError(f"{head}: classes must be a 1-D tensor of class indices, got shape {tuple(classes.shape)}")
    if classes.numel() > 0:
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi >= k:
            raise ValueError(f"{head}: class indices must be in [0, {k}), got range [{lo}, {hi}]")
    return classes.long()


def _rows(weight: Tensor, c: int | Tensor) -> Tensor:
    """``W[c]``: a ``[d]`` row for one class, ``[n, d]`` rows for a per-example index tensor."""
    return weight[c] if isinstance(c, int) else weight[c.to(weight.device)]


def _normalize(x: Tensor) -> Tensor:
    """``x / max(‖x‖₂, ε)`` along the last dim, ``ε = 1e-12`` (float16: its smallest normal number, ~6.1e-5,
    because 1e-12 underflows to 0 there). A zero vector stays zero, so its cosines are 0, never NaN."""
    return F.normalize(x, dim=-1, eps=max(1e-12, torch.finfo(x.dtype).tiny))


# ---------------------------------------------------------------------------------------------------- heads


class LinearHead(nn.Linear):
    """Linear head ``z_j(h) = W_j·h + b_j``, ``W [k, d]``, ``b [k]``: an ``nn.Linear(d, k)`` (same parameters,
    state-dict keys ``weight``/``bias``, initialisation and ``in_features``/``out_features``) with single-logit
    scoring.

    * ``forward(h)`` → ``[n, k]`` all logits (training, the "all logits" baseline).
    * ``logit(h, c)`` → ``[n]``: ``W[c_i]·h_i + b[c_i]``, one dot product per example, whatever ``k``.
    * ``logits(h, classes)`` → ``[n, q]``: ``h W[classes]ᵀ + b[classes]`` for a small subset of ``q`` classes.
    * ``zscore(h, c)`` → ``[n]``: ``(z_c − μ)/σ``, the Z-loss z-score (de Brébisson & Vincent 2016), ``O(d²)``
      per example from statistics of ``W`` and ``b`` cached between calls.
    """

    def __init__(self, d: int, k: int) -> None:
        super().__init__(_check_size(d, "d", "LinearHead"), _check_size(k, "k", "LinearHead"))
        self._zstats: dict[str, object] | None = None

    @property
    def d(self) -> int:
        return self.in_features

    @property
    def k(self) -> int:
        return self.out_features

    def forward(self, h: Tensor) -> Tensor:
        """All ``k`` logits, ``[n, k]`` (``F.linear``, exactly as ``nn.Linear``)."""
        return F.linear(_check_embeddings(h, self.weight, "LinearHead"), self.weight, self.bias)

    def logit(self, h: Tensor, c: int | Tensor) -> Tensor:
        """Logit of class ``c`` for each example, ``[n]``: ``W[c_i]·h_i + b[c_i]``.

        ``c`` is an int (the same class for every row) or a ``[n]`` integer tensor (one class per row). Only the
        rows ``W[c]`` are read: ``O(n·d)`` work and memory, never an ``[n, k]`` product. Equal to
        ``forward(h)[i, c_i]`` up to rounding.
        """
        weight, bias = self.weight, self.bias  # read once: nn.Module attribute lookup is not free at this scale
        h = _check_embeddings(h, weight, "LinearHead")
        c = _check_classes(c, h.shape[0], self.k, "LinearHead")
        if isinstance(c, int):
            return torch.addmv(bias[c], h, weight[c])  # one fused kernel: b_c + h·W_c
        c = c.to(weight.device)
        return torch.einsum("nd,nd->n", h, weight[c]) + bias[c]

    def logits(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        """Logits of the classes ``classes`` (a 1-D index tensor or list, duplicates allowed) for every example,
        ``[n, len(classes)]``: ``h W[classes]ᵀ + b[classes]``, ``O(n·d·len(classes))``."""
        h = _check_embeddings(h, self.weight, "LinearHead")
        classes = _check_class_list(classes, self.k, "LinearHead").to(self.weight.device)
        return F.linear(h, self.weight[classes], self.bias[classes])

    # ------------------------------------------------------------------------------------ z-score (Z-loss)

    def refresh(self) -> None:
        """Drop the cached z-score statistics; the next :meth:`zscore` recomputes them.

        Needed only after editing the weights in a way the parameters' version counters do not see
        (through ``weight.data``); optimizer steps, ``load_state_dict``, in-place edits under ``no_grad``,
        ``.to()`` and assigning new parameters are detected automatically.
        """
        self._zstats = None

    def _zstats_key(self) -> tuple:
        w, b = self.weight, self.bias
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape),
                b.data_ptr(), b._version, b.dtype, tuple(b.shape))

    @torch.no_grad()
    def _compute_zstats(self) -> dict[str, object]:
        """Float64 statistics for :meth:`zscore`, ``O(k·d²)`` once.

        With ``A = [W, b]`` (``[k, d+1]``), ``x = [h; 1]`` and ``z = A x``: the mean ``μ = ā·x`` with ``ā`` the
        mean row (``ā = [w̄, Σb]/k`` with ``w̄ = Σ_j W_j``), and ``k·σ² = Σ_j (z_j − μ)² = ‖Ã x‖²`` with
        ``Ã = A − 1ā`` the centred rows. Expanding ``‖Ã x‖²`` gives the spherical-family identity of DESIGN.md,
        ``hᵀQh + 2(Wᵀb)·h + ‖b‖² − (w̄·h + Σb)²/k`` (``Q = WᵀW``); here the centred Gram matrix
        ``ÃᵀÃ = [[Q, Wᵀb], [(Wᵀb)ᵀ, ‖b‖²]] − k·āāᵀ`` is kept in factored form ``ÃᵀÃ = RᵀR`` (``R`` from a QR
        decomposition of ``Ã``, ``[min(k, d+1), d+1]``, built chunk by chunk), so that per example
        ``k·σ² = ‖R x‖²`` is a sum of squares: no ``E[z²] − E[z]²`` cancellation, exact under any common
        offset of the logits, never negative.
        """
        w, b = self.weight.detach(), self.bias.detach()
        k, d = w.shape
        w_mean = torch.zeros(d, dtype=torch.float64, device=w.device)
        for i in range(0, k, _ZSTATS_CHUNK):
            w_mean += w[i:i + _ZSTATS_CHUNK].double().sum(dim=0)
        w_mean /= k
        b_mean = b.double().mean()
        r = torch.zeros(0, d + 1, dtype=torch.float64, device=w.device)
        for i in range(0, k, _ZSTATS_CHUNK):
            centred = torch.cat([w[i:i + _ZSTATS_CHUNK].double() - w_mean,
                                 (b[i:i + _ZSTATS_CHUNK].double() - b_mean)[:, None]], dim=1)
            r = torch.linalg.qr(torch.cat([r, centred]), mode="r").R
        # keep aliases of the parameters: their storage stays alive, so a new tensor cannot reuse the address
        return {"key": self._zstats_key(), "alias": (w, b), "w_mean": w_mean, "b_mean": b_mean,
                "r_w": r[:, :d].T.contiguous(), "r_b": r[:, d].contiguous()}

    def _zstats_now(self) -> dict[str, object]:
        if self._zstats is None or self._zstats["key"] != self._zstats_key():
            self._zstats = self._compute_zstats()
        return self._zstats

    @torch.no_grad()
    def zscore(self, h: Tensor, c: int | Tensor) -> Tensor:
        """Z-score of class ``c`` for each example, ``[n]``: ``ẑ_c = (z_c − μ)/σ`` with ``μ``, ``σ`` the mean and
        the population standard deviation (÷k) of the example's ``k`` logits (``logitsep.losses.spherical.z_score``;
        rows whose logits are all equal give 0).

        ``O(d²)`` per example, independent of ``k``: ``z_c − μ = (W_c − w̄/k)·h + (b_c − Σb/k)`` and
        ``k·σ² = ‖R [h; 1]‖²`` with the cached statistics of :meth:`_compute_zstats` (recomputed when the
        weights change). Computed in float64 and returned in ``h``'s dtype (any floating dtype is accepted).
        Inference only: no gradient flows through it.
        """
        h = _check_embeddings(h, self.weight, "LinearHead", same_dtype=False)
        c = _check_classes(c, h.shape[0], self.k, "LinearHead")
        s = self._zstats_now()
        x = h.double()
        if not isinstance(c, int):
            c = c.to(self.weight.device)
        centred = (x * (self.weight[c].double() - s["w_mean"])).sum(dim=-1) + (self.bias[c].double() - s["b_mean"])
        var = (x @ s["r_w"] + s["r_b"]).square().sum(dim=-1) / self.k
        constant = var <= 0
        z = torch.where(constant, torch.zeros_like(var), centred / torch.sqrt(torch.where(constant, 1.0, var)))
        return z.to(h.dtype)


class CosineHead(nn.Module):
    """Cosine head: ``cos θ_ij = ĥ_i · ŵ_j`` with ``ĥ = h/‖h‖``, ``ŵ_j = W_j/‖W_j‖`` and ``W`` of shape ``[k, d]``.

    * ``forward(h)`` → ``[n, k]`` cosines in ``[−1, 1]`` (clamped against rounding): the input of the
      cosine-margin losses, e.g. ``get_loss("arcface")(head(h), y)``.
    * ``logit(h, c)`` → ``[n]`` logits ``scale·cos θ`` of one class per example (``c`` an int or a ``[n]`` index
      tensor), computed from the rows ``W[c]`` only: one dot product per example, ``O(n·d)`` whatever ``k``.
      ``score`` is the same method under its former name.
    * ``logits(h, classes)`` → ``[n, q]`` logits ``scale·cos θ`` of a subset of classes.

    The logits are ``scale·cos θ``, the scores of the normalised softmax at test time; with the default
    ``scale = 1`` (what the training code builds) they equal ``forward``'s cosines.

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
        h = _check_embeddings(h, self.weight, "CosineHead")
        return (_normalize(h) @ _normalize(self.weight).T).clamp(-1.0, 1.0)

    def logit(self, h: Tensor, c: int | Tensor) -> Tensor:
        """Logit ``scale·ĥ_i·ŵ_{c_i}`` of class ``c`` for each example, ``[n]``, one dot product per example.

        Only the rows ``W[c]`` are read and normalised; equal to ``scale·forward(h)[i, c_i]`` up to rounding.
        """
        h = _check_embeddings(h, self.weight, "CosineHead")
        c = _check_classes(c, h.shape[0], self.k, "CosineHead")
        cos = (_normalize(h) * _normalize(_rows(self.weight, c))).sum(dim=-1)
        return self.scale * cos.clamp(-1.0, 1.0)

    score = logit

    def logits(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        """Logits ``scale·cos θ`` of the classes ``classes`` (1-D index tensor or list), ``[n, len(classes)]``."""
        h = _check_embeddings(h, self.weight, "CosineHead")
        classes = _check_class_list(classes, self.k, "CosineHead").to(self.weight.device)
        return self.scale * (_normalize(h) @ _normalize(self.weight[classes]).T).clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, scale={self.scale}"
