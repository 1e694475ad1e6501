"""Classification heads with single-logit scoring.

A head maps an embedding ``h [n, d]`` to class scores. ``forward(h)`` gives all ``k`` of them (``[n, k]``, for
training); ``logit(h, c)`` gives the logit of **one** class per example at the cost of one dot product per
example, ``O(d)``, never the ``[n, k]`` product: the fast single-class query of Single Logit Classification
(Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of Logit Separation", ICDM 2018).
``logits(h, classes)`` scores a small subset of classes, ``O(n·d·len(classes))``.

Every head implements :class:`Head`, the interface every consumer (the classifier, class search, the service,
training) uses: ``k``, ``d``, ``kind``, ``logit``, ``logits``, and for class search ``class_vectors`` /
``item_vectors`` (whose inner products are the logits, with the bias folded in as one more dimension) and
``fingerprint`` (an index records the head that built it).
``outputs(h, classes)`` gives those columns of ``forward(h)`` (the logits; a cosine head's unscaled cosines): the
model's outputs for a block of classes, what evaluation at large ``k`` scores.

* :class:`LinearHead`: ``z_j = W_j·h + b_j`` (an ``nn.Linear``: same state-dict keys, init and attributes, so
  checkpoints of models built with ``nn.Linear`` heads load unchanged). ``zscore(h, c)`` gives the Z-loss
  z-score of one class in ``O(d²)`` per example, independent of ``k``.
* :class:`CosineHead`: cosines between the normalised embedding and normalised class weights, the input of the
  cosine-margin losses (``norm_softmax``, ``cosface``, ``arcface``, ``elasticface``); its logits are
  ``scale·cos``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.checks import check_positive, check_positive_int, class_indices, per_example_classes

__all__ = ["CosineHead", "Head", "LinearHead", "as_head"]

# Rows of W per QR step when the z-score statistics are (re)computed: bounds the float64 scratch memory.
_ZSTATS_CHUNK = 8192


# ------------------------------------------------------------------------------------------------- helpers


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


def _rows(weight: Tensor, c: int | Tensor) -> Tensor:
    """``W[c]``: a ``[d]`` row for one class, ``[n, d]`` rows for a per-example index tensor."""
    return weight[c] if isinstance(c, int) else weight[c.to(weight.device)]


def _normalize(x: Tensor) -> Tensor:
    """``x / max(‖x‖₂, ε)`` along the last dim, ``ε = 1e-12`` (float16: its smallest normal number, ~6.1e-5,
    because 1e-12 underflows to 0 there). A zero vector stays zero, so its cosines are 0, never NaN."""
    return F.normalize(x, dim=-1, eps=max(1e-12, torch.finfo(x.dtype).tiny))


# ---------------------------------------------------------------------------------------------------- heads


class Head:
    """The interface of every head: what the classifier, class search, the service and training rely on.

    * ``k`` classes, embedding dimension ``d``, ``kind`` (``"linear"`` or ``"cosine"``);
    * ``logit(h, c)`` → ``[n]``: the logit of one class per example (an int, or a ``[n]`` index tensor), one dot
      product per example; ``logits(h, classes)`` → ``[n, q]`` for a subset of classes;
    * ``class_vectors(classes=None)`` → ``[q, d+1]`` float32 on the CPU and ``item_vectors(h)`` → ``[n, d+1]``
      float32: their inner products are the logits (``item_vectors(h) @ class_vectors().T`` equals the logits up
      to rounding), so "all items of class c" over stored embeddings is an inner-product range query;
    * ``fingerprint()``: SHA-256 of the head's kind, shape, scale and parameters (float32 bytes); an index records
      the fingerprint of the head that built it and refuses any other.
    """

    kind: str
    k: int
    d: int

    def logit(self, h: Tensor, c: int | Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        raise NotImplementedError

    def outputs(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        """The columns ``classes`` of ``forward(h)`` (what the model outputs and its loss and metrics see),
        ``O(n·d·len(classes))``: the logits, but a cosine head's cosines without its ``scale``."""
        return self.logits(h, classes)

    def class_vectors(self, classes: object = None) -> Tensor:
        raise NotImplementedError

    def item_vectors(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def _fingerprint_parts(self) -> tuple[dict[str, object], list[Tensor]]:
        raise NotImplementedError

    @torch.no_grad()
    def logit_columns(self, h: Tensor, classes: Sequence[int] | Tensor | None = None) -> Tensor:
        """Every class's logit, ``[n, k]`` (or those of ``classes``, e.g. a block ``range(a, b)``: ``[n,
        len(classes)]``), computed as ``logit(h, c)`` class by class: bit for bit what a single-logit decision
        computes (``logits(h, classes)``, a matrix product, gives the same values up to rounding, in another
        summation order), so that a calibration example sitting exactly at a threshold is decided the same way
        later. ``O(n·k·d)``, about 10x slower than one matrix product; calibration runs once."""
        columns = range(self.k) if classes is None else class_indices(classes, self.k, "logit_columns").tolist()
        return torch.stack([self.logit(h, c) for c in columns], dim=1)

    @torch.no_grad()
    def fingerprint(self, rows: int | None = None) -> str:
        """SHA-256 of the head (see the class docstring); changes with any parameter. ``rows``: of its first
        ``rows`` classes only, as if the head had those alone (the trained classes of a head with enrolled rows:
        an index built before an enrollment stays valid after it)."""
        description, tensors = self._fingerprint_parts()
        if rows is not None and rows != self.k:
            if not 1 <= rows <= self.k:
                raise ValueError(f"fingerprint of {rows} rows asked of a head of {self.k}")
            description = {**description, "shape": [rows, *description["shape"][1:]]}
            tensors = [t[:rows] for t in tensors]
        digest = hashlib.sha256(json.dumps(description).encode())
        for t in tensors:
            digest.update(memoryview(t.detach().to("cpu", torch.float32).contiguous().numpy()).cast("B"))
        return digest.hexdigest()

    def _item_rows(self, h: object, name: str) -> Tensor:
        """``h`` checked (``[n, d]`` floating, any dtype and device) and detached as float32."""
        return _check_embeddings(h, self.weight, name, same_dtype=False).detach().float()


def as_head(module: nn.Module) -> Head:
    """``module`` as a :class:`Head`: a head is returned as is; a plain ``nn.Linear`` (with or without bias) becomes
    a :class:`LinearHead` sharing its parameters; anything else is a ``TypeError``."""
    if isinstance(module, Head):
        return module
    if isinstance(module, nn.Linear):
        head = LinearHead(module.in_features, module.out_features, bias=module.bias is not None)
        head.weight = module.weight
        if module.bias is not None:
            head.bias = module.bias
        return head
    raise TypeError(f"a head must be a linear head (nn.Linear / LinearHead) or a CosineHead, "
                    f"got {type(module).__name__}")


class LinearHead(nn.Linear, Head):
    """Linear head ``z_j(h) = W_j·h + b_j``, ``W [k, d]``, ``b [k]``: an ``nn.Linear(d, k)`` (same parameters,
    state-dict keys ``weight``/``bias``, initialisation and ``in_features``/``out_features``) with single-logit
    scoring.

    * ``forward(h)`` → ``[n, k]`` all logits (training, the "all logits" baseline).
    * ``logit(h, c)`` → ``[n]``: ``W[c_i]·h_i + b[c_i]``, one dot product per example, whatever ``k``.
    * ``logits(h, classes)`` → ``[n, q]``: ``h W[classes]ᵀ + b[classes]`` for a small subset of ``q`` classes.
    * ``zscore(h, c)`` → ``[n]``: ``(z_c − μ)/σ``, the Z-loss z-score (de Brébisson & Vincent 2016), ``O(d²)``
      per example from statistics of ``W`` and ``b`` cached between calls.
    """

    kind = "linear"

    def __init__(self, d: int, k: int, bias: bool = True) -> None:
        super().__init__(check_positive_int(d, "d", "LinearHead"), check_positive_int(k, "k", "LinearHead"),
                         bias=bias)
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
        c = per_example_classes(c, h.shape[0], self.k, "LinearHead")
        if bias is None:
            return h @ weight[c] if isinstance(c, int) else torch.einsum("nd,nd->n", h, weight[c.to(weight.device)])
        if isinstance(c, int):
            return torch.addmv(bias[c], h, weight[c])  # one fused kernel: b_c + h·W_c
        c = c.to(weight.device)
        return torch.einsum("nd,nd->n", h, weight[c]) + bias[c]

    def logits(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        """Logits of the classes ``classes`` (a 1-D index tensor or list, duplicates allowed) for every example,
        ``[n, len(classes)]``: ``h W[classes]ᵀ + b[classes]``, ``O(n·d·len(classes))``."""
        h = _check_embeddings(h, self.weight, "LinearHead")
        classes = class_indices(classes, self.k, "LinearHead").to(self.weight.device)
        return F.linear(h, self.weight[classes], None if self.bias is None else self.bias[classes])

    # ------------------------------------------------------------------------------------ class search

    @torch.no_grad()
    def class_vectors(self, classes: object = None) -> Tensor:
        """``[W_c, b_c]`` of each class (``b_c = 0`` without a bias), ``[q, d+1]`` float32 on the CPU; ``classes``:
        an int, a list of ints, a 1-D integer tensor, or None for every class."""
        idx = torch.arange(self.k) if classes is None else class_indices(classes, self.k, "class_vectors")
        rows = self.weight.detach()[idx.to(self.weight.device)].float().cpu()
        b = (torch.zeros(len(idx)) if self.bias is None
             else self.bias.detach()[idx.to(self.bias.device)].float().cpu())
        return torch.cat([rows, b[:, None]], dim=1)

    @torch.no_grad()
    def item_vectors(self, h: Tensor) -> Tensor:
        """``[h, 1]`` of each embedding, ``[n, d+1]`` float32 on ``h``'s device."""
        h = self._item_rows(h, "item_vectors")
        return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)

    def _fingerprint_parts(self) -> tuple[dict[str, object], list[Tensor]]:
        return ({"type": "LinearHead", "shape": list(self.weight.shape), "bias": self.bias is not None,
                 "scale": None}, [self.weight] + ([] if self.bias is None else [self.bias]))

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
                None if b is None else (b.data_ptr(), b._version, b.dtype, tuple(b.shape)))

    def _bias_or_zeros(self) -> Tensor:
        return self.bias if self.bias is not None else self.weight.new_zeros(self.k)

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
        w, b = self.weight.detach(), self._bias_or_zeros().detach()
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
        c = per_example_classes(c, h.shape[0], self.k, "LinearHead")
        s = self._zstats_now()
        x = h.double()
        if not isinstance(c, int):
            c = c.to(self.weight.device)
        centred = ((x * (self.weight[c].double() - s["w_mean"])).sum(dim=-1)
                    + (self._bias_or_zeros()[c].double() - s["b_mean"]))
        var = (x @ s["r_w"] + s["r_b"]).square().sum(dim=-1) / self.k
        constant = var <= 0
        z = torch.where(constant, torch.zeros_like(var), centred / torch.sqrt(torch.where(constant, 1.0, var)))
        return z.to(h.dtype)


class CosineHead(nn.Module, Head):
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

    kind = "cosine"

    def __init__(self, d: int, k: int, scale: float = 1.0) -> None:
        super().__init__()
        self.d = check_positive_int(d, "d", "CosineHead")
        self.k = check_positive_int(k, "k", "CosineHead")
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
        c = per_example_classes(c, h.shape[0], self.k, "CosineHead")
        cos = (_normalize(h) * _normalize(_rows(self.weight, c))).sum(dim=-1)
        return self.scale * cos.clamp(-1.0, 1.0)

    score = logit

    def logits(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        """Logits ``scale·cos θ`` of the classes ``classes`` (1-D index tensor or list), ``[n, len(classes)]``."""
        return self.scale * self.outputs(h, classes)

    def outputs(self, h: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
        """Cosines of the classes ``classes``, ``[n, len(classes)]``: those columns of ``forward(h)``."""
        h = _check_embeddings(h, self.weight, "CosineHead")
        classes = class_indices(classes, self.k, "CosineHead").to(self.weight.device)
        return (_normalize(h) @ _normalize(self.weight[classes]).T).clamp(-1.0, 1.0)

    @torch.no_grad()
    def class_vectors(self, classes: object = None) -> Tensor:
        """``[scale·ŵ_c, 0]`` of each class, ``[q, d+1]`` float32 on the CPU (``ŵ_c = W_c/max(‖W_c‖, 1e-12)``)."""
        idx = torch.arange(self.k) if classes is None else class_indices(classes, self.k, "class_vectors")
        rows = self.weight.detach()[idx.to(self.weight.device)].float().cpu()
        return torch.cat([self.scale * F.normalize(rows, dim=1, eps=1e-12), rows.new_zeros(len(idx), 1)], dim=1)

    @torch.no_grad()
    def item_vectors(self, h: Tensor) -> Tensor:
        """``[ĥ, 1]`` of each embedding (``ĥ = h/max(‖h‖, 1e-12)``), ``[n, d+1]`` float32 on ``h``'s device."""
        h = F.normalize(self._item_rows(h, "item_vectors"), dim=1, eps=1e-12)
        return torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)

    def _fingerprint_parts(self) -> tuple[dict[str, object], list[Tensor]]:
        return ({"type": "CosineHead", "shape": list(self.weight.shape), "bias": False,
                 "scale": float(self.scale)}, [self.weight])

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, scale={self.scale}"
