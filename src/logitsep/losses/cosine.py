"""Cosine-margin losses on cosine inputs: ``cosface``, ``arcface``, ``elasticface`` and ``norm_softmax``.

Every loss here takes **cosines** ``c_ij = cos θ_ij ∈ [−1, 1]`` between a normalised embedding and normalised class
weights (``logitsep.heads.CosineHead`` gives them), not free logits, and is a cross-entropy on rescaled cosines
in which the target cosine of each row may be penalised by a margin:

* ``norm_softmax`` (normalised softmax; NormFace, Wang et al., ACM MM 2017): CE on ``s·cos θ_ij``.
* ``cosface`` (Wang et al., CVPR 2018; also AM-Softmax): CE on ``s·(cos θ_ij − m·1[j = y_i])``.
* ``arcface`` (Deng et al., CVPR 2019): CE on ``s·cos(θ_{i,y_i} + m)`` for the target, ``s·cos θ_ij`` otherwise.
* ``elasticface`` (Boutros et al., CVPRW 2022): ArcFace or CosFace with the margin drawn per sample from
  ``N(m, σ)`` at every call; ``plus=True`` (ElasticFace+) hands the smallest drawn margins to the samples
  closest to their class centre.

Cosines are validated to lie in ``[−1, 1]`` up to a rounding tolerance (:data:`COSINE_TOLERANCE`, or two
machine epsilons of a half-precision input) and clamped into the interval. float16 / bfloat16 are computed in
float32. PoLS alignment is not established for any of them (``pols_aligned = None``): the project measures it.
They are registered with ``inputs="cosines"``, which tells the training code to end the model with a cosine head.

Two traps of the public reference code are handled here (see :func:`arc_margin` and :func:`elastic_margins`):
the angle ``θ + m`` passing ``π`` and the infinite slope of ``acos`` at ``±1`` (ArcFace), and the gathered
instead of scattered margins of ElasticFace+.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_logits, check_positive, check_reduction, check_target, value_checks_enabled
from .registry import register

#: Values outside ``[−1, 1]`` by at most this much are treated as rounding and clamped (float32 / float64
#: inputs; float16 / bfloat16 inputs allow two machine epsilons of their own dtype, ~2e-3 / ~1.6e-2).
COSINE_TOLERANCE = 1e-5

VARIANTS = ("arc", "cos")

# ElasticFace defaults (Boutros et al. 2022, and the official config, github.com/fdbtrs/ElasticFace
# config/config.py): s = 64 always; mean margin 0.5 (Arc) / 0.35 (Cos) as in ArcFace / CosFace; σ = 0.05 for
# ElasticFace-Arc/-Cos, σ = 0.0175 for ElasticFace-Arc+ and σ = 0.02 for ElasticFace-Cos+.
_ELASTIC_MARGIN = {"arc": 0.5, "cos": 0.35}
_ELASTIC_STD = {("arc", False): 0.05, ("cos", False): 0.05, ("arc", True): 0.0175, ("cos", True): 0.02}


# ----------------------------------------------------------------------------------------------- validation


def _check_cosines(cosines: object, loss: str) -> Tensor:
    """A ``[m, k]`` float tensor of cosines, upcast from half precision and clamped into ``[−1, 1]``.

    Values beyond ``[−1, 1]`` by more than the rounding tolerance raise ``ValueError`` with the range found.
    """
    c = check_logits(cosines, loss, name="cosines")
    in_dtype = cosines.dtype  # type: ignore[union-attr]  # a tensor: check_logits has verified it
    if not value_checks_enabled():
        return c.clamp(-1.0, 1.0)
    tol = COSINE_TOLERANCE
    if in_dtype in (torch.float16, torch.bfloat16):
        tol = max(tol, 2 * torch.finfo(in_dtype).eps)
    lo, hi = (float(v) for v in torch.aminmax(c.detach()))
    if lo < -1.0 - tol or hi > 1.0 + tol:
        raise ValueError(
            f"{loss}: cosines must lie in [-1, 1] (up to {tol:.3g} of rounding), found values in "
            f"[{lo:.6g}, {hi:.6g}]; pass cosine similarities (e.g. CosineHead(d, k)(h)), not unnormalised logits"
        )
    return c if -1.0 <= lo and hi <= 1.0 else c.clamp(-1.0, 1.0)  # clamp (a full copy) only when needed


def _check_generator(generator: object, loss: str) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{loss}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_variant(variant: object, loss: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"{loss}: variant must be one of {VARIANTS}, got {variant!r}")
    return variant  # type: ignore[return-value]


def _check_plus(plus: object, loss: str) -> bool:
    if not isinstance(plus, bool):
        raise TypeError(f"{loss}: plus must be a bool, got {type(plus).__name__}")
    return plus


def _elastic_defaults(
    margin: float | None, std: float | None, variant: str, plus: bool, loss: str = "elasticface"
) -> tuple[float, float]:
    """Resolve ``None`` to the paper's defaults for this variant, then validate (both ``>= 0``)."""
    margin = _ELASTIC_MARGIN[variant] if margin is None else margin
    std = _ELASTIC_STD[(variant, plus)] if std is None else std
    return (
        check_positive(margin, "margin", loss, allow_zero=True),
        check_positive(std, "std", loss, allow_zero=True),
    )


# ------------------------------------------------------------------------------------------ the computations


class _SinOfAcos(torch.autograd.Function):
    """``sin θ = sqrt((1 − c)(1 + c))`` for ``c = cos θ ∈ [−1, 1]``, with a finite derivative at ``c = ±1``.

    The value is exact everywhere. The derivative ``−c / sin θ`` is infinite at ``c = ±1``; the backward uses
    ``−c / max(sin θ, δ)`` with ``δ = sqrt(eps)`` of the dtype, which is the smallest non-zero ``sin θ`` the dtype
    can produce (float32: ~3.5e-4 at ``c = 1 − 2⁻²⁴``; float64: ~1.5e-8). So the derivative is exact at every
    representable cosine except ``±1`` themselves, where it takes the value at the adjacent representable
    cosine. (At ``θ = 0`` the composite ``cos(θ + m)`` of an embedding has a cusp, not a derivative; through a
    normalised head ``∂c/∂h = 0`` there, so any finite choice gives the same gradient to the network.)
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, c: Tensor) -> Tensor:  # type: ignore[override]
        s = torch.sqrt(torch.clamp_min((1.0 - c) * (1.0 + c), 0.0))
        ctx.save_for_backward(c, s)
        return s

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        c, s = ctx.saved_tensors  # type: ignore[attr-defined]
        floor = math.sqrt(torch.finfo(s.dtype).eps)
        return grad * (-c / torch.clamp_min(s, floor))


def arc_margin(cosines: Tensor, margin: float | Tensor) -> Tensor:
    """ArcFace's target cosine ``cos(θ + m)`` of ``cos θ``, monotonic in ``θ`` and with finite gradients.

    ``cosines`` must already lie in ``[−1, 1]``; ``margin`` is a number or a tensor broadcastable to it (one
    margin per sample for ElasticFace). With ``θ = acos(c)``:

    * ``0 ≤ θ + m ≤ π``: ``cos(θ + m) = c·cos m − sin θ·sin m`` with ``sin θ = sqrt((1 − c)(1 + c))``, whose
      derivative is kept finite at ``c = ±1`` (see ``_SinOfAcos``); the values are exact.
    * ``θ + m > π``: ``cos(θ + m)`` would turn back up and reward moving *away* from the class centre, so the
      InsightFace rule is used instead: ``c − m·sin m`` (their ``cos θ − sin(π − m)·m``, applied where
      ``cos θ ≤ cos(π − m)``), a CosFace-style penalty. The target stays decreasing in ``θ``: it falls to ``−1``
      as ``θ → π − m``, then continues from ``−cos m − m·sin m`` down to ``−1 − m·sin m`` at ``θ = π``. That
      restart is below ``−1`` only for ``m < 2.3311`` rad (where ``cos m + m·sin m = 1``); for larger margins
      the InsightFace rule itself would jump *up*, so the fallback is capped at ``−1``:
      ``min(c − m·sin m, −1)``, a no-op for every margin below 2.33 rad (133°).
    * ``θ + m < 0`` (only for a negative margin, e.g. an ElasticFace draw below zero): the angle is clipped at 0
      and the target is ``1``, since ``cos`` of a negative angle would again break monotonicity.

    ``m = 0`` gives ``c`` exactly.
    """
    m = torch.as_tensor(margin, dtype=cosines.dtype, device=cosines.device)
    cos_m, sin_m = torch.cos(m), torch.sin(m)
    phi = cosines * cos_m - _SinOfAcos.apply(cosines) * sin_m
    with torch.no_grad():
        angle = torch.acos(cosines) + m
        past_pi = angle > math.pi
        below_zero = angle < 0
    out = torch.where(past_pi, torch.clamp_max(cosines - m * sin_m, -1.0), phi)
    return torch.where(below_zero, torch.ones_like(out), out)


def _margin_cross_entropy(c: Tensor, y: Tensor, target_cosines: Tensor, scale: float, reduction: str) -> Tensor:
    """CE on ``scale·c`` with the target column of each row replaced by ``target_cosines`` (validated inputs)."""
    logits = c.scatter(1, y[:, None], target_cosines[:, None]) * scale
    return F.cross_entropy(logits, y, reduction=reduction)


def _target_column(c: Tensor, y: Tensor) -> Tensor:
    return c.gather(1, y[:, None]).squeeze(1)


def elastic_margins(
    target_cosines: Tensor,
    margin: float,
    std: float,
    *,
    plus: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ElasticFace's per-sample margins ``m_i ∼ N(margin, std)`` for a batch (Boutros et al. 2022).

    ``target_cosines`` is ``[m]``, each sample's cosine to its own class centre ``cos θ_{i,y_i}``; the result is
    ``[m]`` in its dtype (float32 for half precision) and on its device. ``margin + std·z`` with ``z`` standard
    normal, drawn in float64 from ``generator`` on the generator's device (torch's global RNG on the cosines'
    device when ``None``) and then cast and moved: the same generator state gives the same margins in every
    dtype, and a CPU generator the same margins on every device. ``std = 0`` gives exactly ``margin``.

    ``plus=True`` (ElasticFace+): the drawn margins are sorted and **assigned** by closeness to the class centre:
    the sample with the largest ``cos θ_{i,y_i}`` gets the smallest margin, the one with the smallest cosine the
    largest margin, i.e. ``assigned[order] = sorted_margins`` with ``order`` the samples by decreasing cosine (a
    scatter). The public code computes ``margins_sorted[order]`` (a gather), which gives sample ``i`` the margin
    of rank ``order[i]`` instead: wrong whenever the permutation is not its own inverse. Ties keep batch order.
    The drawn margins are constants (no gradient), and the ranking uses the detached cosines.
    """
    if not isinstance(target_cosines, Tensor) or not target_cosines.is_floating_point():
        got = target_cosines.dtype if isinstance(target_cosines, Tensor) else type(target_cosines).__name__
        raise TypeError(f"elastic_margins: target_cosines must be a floating-point tensor, got {got}")
    if target_cosines.dim() != 1:
        raise ValueError(
            f"elastic_margins: target_cosines must be 1-D [batch], got shape {tuple(target_cosines.shape)}"
        )
    margin = check_positive(margin, "margin", "elastic_margins", allow_zero=True)
    std = check_positive(std, "std", "elastic_margins", allow_zero=True)
    plus = _check_plus(plus, "elastic_margins")
    generator = _check_generator(generator, "elastic_margins")
    n, dtype, device = target_cosines.shape[0], target_cosines.dtype, target_cosines.device
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    draw_device = generator.device if generator is not None else device
    draw_dtype = torch.float32 if draw_device.type == "mps" else torch.float64  # mps has no float64
    z = torch.randn(n, generator=generator, device=draw_device, dtype=draw_dtype)
    margins = (margin + std * z).to(device=device, dtype=dtype)
    if not plus:
        return margins
    with torch.no_grad():
        order = torch.sort(target_cosines.detach(), descending=True, stable=True).indices
        assigned = torch.empty_like(margins)
        assigned[order] = torch.sort(margins, stable=True).values  # scatter: rank r goes to sample order[r]
    return assigned


def norm_softmax(cosines: Tensor, target: Tensor, scale: float = 64.0, reduction: str = "mean") -> Tensor:
    """Normalised softmax: cross-entropy on ``s·cos θ_ij`` (NormFace, Wang et al., ACM MM 2017).

    ``ℓ_i = −log softmax(s·c_i)[y_i]``, ``s = scale > 0``. Default ``s = 64``, the scale of the CosFace and ArcFace
    defaults, so that ``norm_softmax`` is exactly their ``m = 0`` member and comparisons with them isolate the
    margin. A fixed scale is needed because cosines are bounded: CosFace's lower bound
    ``s ≥ (C − 1)/C · log((C − 1)·P/(1 − P))`` for a target posterior ``P`` gives ~8 for 10 classes and ~18 for
    10⁵ classes at ``P = 0.999``, so 64 never limits the attainable posterior. (A global positive scale leaves
    every ranking, hence every SLC metric, unchanged; it only sets how soft the softmax is during training.)
    """
    scale = check_positive(scale, "scale", "norm_softmax")
    check_reduction(reduction, "norm_softmax")
    c = _check_cosines(cosines, "norm_softmax")
    y = check_target(target, c, "norm_softmax")
    return F.cross_entropy(c * scale, y, reduction=reduction)


def cosface(
    cosines: Tensor, target: Tensor, scale: float = 64.0, margin: float = 0.35, reduction: str = "mean"
) -> Tensor:
    """CosFace / large-margin cosine loss (Wang et al., CVPR 2018): CE on ``s·(cos θ_ij − m·1[j = y_i])``.

    Defaults ``s = 64``, ``m = 0.35``: the values of the CosFace paper's experiments (``m = 0.35`` was its best
    margin; AM-Softmax, the same loss, used ``s = 30``). ``margin >= 0``; ``m = 0`` is :func:`norm_softmax`.
    """
    scale = check_positive(scale, "scale", "cosface")
    margin = check_positive(margin, "margin", "cosface", allow_zero=True)
    check_reduction(reduction, "cosface")
    c = _check_cosines(cosines, "cosface")
    y = check_target(target, c, "cosface")
    m = torch.full((c.shape[0],), margin, dtype=c.dtype, device=c.device)
    return _margin_cross_entropy(c, y, _target_column(c, y) - m, scale, reduction)


def arcface(
    cosines: Tensor, target: Tensor, scale: float = 64.0, margin: float = 0.5, reduction: str = "mean"
) -> Tensor:
    """ArcFace / additive angular margin (Deng et al., CVPR 2019): CE on ``s·cos(θ_{i,y_i} + m)`` for the target
    and ``s·cos θ_ij`` for the other classes.

    The target cosine is :func:`arc_margin`: exact values; past ``θ + m > π`` the InsightFace fallback
    ``cos θ − m·sin m`` keeps it decreasing in ``θ``; its gradient is finite at ``cos θ = ±1`` (where the naive
    ``acos`` / ``sqrt(1 − cos²)`` have infinite slope). Defaults ``s = 64``, ``m = 0.5``: the ArcFace paper's
    settings. ``margin >= 0``; ``m = 0`` is :func:`norm_softmax`.
    """
    scale = check_positive(scale, "scale", "arcface")
    margin = check_positive(margin, "margin", "arcface", allow_zero=True)
    check_reduction(reduction, "arcface")
    c = _check_cosines(cosines, "arcface")
    y = check_target(target, c, "arcface")
    m = torch.full((c.shape[0],), margin, dtype=c.dtype, device=c.device)
    return _margin_cross_entropy(c, y, arc_margin(_target_column(c, y), m), scale, reduction)


def elasticface(
    cosines: Tensor,
    target: Tensor,
    scale: float = 64.0,
    margin: float | None = None,
    std: float | None = None,
    variant: str = "arc",
    plus: bool = False,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """ElasticFace (Boutros et al., CVPRW 2022): ArcFace (``variant="arc"``) or CosFace (``variant="cos"``) with the
    margin of each sample drawn from ``N(margin, std)`` at every call (:func:`elastic_margins`).

    ``plus=True`` is ElasticFace+: the sorted draws are assigned by closeness to the class centre (largest
    ``cos θ_{i,y_i}`` → smallest margin), as a scatter (the public code's gather puts them on the wrong samples).
    ``generator`` makes the draws reproducible. ``std = 0`` is exactly :func:`arcface` / :func:`cosface`.

    Defaults (``None``), from the paper and its official configuration: ``s = 64``; ``margin`` 0.5 (arc) / 0.35
    (cos); ``std`` 0.05 for ElasticFace-Arc and -Cos, 0.0175 for ElasticFace-Arc+ and 0.02 for ElasticFace-Cos+.
    Draws are not clipped (as in the paper); a negative arc margin clips the angle at 0 (:func:`arc_margin`).
    """
    scale = check_positive(scale, "scale", "elasticface")
    variant = _check_variant(variant, "elasticface")
    plus = _check_plus(plus, "elasticface")
    margin, std = _elastic_defaults(margin, std, variant, plus)
    generator = _check_generator(generator, "elasticface")
    check_reduction(reduction, "elasticface")
    c = _check_cosines(cosines, "elasticface")
    y = check_target(target, c, "elasticface")
    t = _target_column(c, y)
    m = elastic_margins(t, margin, std, plus=plus, generator=generator)
    new_target = arc_margin(t, m) if variant == "arc" else t - m
    return _margin_cross_entropy(c, y, new_target, scale, reduction)


# -------------------------------------------------------------------------------------------------- modules


@register("norm_softmax", pols_aligned=None, functional=norm_softmax, inputs="cosines")
class NormSoftmaxLoss(nn.Module):
    """Module form of :func:`norm_softmax`; called as ``loss(cosines, target)``."""

    def __init__(self, scale: float = 64.0, reduction: str = "mean") -> None:
        super().__init__()
        self.scale = check_positive(scale, "scale", "norm_softmax")
        self.reduction = check_reduction(reduction, "norm_softmax")

    def forward(self, cosines: Tensor, target: Tensor) -> Tensor:
        return norm_softmax(cosines, target, scale=self.scale, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


@register("cosface", pols_aligned=None, functional=cosface, inputs="cosines")
class CosFaceLoss(nn.Module):
    """Module form of :func:`cosface`; called as ``loss(cosines, target)``."""

    def __init__(self, scale: float = 64.0, margin: float = 0.35, reduction: str = "mean") -> None:
        super().__init__()
        self.scale = check_positive(scale, "scale", "cosface")
        self.margin = check_positive(margin, "margin", "cosface", allow_zero=True)
        self.reduction = check_reduction(reduction, "cosface")

    def forward(self, cosines: Tensor, target: Tensor) -> Tensor:
        return cosface(cosines, target, scale=self.scale, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


@register("arcface", pols_aligned=None, functional=arcface, inputs="cosines")
class ArcFaceLoss(nn.Module):
    """Module form of :func:`arcface`; called as ``loss(cosines, target)``."""

    def __init__(self, scale: float = 64.0, margin: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        self.scale = check_positive(scale, "scale", "arcface")
        self.margin = check_positive(margin, "margin", "arcface", allow_zero=True)
        self.reduction = check_reduction(reduction, "arcface")

    def forward(self, cosines: Tensor, target: Tensor) -> Tensor:
        return arcface(cosines, target, scale=self.scale, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


@register("elasticface", pols_aligned=None, functional=elasticface, inputs="cosines",
          global_batch=lambda loss: loss.plus or loss.std > 0)  # ranks the batch (+), or draws margins
class ElasticFaceLoss(nn.Module):
    """Module form of :func:`elasticface`; called as ``loss(cosines, target)``.

    ``margin`` and ``std`` left at ``None`` are resolved to the paper's defaults for ``variant`` and ``plus``
    at construction (see :func:`elasticface`). ``generator`` (kept as an attribute, not state) drives the draws.
    """

    def __init__(
        self,
        scale: float = 64.0,
        margin: float | None = None,
        std: float | None = None,
        variant: str = "arc",
        plus: bool = False,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.scale = check_positive(scale, "scale", "elasticface")
        self.variant = _check_variant(variant, "elasticface")
        self.plus = _check_plus(plus, "elasticface")
        self.margin, self.std = _elastic_defaults(margin, std, self.variant, self.plus)
        self.generator = _check_generator(generator, "elasticface")
        self.reduction = check_reduction(reduction, "elasticface")

    def forward(self, cosines: Tensor, target: Tensor) -> Tensor:
        return elasticface(
            cosines,
            target,
            scale=self.scale,
            margin=self.margin,
            std=self.std,
            variant=self.variant,
            plus=self.plus,
            generator=self.generator,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, margin={self.margin}, std={self.std}, variant={self.variant!r}, plus={self.plus}"
        )
