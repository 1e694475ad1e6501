"""smooth_topk_svm (Berrada, Zisserman & Kumar, ICLR 2018): value and gradient against references that share no
code with the implementation (subset enumeration for few classes, a log-space divide-and-conquer through autograd
for many), float32 stability over scales / temperatures / k / class counts, the hard fallback, the stable
backward (against the textbook subtraction recursion, implemented here), cross-entropy at k = 1, validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import logitsep.losses.topk as topk_module
from logitsep.losses.registry import LOSSES, get_loss
from logitsep.losses.topk import SmoothTopkSVMLoss, smooth_topk_svm

# ---- references (float64) --------------------------------------------------------------------------------


def brute_force(z: torch.Tensor, y: torch.Tensor, k: int, tau: float, alpha: float) -> torch.Tensor:
    """The defining formula, enumerating every k-subset of the classes (float64, autograd gives the gradient)."""
    n = z.shape[1]
    sets = torch.tensor(list(itertools.combinations(range(n), k)))  # [S, k]
    sums = z[:, sets].sum(-1) / (k * tau)  # [m, S]
    has_y = (sets[None] == y[:, None, None]).any(-1)  # [m, S]
    first = torch.logsumexp(sums + (alpha / tau) * (~has_y).to(sums.dtype), dim=1)
    second = torch.logsumexp(sums.masked_fill(~has_y, float("-inf")), dim=1)
    return tau * (first - second)


_ABSENT = -1e12  # log(0) for the log-space reference: exp(−1e12 − anything real) is exactly 0


def _log_poly_product(a: torch.Tensor, b: torch.Tensor, d_out: int) -> torch.Tensor:
    """``log Σ_i exp(a_i + b_{j−i})`` for ``j ≤ d_out``: log-coefficients of a product, ``[..., d + 1]`` each."""
    d = a.shape[-1] - 1
    b_pad = F.pad(b, (d, d_out + 1 - b.shape[-1]), value=_ABSENT)
    windows = b_pad.unfold(-1, d + 1, 1)[..., : d_out + 1, :]  # [j, q] = b[j + q − d]
    return torch.logsumexp(windows + a.flip(-1).unsqueeze(-2), dim=-1)


def log_esp_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """``log e_j(exp(x))``, ``j = 0..k``, per row: log-space divide-and-conquer (no frame, no linear space)."""
    m, n = x.shape
    size = 1 << (n - 1).bit_length()
    x = F.pad(x, (0, size - n), value=_ABSENT)
    poly = torch.stack([torch.zeros_like(x), x], dim=-1)
    while poly.shape[1] > 1:
        poly = _log_poly_product(poly[:, 0::2], poly[:, 1::2], min(2 * (poly.shape[-1] - 1), k))
    return poly[:, 0]


def log_space_reference(z: torch.Tensor, y: torch.Tensor, k: int, tau: float, alpha: float) -> torch.Tensor:
    """``τ·[logaddexp(α/τ + log e_k, x_y + log e_{k−1}) − x_y − log e_{k−1}]`` with ``x = z/(kτ)``, float64."""
    x = z / (k * tau)
    log_e = log_esp_reference(x.scatter(1, y[:, None], _ABSENT), k)
    with_y = x.gather(1, y[:, None]).squeeze(1) + log_e[:, k - 1]
    return tau * (torch.logaddexp(alpha / tau + log_e[:, k], with_y) - with_y)


def hard_hinge(z: torch.Tensor, y: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """``l_k = max(0, α + (u_[k] − z_y)/k)`` from sorted scores."""
    u = z.scatter(1, y[:, None], float("-inf"))
    u_k = u.sort(dim=1, descending=True).values[:, k - 1]
    return torch.clamp_min(alpha + (u_k - z.gather(1, y[:, None]).squeeze(1)) / k, 0.0)


def value_and_grad(fn, z: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    value = fn(z, *args, **kwargs)
    (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), grad


def ours(z: torch.Tensor, y: torch.Tensor, k: int, tau: float, alpha: float, **kwargs) -> torch.Tensor:
    return smooth_topk_svm(z, y, k=k, tau=tau, alpha=alpha, reduction="none", **kwargs)


def naive_gradient(z: torch.Tensor, y: torch.Tensor, k: int, tau: float, alpha: float) -> torch.Tensor:
    """The textbook gradient in the input's dtype: ``e_j`` by the forward recursion in linear space (scaled by
    the row maximum), the leave-one-out ``e_{j−1}(x∖i) = e_{j−1}(x) − x_i·e_{j−2}(x∖i)`` by subtraction, and
    ``∂L/∂z_i = σ(t)/k·(π_k(i) − π_{k−1}(i))``, ``π_j(i) = x_i·e_{j−1}(x∖i)/e_j(x)``, ``∂L/∂z_y = −σ(t)/k``."""
    m, n = z.shape
    u = z.scatter(1, y[:, None], float("-inf"))
    c = u.amax(dim=1, keepdim=True)
    x = torch.exp((u - c) / (k * tau))  # 0 at y
    e = [torch.ones(m, dtype=z.dtype)] + [torch.zeros(m, dtype=z.dtype) for _ in range(k)]
    for i in range(n):
        for j in range(k, 0, -1):
            e[j] = e[j] + x[:, i] * e[j - 1]
    loo = [torch.ones_like(x)]  # e_j(x∖i) for j = 0..k−1, every i at once
    for j in range(1, k):
        loo.append(e[j][:, None] - x * loo[j - 1])

    def inclusion(j: int) -> torch.Tensor:  # π_j(i)
        return torch.zeros_like(x) if j == 0 else x * loo[j - 1] / e[j][:, None]

    s_y = (z.gather(1, y[:, None]).squeeze(1) - c[:, 0]) / (k * tau)
    t = alpha / tau + torch.log(e[k]) - torch.log(e[k - 1]) - s_y
    sig = torch.sigmoid(t)[:, None]
    grad = sig / k * (inclusion(k) - inclusion(k - 1))
    return grad.scatter(1, y[:, None], -sig / k)


# ---- agreement with the enumeration, float64 -------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_matches_enumeration_float64(k, tau, alpha, gen):
    n = 9
    z = torch.randn(6, n, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, n, (6,), generator=gen)
    v_ref, g_ref = value_and_grad(brute_force, z, y, k, tau, alpha)
    for fallback in (False, True):
        v, g = value_and_grad(ours, z, y, k, tau, alpha, hard_fallback=fallback)
        torch.testing.assert_close(v, v_ref, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_log_space_reference_matches_enumeration(gen):
    """The many-class reference is itself checked against the enumeration."""
    z = torch.randn(4, 11, generator=gen, dtype=torch.float64) * 20
    y = torch.randint(0, 11, (4,), generator=gen)
    for k, tau in [(1, 0.3), (4, 1.0), (7, 0.05)]:
        v_ref, g_ref = value_and_grad(brute_force, z, y, k, tau, 0.7)
        v, g = value_and_grad(log_space_reference, z, y, k, tau, 0.7)
        torch.testing.assert_close(v, v_ref, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("window", [0, 1 << 30], ids=["loop-levels", "window-levels"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 9])
def test_both_level_forms_match_reference(window, k, gen, monkeypatch):
    """Both forms of a tree level (coefficient loop for big planes, sliding window for small) and both frames
    (small row range: frame at the row maximum; large: top-k split)."""
    monkeypatch.setattr(topk_module, "_WINDOW_MAX_PLANE", window)
    n = 37
    y = torch.randint(0, n, (5,), generator=gen)
    for scale in (0.5, 60.0):
        z = torch.randn(5, n, generator=gen, dtype=torch.float64) * scale
        v_ref, g_ref = value_and_grad(log_space_reference, z, y, k, 0.5, 1.0)
        v, g = value_and_grad(ours, z, y, k, 0.5, 1.0, hard_fallback=False)
        torch.testing.assert_close(v, v_ref, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


# ---- float32 over the grid of the issue ------------------------------------------------------------------

SCALES = [1e-4, 1e-2, 1.0, 30.0, 1e3]
TAUS = [0.01, 0.1, 1.0, 10.0]


@pytest.mark.parametrize("n_classes", ["few", 10_000])
@pytest.mark.parametrize("k", [1, 2, 5, 10, 20])
@pytest.mark.parametrize("scale", SCALES)
def test_float32_grid(n_classes, k, scale, gen):
    """No NaN/inf, value and gradient close to a float64 reference, for every τ in TAUS (a few rows each).

    Few classes: the enumeration; 10⁴ classes: the log-space reference. Tolerances: the float32 compute has
    relative error ~(k + log₂ n)·eps₃₂ on A (absolute on t, times τ on the value); gradient entries lie in
    [−1/k, 1/k]. The observed errors use about a third of these tolerances."""
    n = max(k + 3, 12) if n_classes == "few" else n_classes
    reference = brute_force if n_classes == "few" else log_space_reference
    rows = 3
    for tau in TAUS:
        z = (torch.randn(rows, n, generator=gen) * scale).float()
        y = torch.randint(0, n, (rows,), generator=gen)
        alpha = 1.0
        v, g = value_and_grad(ours, z, y, k, tau, alpha)
        assert v.dtype == torch.float32 and g.dtype == torch.float32
        assert torch.isfinite(v).all() and torch.isfinite(g).all(), (k, scale, tau)
        v_ref, g_ref = value_and_grad(reference, z.double(), y, k, tau, alpha)
        torch.testing.assert_close(v.double(), v_ref, rtol=1e-6, atol=5e-6 * tau, msg=f"tau={tau}")
        torch.testing.assert_close(g.double(), g_ref, rtol=2e-5, atol=3e-7, msg=f"tau={tau}")


def test_float32_extremes_finite(gen):
    """Scores in the thousands with τ = 0.01 (z/(kτ) ~ 10⁵, e^{Σ_T s} far beyond any float) and 10⁻⁴ with
    τ = 10 (all classes tied to 1e−7): finite, and the gradient of each row sums to 0 (shift invariance)."""
    for scale, tau in [(3e3, 0.01), (1e-4, 10.0)]:
        z = torch.randn(8, 500, generator=gen) * scale
        y = torch.randint(0, 500, (8,), generator=gen)
        for fallback in (False, True):
            v, g = value_and_grad(ours, z, y, 5, tau, 1.0, hard_fallback=fallback)
            assert torch.isfinite(v).all() and torch.isfinite(g).all()
            assert (v >= 0).all()
            torch.testing.assert_close(g.sum(1), torch.zeros(8), atol=1e-6, rtol=0)


# ---- the backward pass where the textbook recursion cancels ---------------------------------------------


def _dominated_row() -> tuple[torch.Tensor, torch.Tensor]:
    """One class far above the rest: e_1(x) = 1 + 4e−9 rounds to 1 in float32, so the subtraction
    e_1(x∖i) = e_1(x) − x_i loses every digit for the dominant class i."""
    z = torch.tensor([[0.0, -40.0, -40.5, -41.0, -42.0, -43.0]])
    return z, torch.tensor([3])


def test_naive_recursion_is_right_on_an_easy_case(gen):
    """Positive control: the test's naive gradient is correct where nothing cancels."""
    z = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (4,), generator=gen)
    for k in (1, 2, 3):
        _, g_ref = value_and_grad(brute_force, z, y, k, 1.0, 1.0)
        torch.testing.assert_close(naive_gradient(z.float(), y, k, 1.0, 1.0).double(), g_ref, rtol=1e-4, atol=1e-6)


def test_stable_backward_where_naive_recursion_cancels():
    z, y = _dominated_row()
    k, tau, alpha = 2, 1.0, 1.0
    _, g_ref = value_and_grad(brute_force, z.double(), y, k, tau, alpha)
    naive = naive_gradient(z, y, k, tau, alpha).double()
    naive_error = (naive - g_ref).abs().max().item()
    assert not math.isfinite(naive_error) or naive_error > 0.1, naive_error  # loses every digit
    for fallback in (False, True):
        v, g = value_and_grad(ours, z, y, k, tau, alpha, hard_fallback=fallback)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v.double(), brute_force(z.double(), y, k, tau, alpha), rtol=1e-6, atol=0)


def test_stable_backward_many_dominated_rows(gen):
    """Rows with a few classes 30–60 units above a long tail, k = 3, τ = 0.5, in float32: the naive gradient
    is far off on some row, ours matches the enumeration everywhere."""
    n, k, tau = 10, 3, 0.5
    z = torch.randn(32, n, generator=gen) * 0.3
    z[:, :2] += torch.rand(32, 2, generator=gen) * 30 + 30
    y = torch.randint(2, n, (32,), generator=gen)
    _, g_ref = value_and_grad(brute_force, z.double(), y, k, tau, 1.0)
    naive_error = (naive_gradient(z, y, k, tau, 1.0).double() - g_ref).abs().nan_to_num(math.inf).max().item()
    assert naive_error > 0.01
    _, g = value_and_grad(ours, z, y, k, tau, 1.0, hard_fallback=False)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)


# ---- hard fallback ---------------------------------------------------------------------------------------


class _Spy:
    """Records the rows that the hard-fallback test marks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.marked: list[torch.Tensor] = []
        original = topk_module._hard_rows

        def spy(*args, **kwargs):
            out = original(*args, **kwargs)
            self.marked.append(out.clone())
            return out

        monkeypatch.setattr(topk_module, "_hard_rows", spy)


def _separated_rows(gen: torch.Generator, m: int, n: int, gap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores on a grid ``gap`` apart (shuffled): every gap between consecutive scores is ``gap``."""
    z = torch.stack([torch.randperm(n, generator=gen).double() * gap for _ in range(m)])
    return z, torch.randint(0, n, (m,), generator=gen)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fallback_triggers_and_agrees_with_smooth_value(k, dtype, gen, monkeypatch):
    """Where it triggers, the fallback equals the float64 smooth value to τ·eps (plus rounding of the value),
    and so do the gradients; it does trigger on well-separated scores and does not on close ones."""
    spy = _Spy(monkeypatch)
    n, tau, alpha = 40, 0.05, 1.0
    eps = torch.finfo(dtype).eps
    # every gap (in units of kτ) above the documented thresholds, and |t| = |α/τ − j·gap/(kτ)| too for j ≠ 0
    gap = k * tau * (alpha / tau + math.log(k * n / eps) + 2)
    z, y = _separated_rows(gen, 16, n, gap)
    z = torch.cat([z, torch.randn(4, n, generator=gen, dtype=torch.float64) * 0.02])  # four close-call rows
    y = torch.cat([y, torch.randint(0, n, (4,), generator=gen)])
    z = z.to(dtype)
    v, g = value_and_grad(ours, z, y, k, tau, alpha)
    hard = spy.marked[-1]
    assert hard[:16].all() and not hard[16:].any()
    v_smooth, g_smooth = value_and_grad(ours, z.double(), y, k, tau, alpha, hard_fallback=False)
    torch.testing.assert_close(v.double(), v_smooth, rtol=4 * eps, atol=tau * eps)
    torch.testing.assert_close(g.double(), g_smooth, rtol=0, atol=4 * eps)
    # and it is the hard hinge and its subgradient exactly: two nonzero entries (or none) per row
    torch.testing.assert_close(v[:16], hard_hinge(z, y, k, alpha)[:16], rtol=0, atol=0)
    assert ((g[:16] != 0).sum(1) <= 2).all()
    assert ((g[16:] != 0).sum(1) > 2).all()


def test_fallback_also_in_moderately_separated_batches():
    """A batch whose range (48/(kτ) here) would allow the row-maximum frame still gets the test when a row can be
    hard: the hinge's gradient is exactly zero here (t < 0), the smooth one is ~e^{−24} but not zero."""
    z = torch.tensor([[0.0, -25.0, -45.0, -46.0, -47.0, -48.0]])
    y = torch.tensor([0])
    v, g = value_and_grad(ours, z, y, 1, 1.0, 1.0)
    assert v.item() == 0.0 and (g == 0).all()
    v, g = value_and_grad(ours, z, y, 1, 1.0, 1.0, hard_fallback=False)
    assert 0 < v.item() < 1e-9 and (g != 0).sum() >= 2


@pytest.mark.parametrize("margin", [-3.0, 3.0])
def test_fallback_threshold_is_tight(margin, monkeypatch):
    """The criterion is no looser than its bound: with the top-k gaps huge, ``exp(−|t|)`` decides. At
    ``exp(−|t|) = e^{3}·eps`` the row stays smooth and its value (the hinge is 0 there) exceeds τ·eps; at
    ``e^{−3}·eps`` it takes the hinge, and the smooth value is within τ·eps of it."""
    spy = _Spy(monkeypatch)
    k, tau, alpha, gap = 2, 0.05, 1.0, 10.0  # gap/(kτ) = 100: ρ_k, ρ_{k−1} ~ e^{−100}
    eps = torch.finfo(torch.float64).eps
    big_t = math.log(1 / eps) + margin  # t = −big_t: y is far above u_[k]
    z = torch.tensor([[0.0] + [-gap * j for j in range(1, 10)]], dtype=torch.float64)
    z[0, 0] = -2 * gap + k * tau * (alpha / tau + big_t)
    y = torch.tensor([0])
    v = ours(z, y, k, tau, alpha)
    smooth = ours(z, y, k, tau, alpha, hard_fallback=False)
    assert hard_hinge(z, y, k, alpha).item() == 0.0
    if margin < 0:
        assert not spy.marked[-1].any()
        assert v.item() > tau * eps
    else:
        assert spy.marked[-1].all()
        assert v.item() == 0.0 and smooth.item() <= tau * eps


def test_fallback_leaves_ordinary_rows_smooth(gen, monkeypatch):
    """Rows that are not separated keep the smooth value (up to the rounding of another frame)."""
    spy = _Spy(monkeypatch)
    z = torch.randn(16, 50, generator=gen)
    z[0, 0] = 500.0  # one far outlier: the batch takes the top-k frame, where the test runs
    y = torch.randint(1, 50, (16,), generator=gen)
    for tau in (0.1, 1.0):
        a = smooth_topk_svm(z, y, k=3, tau=tau, reduction="none")
        assert not spy.marked[-1][1:].any()
        b = smooth_topk_svm(z, y, k=3, tau=tau, reduction="none", hard_fallback=False)
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-6, atol=0)


# ---- gradcheck (float64) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("scale", [0.5, 40.0], ids=["row-max-frame", "top-k-frame"])
def test_gradcheck_smooth(k, scale, gen):
    z = (torch.randn(3, 8, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)
    y = torch.randint(0, 8, (3,), generator=gen)

    def fn(t):
        return smooth_topk_svm(t, y, k=k, tau=0.7, alpha=1.0, reduction="none", hard_fallback=False)

    assert torch.autograd.gradcheck(fn, (z,))


def test_gradcheck_with_fallback(gen, monkeypatch):
    """A batch mixing rows that take the hard hinge and rows that stay smooth."""
    spy = _Spy(monkeypatch)
    k, tau, n = 2, 0.05, 8
    z, y = _separated_rows(gen, 3, n, gap=k * tau * 60)
    z = torch.cat([z, torch.randn(2, n, generator=gen, dtype=torch.float64)]).requires_grad_(True)
    y = torch.cat([y, torch.randint(0, n, (2,), generator=gen)])

    def fn(t):
        return smooth_topk_svm(t, y, k=k, tau=tau, alpha=1.0, reduction="none")

    assert torch.autograd.gradcheck(fn, (z,))
    assert spy.marked[-1][:3].all() and not spy.marked[-1][3:].any()


# ---- cross-entropy, reductions, registry -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_k1_tau1_alpha0_is_cross_entropy(dtype, scale, gen):
    z = torch.randn(32, 20, generator=gen, dtype=dtype) * scale
    y = torch.randint(0, 20, (32,), generator=gen)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for reduction in ("mean", "sum", "none"):
        a = z.clone().requires_grad_(True)
        b = z.clone().requires_grad_(True)
        la = smooth_topk_svm(a, y, k=1, tau=1.0, alpha=0.0, reduction=reduction)
        lb = F.cross_entropy(b, y, reduction=reduction)
        torch.testing.assert_close(la, lb, **tol)
        (la.sum()).backward()
        (lb.sum()).backward()
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_not_cross_entropy_with_margin(gen):
    """Control: with α = 1 the value differs from CE (the comparison above can fail)."""
    z = torch.randn(8, 10, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    assert (smooth_topk_svm(z, y, k=1, tau=1.0, alpha=1.0) - F.cross_entropy(z, y)).abs() > 1e-3


def test_reductions(gen):
    z = torch.randn(7, 12, generator=gen)
    y = torch.randint(0, 12, (7,), generator=gen)
    per = smooth_topk_svm(z, y, k=3, reduction="none")
    assert per.shape == (7,)
    torch.testing.assert_close(smooth_topk_svm(z, y, k=3, reduction="mean"), per.mean())
    torch.testing.assert_close(smooth_topk_svm(z, y, k=3, reduction="sum"), per.sum())
    torch.testing.assert_close(per, brute_force(z.double(), y, 3, 1.0, 1.0).float(), rtol=1e-5, atol=1e-6)


def test_within_log_binomial_of_the_hard_hinge(gen):
    """``l_k − τ·log C(n−1, k−1) ≤ L ≤ l_k + τ·log C(n, k)`` and ``L → l_k`` as ``τ → 0``."""
    n, k = 10, 3
    z = torch.randn(20, n, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, n, (20,), generator=gen)
    hinge = hard_hinge(z, y, k, 1.0)
    for tau in (1.0, 0.1, 0.01):
        v = ours(z, y, k, tau, 1.0, hard_fallback=False)
        assert (v >= hinge - tau * math.log(math.comb(n - 1, k - 1)) - 1e-12).all()
        assert (v <= hinge + tau * math.log(math.comb(n, k)) + 1e-12).all()
    assert (ours(z, y, k, 1e-3, 1.0) - hinge).abs().max() < 0.05


def test_registry_and_module(gen):
    assert LOSSES["smooth_topk_svm"] is SmoothTopkSVMLoss
    loss_fn = get_loss("smooth_topk_svm", k=2, tau=0.5, alpha=1.0)
    assert loss_fn.pols_aligned is None and loss_fn.name == "smooth_topk_svm"
    assert (loss_fn.k, loss_fn.tau, loss_fn.alpha) == (2, 0.5, 1.0)
    default = get_loss("smooth_topk_svm")
    assert (default.k, default.tau, default.alpha, default.reduction) == (5, 1.0, 1.0, "mean")
    z = torch.randn(4, 9, generator=gen)
    y = torch.randint(0, 9, (4,), generator=gen)
    torch.testing.assert_close(loss_fn(z, y), smooth_topk_svm(z, y, k=2, tau=0.5, alpha=1.0))
    assert "k=2" in repr(loss_fn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_computed_in_float32(dtype, gen):
    z = (torch.randn(6, 30, generator=gen) * 4).to(dtype)
    y = torch.randint(0, 30, (6,), generator=gen)
    v, g = value_and_grad(ours, z, y, 4, 0.5, 1.0)
    assert v.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(v, ours(z.float(), y, 4, 0.5, 1.0))


def test_device(device, gen):
    z = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 40, (5,), generator=gen)
    v, g = value_and_grad(ours, z.to(device), y.to(device), 3, 0.3, 1.0)
    v_ref, g_ref = value_and_grad(log_space_reference, z, y, 3, 0.3, 1.0)
    torch.testing.assert_close(v.cpu(), v_ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-9, atol=1e-12)


# ---- validation ------------------------------------------------------------------------------------------

FORMS = ["functional", "module"]


def call(form: str, logits, target, **kwargs):
    if form == "functional":
        return smooth_topk_svm(logits, target, **kwargs)
    return get_loss("smooth_topk_svm", **kwargs)(logits, target)


@pytest.mark.parametrize("form", FORMS)
def test_k_out_of_range(form):
    z, y = torch.zeros(2, 5), torch.tensor([0, 1])
    for k in (5, 9):
        with pytest.raises(ValueError, match=rf"k={k} with n_classes=5"):
            call(form, z, y, k=k)
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        call(form, z, y, k=0)
    assert torch.isfinite(call(form, z, y, k=4))  # k = n_classes − 1 is allowed


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [2.0, True, "3"])
def test_k_not_int(form, bad):
    with pytest.raises(TypeError, match=r"k must be an int"):
        call(form, torch.zeros(2, 5), torch.tensor([0, 1]), k=bad)


@pytest.mark.parametrize("form", FORMS)
def test_tau_alpha_reduction(form):
    z, y = torch.zeros(2, 5), torch.tensor([0, 1])
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"tau must be finite and > 0"):
            call(form, z, y, k=2, tau=tau)
    for alpha in (-0.5, math.inf):
        with pytest.raises(ValueError, match=r"alpha must be finite and >= 0"):
            call(form, z, y, k=2, alpha=alpha)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        call(form, z, y, k=2, reduction="max")
    assert torch.isfinite(call(form, z, y, k=2, alpha=0.0))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits(form, bad):
    z = torch.randn(3, 6)
    z[1, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        call(form, z, torch.tensor([0, 1, 2]), k=2)


@pytest.mark.parametrize("form", FORMS)
def test_bad_logits_and_target(form):
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        call(form, torch.zeros(5), torch.tensor([0]), k=2)
    with pytest.raises(TypeError, match=r"floating-point"):
        call(form, torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1]), k=2)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 5\)"):
        call(form, torch.zeros(2, 5), torch.tensor([0, 5]), k=2)
    with pytest.raises(TypeError, match=r"integer tensor"):
        call(form, torch.zeros(2, 5), torch.tensor([0.0, 1.0]), k=2)


def test_huge_binomial_is_refused():
    with pytest.raises(ValueError, match=r"exceeds the float64 range.*k=300, n_classes=20000"):
        smooth_topk_svm(torch.zeros(1, 20000), torch.tensor([0]), k=300)
