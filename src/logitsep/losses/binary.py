"""Binary losses over every class: binary cross-entropy (``bce``) and noise-contrastive estimation (``nce``).

Paper Sections IV-B and IV-C (Keren, Sabato & Schuller, ICDM 2018); NCE as in Mnih & Teh (ICML 2012).
Both accept class indices ``[m]`` or a multi-label 0/1 matrix ``[m, k]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_logits, check_positive, check_reduction, check_target
from . import _fused
from .common import reduce, sum_at_positives
from .registry import register


class _BceRows(torch.autograd.Function):
    """``out_i = Σ_{j≠y_i} softplus(z_ij) + softplus(−z_{i,y_i})``: bce for class indices in one autograd node.

    The target's term is written over its entry of the softplus tensor (``m`` entries) before the row sum, and its
    gradient ``−σ(−z_y)`` over its entry of the gradient: computing ``Σ_j softplus(z_ij) − z_y`` and ``σ(z_y) − 1``
    instead cancels catastrophically once ``z_y ≫ 0`` (every digit is lost past z_y ≈ 17 in float32), which is
    exactly where well-separated, PoLS-aligned logits live. The backward is one sigmoid, an in-place scaling and
    an in-place write of ``m`` entries; composed of torch ops instead, the softplus backward recomputes an
    exponential, and the target term's gradient is scattered into a fresh ``[m, k]`` tensor and added. On a
    contiguous float32 CPU tensor, the row sum and the scaled sigmoid are each one pass of the fused kernels of
    :mod:`._fused` (the target's column skipped in the sum), where torch takes three."""

    @staticmethod
    def forward(ctx, z: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z, y)
        index = y[:, None]
        target_term = F.softplus(-z.gather(1, index))
        if _fused.applies(z):  # one pass over z, the target's column skipped (see _fused)
            return _fused.softplus_row_sums(z, 0.0, y).add_(target_term.squeeze(1))
        softplus = F.softplus(z)
        softplus.scatter_(1, index, target_term)
        return softplus.sum(dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        z, y = ctx.saved_tensors
        index, g = y[:, None], grad_out[:, None]
        grad = _fused.scaled_sigmoid(z, grad_out) if _fused.applies(z) else torch.sigmoid(z).mul_(g)
        return grad.scatter_(1, index, torch.sigmoid(-z.gather(1, index)).neg_().mul_(g)), None


class _SoftplusRows(torch.autograd.Function):
    """``out_i = Σ_j w_j·softplus(z_ij − c_j)``, plus ``softplus(c_{y_i} − z_{i,y_i})`` when class indices ``y`` are
    given (the two terms of exact ``nce``); ``c`` and ``w`` are numbers (uniform noise) or ``[k]`` tensors. The
    backward ``w_j·σ(z_ij − c_j)``, minus ``σ(c_y − z_y)`` at ``(i, y_i)``, is one sigmoid, in-place scalings and an
    in-place update of ``m`` entries (see :class:`_BceRows` for why this is one node). With numbers ``c`` and ``w``
    on a float32 CPU tensor, the fused kernels of :mod:`._fused` shift, sum and differentiate in one pass each, and
    no shifted ``[m, k]`` copy is kept for the backward."""

    @staticmethod
    def forward(ctx, z: Tensor, c: Tensor | float, w: Tensor | float,  # type: ignore[override]
                y: Tensor | None) -> Tensor:
        # numbers c and w on a float32 CPU tensor: the fused kernel shifts z itself, nothing [m, k] is stored
        fused = not isinstance(c, Tensor) and not isinstance(w, Tensor) and _fused.applies(z)
        if fused:
            shifted = z
            out = _fused.softplus_row_sums(z, float(c)).mul_(w)
        else:
            shifted = z - c if isinstance(c, Tensor) or c != 0 else z
            softplus = F.softplus(shifted)
            out = softplus @ w if isinstance(w, Tensor) else softplus.sum(dim=1).mul_(w)
        slope = None
        if y is not None:  # softplus(c_y − z_y), whose slope in z_y is −σ(c_y − z_y)
            margin = (c[y] if isinstance(c, Tensor) else c) - z.gather(1, y[:, None]).squeeze(1)
            out = out + F.softplus(margin)
            slope = torch.sigmoid(margin).neg_()
        ctx.save_for_backward(shifted, y, w if isinstance(w, Tensor) else None, slope)
        ctx.scalar_w = None if isinstance(w, Tensor) else w
        ctx.fused_shift = float(c) if fused else None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        shifted, y, w, slope = ctx.saved_tensors
        if ctx.fused_shift is not None:  # shifted is z itself here
            grad = _fused.scaled_sigmoid(shifted, grad_out * ctx.scalar_w, ctx.fused_shift)
        elif w is not None:
            grad = torch.sigmoid(shifted).mul_(w).mul_(grad_out[:, None])
        else:
            grad = torch.sigmoid(shifted).mul_((grad_out * ctx.scalar_w)[:, None])
        if y is not None:
            grad.scatter_add_(1, y[:, None], (slope * grad_out)[:, None])
        return grad, None, None, None


def binary_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy summed over classes, ``ℓ(z, r) = −Σ_j [r_j log σ(z_j) + (1−r_j) log(1−σ(z_j))]``.

    With class indices ``r_j = 1[j = y]`` (paper Sec. IV-C). Computed as ``softplus(−z)`` at positives and
    ``softplus(z)`` at negatives. PoLS-aligned (paper, Appendix C).
    """
    check_reduction(reduction, "bce")
    z = check_logits(logits, "bce")
    target = check_target(target, z, "bce", multilabel=True)
    # softplus(−z) at positives and softplus(z) at negatives, each term computed as such: the shorter
    # Σ_j softplus(z_j) − Σ_{l∈P} z_l cancels catastrophically when the positives' logits are large.
    if target.dim() == 1:
        per_row = _BceRows.apply(z, target)
    else:
        per_row = _SoftplusRows.apply(torch.where(target, -z, z), 0.0, 1.0, None)
    return reduce(per_row, reduction)


def check_noise(noise: Tensor | None, k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The noise distribution ``q`` as a float64-checked probability vector of length ``k`` (uniform if None),
    returned in ``dtype`` (the logits' compute dtype, so float64 logits get a float64 ``q``)."""
    if noise is None:
        return torch.full((k,), 1.0 / k, dtype=dtype, device=device)
    if not isinstance(noise, Tensor):
        raise TypeError(f"nce: noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"nce: noise must be a floating-point probability vector, got dtype {noise.dtype}")
    if noise.dim() != 1 or noise.shape[0] != k:
        raise ValueError(f"nce: noise must be a probability vector of length {k}, got shape {tuple(noise.shape)}")
    q = noise.detach().double()
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise ValueError("nce: noise must have finite, non-negative entries")
    total = float(q.sum())
    # A half-precision vector (e.g. the module's buffer after ``.half()``) only sums to 1 within its own eps.
    if abs(total - 1.0) > max(1e-4, torch.finfo(noise.dtype).eps):
        raise ValueError(f"nce: noise must sum to 1, got {total:.6g}")
    return (q / total).to(dtype).to(device)


def _log_tq(q: Tensor, num_noise: float, dtype: torch.dtype) -> Tensor:
    """``log(t·q_j)``, with ``q_j = 0`` clamped to the smallest normal number (such a class is never noise: its
    weight ``q_j`` is 0, and the clamp keeps every term finite)."""
    return math.log(num_noise) + torch.log(q.clamp_min(torch.finfo(dtype).tiny))


def nce(
    logits: Tensor,
    target: Tensor,
    num_noise: float = 25,
    noise: Tensor | None = None,
    sampled: bool = False,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Noise-contrastive estimation (Mnih & Teh 2012; paper Eq. 3).

    ``ℓ(z, y) = −log g_y − t·E_{j∼q} log(1 − g_j)``,  ``g_j = σ(z_j − log(t·q_j))``, ``t = num_noise``.

    ``sampled=False`` (default) computes the expectation exactly over all k classes; ``sampled=True`` draws
    ``t`` classes from ``q`` per example (with replacement) and sums their terms: an unbiased estimate of
    the exact value. For a multi-label row with positives ``P`` every positive is one data sample with its
    own ``t`` noise samples: ``−Σ_{l∈P} log g_l − |P|·t·E_q log(1 − g_j)`` (equal to the above for |P| = 1).
    PoLS-aligned (paper, Appendix B). ``t = 25`` follows Mnih & Teh.
    """
    num_noise = check_positive(num_noise, "num_noise", "nce")
    check_reduction(reduction, "nce")
    z = check_logits(logits, "nce")
    m, k = z.shape
    target = check_target(target, z, "nce", multilabel=True)
    if target.dim() == 2:
        n_pos = target.sum(dim=1)
        if bool((n_pos == 0).any()):
            raise ValueError("nce: every row of a multi-label target needs at least one positive")
    else:
        if not sampled:  # one fused pass: t·Σ_j q_j·softplus(z_j − log(t·q_j)) + softplus(log(t·q_y) − z_y)
            if noise is None:  # uniform q: the shift log(t/k) and the weight t/k are numbers
                shift, weight = math.log(num_noise / k), num_noise / k
            else:
                q = check_noise(noise, k, z.device, z.dtype)
                shift, weight = _log_tq(q, num_noise, z.dtype), num_noise * q
            return reduce(_SoftplusRows.apply(z, shift, weight, target), reduction)
        n_pos = torch.ones(m, dtype=z.dtype, device=z.device)
    q = check_noise(noise, k, z.device, z.dtype)
    # log(t·q_j); classes with q_j = 0 never appear as noise and have g_j = 1 (kept finite, masked below).
    log_tq = _log_tq(q, num_noise, z.dtype)
    # s = z − log(t·q) is the logit of g, finite everywhere thanks to the clamp in _log_tq.
    # −Σ_{l∈P} log g_l = Σ_{l∈P} softplus(−s_l): gathered first for class indices (no full-size temporary).
    if target.dim() == 1:
        data_term = F.softplus(log_tq[target] - z.gather(1, target[:, None]).squeeze(1))
    else:
        data_term = sum_at_positives(F.softplus(log_tq - z), target)
    if not sampled:
        # −t·E_q log(1 − g_j) = t·Σ_j q_j·softplus(s_j); a class with q_j = 0 adds 0·(finite) = 0.
        noise_term = num_noise * _SoftplusRows.apply(z, log_tq, q, None)
    else:
        if num_noise != int(num_noise):
            raise ValueError(f"nce: sampled=True draws num_noise classes; it must be an integer, got {num_noise}")
        t = int(num_noise)
        draw_device = generator.device if generator is not None else q.device
        draws = torch.multinomial(q.float().to(draw_device), m * t, replacement=True, generator=generator)
        draws = draws.view(m, t).to(z.device)
        noise_term = F.softplus(z.gather(1, draws) - log_tq[draws]).sum(dim=1)
    return reduce(data_term + n_pos.to(z.dtype) * noise_term, reduction)


@register("bce", pols_aligned=True, functional=binary_cross_entropy, multilabel=True)
class BinaryCrossEntropyLoss(nn.Module):
    """Module form of :func:`binary_cross_entropy`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction, "bce")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(logits, target, reduction=self.reduction)


@register("nce", pols_aligned=True, functional=nce, multilabel=True,
          global_batch=lambda loss: loss.sampled)  # sampled NCE draws noise classes for every example
class NCELoss(nn.Module):
    """Module form of :func:`nce`. ``noise`` is a buffer, so it follows ``.to(device)`` and the state dict
    (``.half()`` casts it too: very small probabilities may round to 0 there; keep the loss in float32)."""

    def __init__(
        self,
        num_noise: float = 25,
        noise: Tensor | None = None,
        sampled: bool = False,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.num_noise = check_positive(num_noise, "num_noise", "nce")
        if noise is not None:  # fail at construction, not at the first batch
            if not isinstance(noise, Tensor):
                raise TypeError(f"nce: noise must be a torch.Tensor or None, got {type(noise).__name__}")
            if noise.dim() != 1:
                shape = tuple(noise.shape)
                raise ValueError(f"nce: noise must be a probability vector of length k (1-D), got shape {shape}")
            check_noise(noise, noise.shape[0], noise.device)
        self.register_buffer("noise", None if noise is None else noise.detach().clone())
        self.sampled = bool(sampled)
        self.generator = generator
        self.reduction = check_reduction(reduction, "nce")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return nce(logits, target, num_noise=self.num_noise, noise=self.noise, sampled=self.sampled,
                   generator=self.generator, reduction=self.reduction)

    def extra_repr(self) -> str:
        noise = "uniform" if self.noise is None else "custom"
        return f"num_noise={self.num_noise}, sampled={self.sampled}, noise={noise}"
