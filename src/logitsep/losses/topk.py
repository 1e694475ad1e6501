"""Smooth top-k SVM (``smooth_topk_svm``) of Berrada, Zisserman & Kumar, "Smooth Loss Functions for Deep
Top-k Classification" (ICLR 2018).

For scores ``z`` (one row, ``n`` classes) and label ``y``, with ``𝒴_k`` the k-subsets of the classes::

    L(z, y) = τ·log Σ_{Ȳ∈𝒴_k} exp(α·1[y∉Ȳ]/τ + Σ_{j∈Ȳ} z_j/(kτ)) − τ·log Σ_{Ȳ∈𝒴_k, y∈Ȳ} exp(Σ_{j∈Ȳ} z_j/(kτ)).

It is the log-sum-exp smoothing (temperature ``τ``) of the top-k hinge, the paper's ``l_k`` with its ``1/k``::

    l_k(z, y) = max_Ȳ [α·1[y∉Ȳ] + (1/k)·Σ_Ȳ z] − max_{Ȳ∋y} [(1/k)·Σ_Ȳ z] = max(0, α + (u_[k] − z_y)/k),

``u = z`` without ``z_y`` and ``u_[k]`` its k-th largest entry. ``l_k − τ·log C(n−1, k−1) ≤ L ≤ l_k +
τ·log C(n, k)`` (a log-sum-exp is within ``τ·log(terms)`` of the max), so ``L → l_k`` as ``τ → 0``; and
``k = 1, τ = 1, α = 0`` is exactly cross-entropy.

Computation (never by enumerating the ``C(n, k)`` subsets). With ``e_j`` the elementary symmetric polynomial
of degree j of ``exp(z_j/(kτ))`` over the classes other than y, the sets that contain y sum to
``exp(z_y/(kτ))·e_{k−1}`` and the others to ``e_k``, so ``L = τ·softplus(α/τ + log e_k − log e_{k−1} − z_y/(kτ))``.
Work in a frame ``s_j = (z_j − c)/(kτ)`` (the loss is shift-invariant) with ``c = u_[k]``: the k largest
classes other than y, T, have ``s ≥ 0`` and all the others, R, ``s ≤ 0``. Since
``e_{k−q}(e^{s_T}) = e^{Σ_T s}·e_q(e^{−s_T})``::

    e_k = e^{Σ_T s}·A_k,  A_k = Σ_{q=0}^{k} f_q·g_q;   e_{k−1} = e^{Σ_T s}·A_{k−1},  A_{k−1} = Σ_{q=1}^{k} f_q·g_{q−1},

with ``f_q = e_q(e^{−s_T})`` and ``g_q = e_q(e^{s_R})``: elementary symmetric polynomials of numbers in
``[0, 1]``. So ``log e_k − log e_{k−1} = log A_k − log A_{k−1}``, with ``A_k ≥ 1``, ``A_{k−1} ≥ f_1 ≥ 1`` and every
number involved in ``[0, C(n−1, k)]``: nothing overflows, no log space is needed, and the huge common
factor ``e^{Σ_T s}`` (which overflows at ``s_j`` of a few hundred) cancels exactly. When every row's range
``(max z − min z)/(kτ)`` is small enough that no product of k numbers ``e^{s}`` can underflow (the usual
case in training, see :func:`_fast_spread_limit`), the frame ``c = max_j z_j`` with T empty does the same
job without the top-k search: ``A_k = g_k``, ``A_{k−1} = g_{k−1}``.

``f`` and ``g`` come from a divide-and-conquer over the polynomial ``Π_i (1 + x_i·X)`` truncated at degree k
(``⌈log₂ n⌉`` levels of pairwise products, vectorised over rows and pairs), whose every step adds products of
non-negative numbers: no cancellation, relative error ``O((k + log₂ n)·eps)``. The backward pass (a
hand-written ``autograd.Function``) is the reverse of the same tree: each level sends its adjoint down through
the other half's coefficients, products of non-negative numbers again, never the textbook subtraction
``e_{j−1}(x∖i) = e_{j−1}(x) − x_i·e_{j−2}(x∖i)`` (which cancels catastrophically when ``x_i`` dominates).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.checks import check_logits, check_positive, check_reduction, check_target
from .common import reduce
from .registry import register

NAME = "smooth_topk_svm"

# Largest log C(n − 1, k) computed in float32 (float64 beyond it, up to _MAX_LOG_BINOM). The polynomial
# coefficients are ≤ C(n − 1, k) ≤ e^60 ≈ 1e26, far from float32's 3e38, and partial products that underflow
# (< 1e−38) change A_k, A_{k−1} ≥ 1 by less than C(n − 1, k)·1e−38 < 1e−11 relative.
_FLOAT32_MAX_LOG_BINOM = 60.0
# The same two arguments in float64 (max 1.8e308, smallest normal 2.2e−308) with room to spare.
_MAX_LOG_BINOM = 650.0


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{NAME}: k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{NAME}: k must be >= 1, got k={k}")
    return k


# Levels whose coefficient planes hold at most this many numbers multiply with a few large operations on a
# sliding-window view (more arithmetic, far fewer Python-level calls); bigger ones loop over the coefficients.
_WINDOW_MAX_PLANE = 1 << 11


def _windows(planes: Tensor, count: int, width: int) -> Tensor:
    """Read-only view ``[count, width, ...]`` of a contiguous ``[p, ...]`` tensor: ``[a, b] = planes[a + b]``."""
    step = planes.stride(0)
    return planes.as_strided((count, width, *planes.shape[1:]), (step, step, *planes.stride()[1:]))


def _padded(size: int) -> int:
    """The number of leaves of the tree: a power of two, at least 4."""
    return 1 << max(2, (size - 1).bit_length())


def _leaf_stage(x: Tensor, k: int) -> Tensor:
    """``[e_0..e_min(4,k)]`` of the blocks ``{a, b, c, d}`` = the four quarters of ``x`` ``[m, 4Q]``: ``[d+1, m, Q]``.

    With ``p = a + b``, ``q = ab``, ``r = c + d``, ``t = cd``: ``e_1 = p + r``, ``e_2 = pr + q + t``,
    ``e_3 = qr + tp``, ``e_4 = qt`` (two tree levels in one pass, no zero padding).
    """
    quarter = x.shape[1] // 4
    a, b, c, d = x[:, :quarter], x[:, quarter : 2 * quarter], x[:, 2 * quarter : 3 * quarter], x[:, 3 * quarter :]
    poly = x.new_empty(min(4, k) + 1, x.shape[0], quarter)
    poly[0] = 1.0
    p, r = a + b, c + d
    torch.add(p, r, out=poly[1])
    if k >= 2:
        q, t = a * b, c * d
        torch.add(q, t, out=poly[2]).addcmul_(p, r)
    if k >= 3:
        torch.mul(q, r, out=poly[3]).addcmul_(t, p)
    if k >= 4:
        torch.mul(q, t, out=poly[4])
    return poly


def _leaf_stage_backward(x: Tensor, adj: Tensor, n: int) -> Tensor:
    """``x_i·∂/∂x_i`` of ``Σ_j adj_j·e_j`` through :func:`_leaf_stage` (``adj[0]`` unused), for the first ``n``
    columns of ``x``: a new contiguous ``[m, n]`` tensor (the gradient with respect to ``s = log x``).

    Written quarter by quarter straight into the result, with at most four ``[m, Q]`` temporaries alive.
    """
    quarter = x.shape[1] // 4
    a, b, c, d = x[:, :quarter], x[:, quarter : 2 * quarter], x[:, 2 * quarter : 3 * quarter], x[:, 3 * quarter :]
    widths = [max(0, min(quarter, n - i * quarter)) for i in range(4)]
    grad = x.new_empty(x.shape[0], n)
    degree = adj.shape[0] - 1

    def write(slot: int, adj_sum: Tensor, adj_prod: Tensor | None, partner: Tensor, own: Tensor) -> None:
        width = widths[slot]
        if width == 0:
            return
        out = grad[:, slot * quarter : slot * quarter + width]
        if adj_prod is None:  # e_1 only: ∂e_1/∂x = 1
            torch.mul(adj_sum[:, :width], own[:, :width], out=out)
        else:  # ∂/∂a = adj_p + adj_q·b
            torch.addcmul(adj_sum[:, :width], adj_prod[:, :width], partner[:, :width], out=out).mul_(own[:, :width])

    for (first, second), (other_first, other_second), slots in (((a, b), (c, d), (0, 1)), ((c, d), (a, b), (2, 3))):
        if degree == 1:
            adj_sum, adj_prod = adj[1], None
        else:  # adj of p = first + second and of q = first·second, given the other pair's r, t
            r = other_first + other_second
            adj_sum, adj_prod = torch.addcmul(adj[1], adj[2], r), adj[2]
            if degree >= 3:
                t = other_first * other_second
                adj_sum.addcmul_(adj[3], t)
                adj_prod = torch.addcmul(adj[2], adj[3], r)
                if degree >= 4:
                    adj_prod.addcmul_(adj[4], t)
        write(slots[0], adj_sum, adj_prod, second, first)
        write(slots[1], adj_sum, adj_prod, first, second)
    return grad


def _pair_level(poly: Tensor, k: int) -> Tensor:
    """One tree level: ``[d+1, m, 2h]`` → ``[d_out+1, m, h]``, block i times block ``h + i``, truncated at k."""
    d, half = poly.shape[0] - 1, poly.shape[2] // 2
    lo, hi = poly[:, :, :half], poly[:, :, half:]
    d_out = min(2 * d, k)
    if half * poly.shape[1] <= _WINDOW_MAX_PLANE:  # c_j = Σ_t lo_{d−t}·hi_{j+t−d}
        hi_ext = poly.new_zeros(d + d_out + 1, poly.shape[1], half)
        hi_ext[d : 2 * d + 1] = hi
        return (_windows(hi_ext, d_out + 1, d + 1) * lo.flip(0)).sum(1)
    out = poly.new_empty(d_out + 1, poly.shape[1], half)  # c_j = lo_j + hi_j + Σ_{i=1}^{j−1} lo_i·hi_{j−i}
    out[0] = 1.0
    torch.add(lo[1:], hi[1:], out=out[1 : d + 1])
    if d_out > d:  # the terms lo_d·hi_l are the first to reach c_{d+1}..c_{d_out}
        torch.mul(lo[d], hi[1 : 1 + d_out - d], out=out[d + 1 :])
    for i in range(1, min(d, d_out - 1) + 1 - (d_out > d)):
        width = min(d, d_out - i)
        out[i + 1 : i + 1 + width].addcmul_(lo[i], hi[1 : 1 + width])
    return out


def _pair_level_backward(poly: Tensor, adj: Tensor) -> Tensor:
    """Adjoint of :func:`_pair_level`'s input ``poly`` from the adjoint ``adj`` of its output (``adj[0]`` unused):
    ``adj_lo_i = Σ_l adj_{i+l}·hi_l``, ``adj_hi_l = Σ_i adj_{i+l}·lo_i``."""
    d, d_out, half = poly.shape[0] - 1, adj.shape[0] - 1, poly.shape[2] // 2
    lo, hi = poly[:, :, :half], poly[:, :, half:]
    if half * poly.shape[1] <= _WINDOW_MAX_PLANE:
        adj_ext = adj.new_zeros(2 * d + 1, poly.shape[1], half)
        adj_ext[1 : d_out + 1] = adj[1:]  # adj[0] stays out
        window = _windows(adj_ext, d + 1, d + 1)
        return torch.cat([(window * hi).sum(1), (window * lo[:, None]).sum(0)], dim=2)
    adj_poly = torch.empty_like(poly)
    adj_lo, adj_hi = adj_poly[:, :, :half], adj_poly[:, :, half:]
    first = min(d, d_out - 1)  # the coefficients that have a cross term lo_1·hi_l (adjoints of [0] are unused)
    if first > 0:
        torch.addcmul(adj[1 : 1 + first], hi[1], adj[2 : 2 + first], out=adj_lo[1 : 1 + first])
        torch.addcmul(adj[1 : 1 + first], lo[1], adj[2 : 2 + first], out=adj_hi[1 : 1 + first])
    if first < d:
        adj_lo[1 + first :].copy_(adj[1 + first : d + 1])
        adj_hi[1 + first :].copy_(adj[1 + first : d + 1])
    for i in range(2, min(d, d_out - 1) + 1):  # c_{i+l} ∋ lo_i·hi_l
        width = min(d, d_out - i)
        adj_lo[1 : 1 + width].addcmul_(hi[i], adj[i + 1 : i + 1 + width])
        adj_hi[1 : 1 + width].addcmul_(lo[i], adj[i + 1 : i + 1 + width])
    return adj_poly


def _esp_levels(x: Tensor, k: int) -> list[Tensor]:
    """Divide-and-conquer for ``e_0..e_k`` of the rows of a non-negative ``x`` ``[m, 2^L]`` (``L ≥ 2``).

    Returns the tree ``[x, level_2, level_3, ...]``: ``level_l`` ``[d_l + 1, m, 2^{L−l}]`` holds the
    coefficients ``0..d_l`` (``[0] = 1``) of the products over blocks of ``2^l`` elements, truncated at
    degree k (element order is irrelevant to symmetric polynomials, so blocks pair half with half);
    ``levels[-1][:, :, 0]`` is ``[e_0..e_k]`` ``[k + 1, m]``. Only sums of products of non-negative numbers.
    """
    levels = [x, _leaf_stage(x, k)]
    while levels[-1].shape[2] > 1:
        levels.append(_pair_level(levels[-1], k))
    return levels


def _esp_levels_backward(levels: list[Tensor], adj: Tensor, n: int) -> Tensor:
    """Reverse pass of :func:`_esp_levels`: from ``adj`` ``[k + 1, m, 1]``, the adjoint of ``e_0..e_k``
    (``adj[0]`` is ignored), to ``x_i·Σ_r adj_r·e_{r−1}(x∖i)`` for the first ``n`` elements: the gradient with
    respect to ``log x``, a new contiguous ``[m, n]`` tensor.

    The leave-one-out polynomials ``e_r(x∖i)`` are never formed by subtraction: each level sends its adjoint
    to both halves through the other half's non-negative coefficients. With ``adj ≥ 0`` every number is a
    sum of non-negative terms; in general the rounding error is ``O(eps·Σ|terms|)``.
    """
    for level in range(len(levels) - 1, 1, -1):
        adj = _pair_level_backward(levels[level - 1], adj)
    return _leaf_stage_backward(levels[0], adj, n)


class _LogRatio(torch.autograd.Function):
    """``(log A_k − log A_{k−1}, s_y, s_T, ρ_k)`` per row (see the module docstring), hand-written backward.

    Inputs: ``z`` ``[m, n]``, ``shift`` ``[m]`` (the frame's origin, no gradient), ``top`` ``[m, k]`` (the k
    largest classes other than y, in decreasing order, with ``shift = u_[k]``) or ``None`` (T empty, with
    ``shift ≥ max_j z_j``), ``y`` ``[m]``, ``kt = k·τ``, ``k`` and the compute dtype. Outputs in the
    compute dtype; ``s_T`` ``[m, k]`` (frame scores of ``top``; ``[m, 0]`` without) and
    ``ρ_k = e_1(R) = Σ_R e^{s}`` are not differentiable (they feed the hard-fallback test). Fusing the
    shift, scaling, exponentials and masking here saves the ``[m, n]`` temporaries (and their backward
    passes) that autograd would keep; the trees are the only saved state.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: Tensor, shift: Tensor, top: Tensor | None, y: Tensor, kt: float, k: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m, n = z.shape
        x = torch.empty(m, _padded(n), dtype=dtype, device=z.device)
        s = x[:, :n]
        torch.sub(z, shift[:, None], out=s)  # the frame
        s.div_(kt)
        s_y = s.gather(1, y[:, None]).squeeze(1)
        s_top = s.gather(1, top) if top is not None else s.new_empty(m, 0)
        s.exp_()
        s.scatter_(1, y[:, None], 0.0)  # R: every class but y (and the top k)
        if top is not None:
            s.scatter_(1, top, 0.0)
        x[:, n:] = 0.0
        levels_r = _esp_levels(x, k)
        g = levels_r[-1][:, :, 0]  # g_0..g_k: [k + 1, m]
        if top is None:
            levels_t, f = None, None
            a_k, a_km1 = g[k], g[k - 1]
        else:
            w = x.new_zeros(m, _padded(k))
            torch.exp(-s_top, out=w[:, :k])  # e^{−s_T} ∈ (0, 1]
            levels_t = _esp_levels(w, k)
            f = levels_t[-1][:, :, 0]  # f_0..f_k
            a_k, a_km1 = (f * g).sum(0), (f[1:] * g[:-1]).sum(0)
        ctx.trees = (levels_r, levels_t)
        ctx.save_for_backward(top, y, a_k, a_km1)
        ctx.kt, ctx.n, ctx.in_dtype = kt, n, z.dtype
        rho_k = g[1].clone()
        ctx.mark_non_differentiable(s_top, rho_k)
        return torch.log(a_k) - torch.log(a_km1), s_y, s_top, rho_k

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad_ratio: Tensor, grad_s_y: Tensor, _grad_s_top: Tensor, _grad_rho_k: Tensor
    ) -> tuple[Tensor, None, None, None, None, None, None]:
        levels_r, levels_t = ctx.trees
        top, y, a_k, a_km1 = ctx.saved_tensors
        n = ctx.n
        g = levels_r[-1][:, :, 0]
        k = g.shape[0] - 1
        d_ak, d_akm1 = grad_ratio / (a_k * ctx.kt), -grad_ratio / (a_km1 * ctx.kt)  # ds/dz = 1/(kτ) folded in
        if levels_t is None:  # A_k = g_k, A_{k−1} = g_{k−1}
            adj_g = g.new_zeros(k + 1, g.shape[1])
            adj_g[k], adj_g[k - 1] = d_ak, d_akm1
        else:  # A_k = Σ_{q≥0} f_q g_q,  A_{k−1} = Σ_{q≥1} f_q g_{q−1}
            f = levels_t[-1][:, :, 0]
            adj_g = f * d_ak
            adj_g[:-1].addcmul_(f[1:], d_akm1.expand(k, -1))
            adj_f = g * d_ak
            adj_f[1:].addcmul_(g[:-1], d_akm1.expand(k, -1))
        adj_s = _esp_levels_backward(levels_r, adj_g[:, :, None], n)  # 0 at the top k and y (x = 0 there)
        if levels_t is not None:  # d e^{−s}/ds = −e^{−s}
            adj_s.scatter_(1, top, _esp_levels_backward(levels_t, adj_f[:, :, None], k).neg_())
        adj_s.scatter_(1, y[:, None], (grad_s_y.to(adj_s.dtype) / ctx.kt)[:, None])
        return adj_s.to(ctx.in_dtype), None, None, None, None, None, None


def _compute_dtype(n: int, k: int, dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 (and half) input while ``C(n − 1, k) ≤ e^60``, else float64 (see the constants)."""
    log_binom = math.lgamma(n) - math.lgamma(k + 1) - math.lgamma(n - k)  # log C(n − 1, k)
    if log_binom > _MAX_LOG_BINOM:
        raise ValueError(
            f"{NAME}: C(n_classes − 1, k) = e^{log_binom:.0f} exceeds the float64 range of this implementation "
            f"(k={k}, n_classes={n}); use a smaller k"
        )
    if dtype == torch.float64 or log_binom > _FLOAT32_MAX_LOG_BINOM:
        return torch.float64
    return torch.float32


@torch.no_grad()
def _hard_rows(s_top: Tensor, rho_k: Tensor, s_y: Tensor, k: int, tau: float, alpha: float, eps: float) -> Tensor:
    """Rows where the smooth loss equals the hard hinge to float precision (see :func:`smooth_topk_svm`).

    ``s_top`` ``[m, k]``: frame scores of the k largest classes other than y, in decreasing order;
    ``rho_k = Σ_{rank > k} exp(s_j)``; ``s_y`` ``[m]``.
    """
    rho_k = rho_k.double()
    bound = k * rho_k
    if k > 1:  # ρ_{k−1} = exp(−s_[k−1])·(1 + ρ_k)
        bound = torch.maximum(bound, (k - 1) * torch.exp(-s_top[:, k - 2].double()) * (1.0 + rho_k))
    bound = bound + torch.exp(-(alpha / tau - s_y.double()).abs())
    return bound <= eps


def _fast_spread_limit(k: int, dtype: torch.dtype, eps: float, hard_fallback: bool) -> float:
    """Largest ``(max z − min z)/(kτ)`` of a batch computed without the top-k split (see :func:`smooth_topk_svm`).

    In the frame of the row maximum every ``e^{s_j}`` is at least ``e^{−spread}``, so every product of at most
    k of them is at least ``e^{−k·spread}``: above the smallest normal number (no underflow at all) while
    ``k·spread ≤ −log(tiny) − 10``. With the hard fallback on, ``spread < log(k/eps)`` also proves that no
    row is hard (``k·ρ_k ≥ k·e^{−spread} > eps``), so the test can be skipped.
    """
    limit = (-math.log(torch.finfo(dtype).tiny) - 10.0) / k
    return min(limit, math.log(k / eps)) if hard_fallback else limit


def smooth_topk_svm(
    logits: Tensor,
    target: Tensor,
    k: int = 5,
    tau: float = 1.0,
    alpha: float = 1.0,
    reduction: str = "mean",
    hard_fallback: bool = True,
) -> Tensor:
    """Smooth top-k SVM loss ``L_{k,τ}`` of Berrada, Zisserman & Kumar (ICLR 2018), per example::

        L = τ·log Σ_{Ȳ∈𝒴_k} exp(α·1[y∉Ȳ]/τ + Σ_{j∈Ȳ} z_j/(kτ)) − τ·log Σ_{Ȳ∋y} exp(Σ_{j∈Ȳ} z_j/(kτ))
          = τ·softplus(α/τ + log e_k − log e_{k−1} − z_y/(kτ)),

    ``𝒴_k`` the k-subsets of the classes, ``e_j`` the elementary symmetric polynomials of ``exp(z_j/(kτ))``
    over the classes ``j ≠ y`` (computed as in the module docstring, never by enumeration). Smooth in ``z``
    with dense gradients; ``→ l_k = max(0, α + (u_[k] − z_y)/k)`` (the top-k hinge, ``u = z∖z_y``) as
    ``τ → 0``.

    ``k`` (int, ``1 ≤ k < n_classes``): the top-k the loss targets. ``tau > 0``: temperature; small values
    approach the hinge, large values spread the gradient over all classes. ``alpha ≥ 0``: the margin.
    Defaults ``k = 5``, ``τ = 1``, ``α = 1``: the paper's experiments optimise top-5 error (CIFAR-100,
    ImageNet); ``α = 1`` is the unit margin of the multiclass SVM that ``l_k`` generalises (as in
    ``max_margin``); ``τ = 1`` is the temperature at which ``k = 1`` is the softmax cross-entropy
    (``k = 1, τ = 1, α = 0`` equals ``ce`` exactly). The default ``k`` needs more than 5 classes.

    Precision: computed in float32 for float32/float16/bfloat16 input while ``C(n−1, k) ≤ e^60`` (e.g.
    1000 classes with k ≤ 10), in float64 otherwise; the result has the input's dtype (float32 for half).
    Relative error of the value and of the gradient entries ``O((k + log₂ n)·eps)`` of the compute dtype, at
    any scale of ``z`` and any ``τ`` (no overflow, no cancellation; see the module docstring). Raises
    ``ValueError`` where ``C(n−1, k) > e^650`` (k of several dozen with 10⁵ classes and more).

    Hard fallback (``hard_fallback=True``, as Berrada et al. do for samples with a large top-k margin). In the
    frame ``s_j = (z_j − u_[k])/(kτ)``, let ``ρ_k = Σ_{j of rank > k} exp(s_j)`` (ranks among the classes
    other than y; computed exactly, it is ``g_1``), ``ρ_{k−1} = exp(−s_[k−1])·(1 + ρ_k)`` (absent for k = 1)
    and ``t = α/τ − s_y`` (so that ``l_k = τ·max(0, t)``). Exactly, ``L = τ·softplus(t + log(1 + r_k) −
    log(1 + r_{k−1}))``, where ``log(1 + r_j)``, the log of ``e_j`` over its largest term, lies in
    ``[0, j·ρ_j]``: every other j-subset swaps ``r ≥ 1`` of the top j for lower classes, and these sum to at
    most ``Σ_r C(j, r)·ρ_j^r/r! ≤ e^{jρ_j} − 1``. As ``softplus`` is 1-Lipschitz and
    ``softplus(t) − max(0, t) ≤ e^{−|t|}``, ``|L − l_k| ≤ τ·B`` with::

        B = max(k·ρ_k, (k−1)·ρ_{k−1}) + exp(−|t|),

    and the gradients differ by ``O(B)`` as well. A sample takes the hard hinge ``l_k`` and its subgradient
    (``+1/k`` on ``u_[k]`` and ``−1/k`` on ``z_y`` when ``t > 0``, zero otherwise) iff ``B ≤ eps``, the machine
    epsilon of the result's dtype: the smooth value is then the hard one to within ``τ·eps``. In words
    (``ρ_k ≤ (n−1−k)·exp(−gap/(kτ))``): it triggers once the gap between the k-th and (k+1)-th largest of
    ``u`` exceeds ``kτ·log(k(n−1−k)/eps)``, the gap between the (k−1)-th and k-th exceeds about
    ``kτ·log(k/eps)``, and ``|α − (z_y − u_[k])/k| ≥ τ·log(2/eps)``; it never triggers in a batch whose rows
    all have ``(max z − min z)/(kτ) < log(k/eps)`` and ``n > k + 1`` (then ``k·ρ_k ≥ k·e^{−range} > eps``).
    The smooth value is computed for every row (the same cost, one code path) and replaced on the rows that
    pass; ``hard_fallback=False`` keeps the smooth value everywhere.
    """
    tau = check_positive(tau, "tau", NAME)
    alpha = check_positive(alpha, "alpha", NAME, allow_zero=True)
    k = _check_k(k)
    check_reduction(reduction, NAME)
    z = check_logits(logits, NAME, finite=False)
    with torch.no_grad():
        row_max, row_min = z.amax(dim=1), z.amin(dim=1)  # NaN propagates through both
        if not (bool(torch.isfinite(row_max).all()) and bool(torch.isfinite(row_min).all())):
            raise ValueError(f"{NAME}: logits contains NaN or infinite values; the loss is not defined there")
    y = check_target(target, z, NAME)
    n = z.shape[1]
    if k >= n:
        raise ValueError(f"{NAME}: k must satisfy 1 <= k < n_classes, got k={k} with n_classes={n}")
    dtype = _compute_dtype(n, k, z.dtype)
    eps = torch.finfo(z.dtype).eps

    with torch.no_grad():
        spread = float((row_max - row_min).amax()) / (k * tau)
    if n - 1 > k and spread < _fast_spread_limit(k, dtype, eps, hard_fallback):
        # every e^{s_j} in [e^{−spread}, 1] in the frame of the row maximum: no top-k split needed
        log_ratio, s_y, _, _ = _LogRatio.apply(z, row_max.to(dtype), None, y, k * tau, k, dtype)
        t = alpha / tau + log_ratio - s_y
        return reduce((tau * torch.logaddexp(t, torch.zeros_like(t))).to(z.dtype), reduction)

    with torch.no_grad():  # the k largest of u = z∖z_y, in decreasing order; u_[k] is the frame's origin
        top = z.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices
        shift = z.gather(1, top[:, k - 1 :]).squeeze(1).to(dtype)
    log_ratio, s_y, s_top, rho_k = _LogRatio.apply(z, shift, top, y, k * tau, k, dtype)
    t = alpha / tau + log_ratio - s_y
    per_example = (tau * torch.logaddexp(t, torch.zeros_like(t))).to(z.dtype)
    if hard_fallback:
        hard = _hard_rows(s_top, rho_k, s_y.detach(), k, tau, alpha, eps)
        if bool(hard.any()):
            z_y = z.gather(1, y[:, None]).squeeze(1)
            u_k = z.gather(1, top[:, k - 1 :]).squeeze(1)
            per_example = torch.where(hard, torch.clamp_min(alpha + (u_k - z_y) / k, 0.0), per_example)
    return reduce(per_example, reduction)


@register(NAME, pols_aligned=None, functional=smooth_topk_svm)
class SmoothTopkSVMLoss(nn.Module):
    """Module form of :func:`smooth_topk_svm`. PoLS alignment not established (``pols_aligned = None``)."""

    def __init__(
        self,
        k: int = 5,
        tau: float = 1.0,
        alpha: float = 1.0,
        reduction: str = "mean",
        hard_fallback: bool = True,
    ) -> None:
        super().__init__()
        self.k = _check_k(k)
        self.tau = check_positive(tau, "tau", NAME)
        self.alpha = check_positive(alpha, "alpha", NAME, allow_zero=True)
        self.reduction = check_reduction(reduction, NAME)
        self.hard_fallback = bool(hard_fallback)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return smooth_topk_svm(
            logits,
            target,
            k=self.k,
            tau=self.tau,
            alpha=self.alpha,
            reduction=self.reduction,
            hard_fallback=self.hard_fallback,
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, tau={self.tau}, alpha={self.alpha}, hard_fallback={self.hard_fallback}"
