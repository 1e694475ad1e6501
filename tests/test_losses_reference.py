"""Every loss against slow, obviously-correct references written differently from the library.

Two kinds of reference, neither sharing code with ``logitsep.losses``:
- ``ref_*``: Python loops over rows and classes on plain floats (float64), with ``math.log``/``math.exp``;
  they give the values.
- ``tref_*``: naive float64 torch re-implementations (explicit ``exp``/``log``, per-row loops, no
  logsumexp/softplus/log_softmax); autograd through them gives the reference gradients.

Also: gradcheck in float64, dtype (float32/float64/bfloat16/float16) and device parametrisation, the
authors' 1e-6 trap in batch cross-entropy, and sampled NCE against the exact expectation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from logitsep.losses import (
    batch_cross_entropy,
    batch_max_margin,
    binary_cross_entropy,
    cross_entropy,
    decoupled_softmax,
    max_margin,
    nce,
    self_normalization,
    z_loss,
)
from logitsep.losses.spherical import z_score

# --------------------------------------------------------------------------------------------------------
# Plain-float references (values).
# --------------------------------------------------------------------------------------------------------


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _log_sigmoid(x: float) -> float:
    """log σ(x) without overflow on either side."""
    if x >= 0:
        return -math.log1p(math.exp(-x))
    return x - math.log1p(math.exp(x))


def _softplus(x: float) -> float:
    return -_log_sigmoid(-x)  # log(1 + e^x)


def ref_ce(z, y):
    return [_lse(row) - row[c] for row, c in zip(z, y, strict=True)]


def ref_max_margin(z, y, margin=1.0):
    out = []
    for row, c in zip(z, y, strict=True):
        best_false = -math.inf
        for j, v in enumerate(row):
            if j != c and v > best_false:
                best_false = v
        out.append(max(0.0, margin - row[c] + best_false))
    return out


def ref_self_norm(z, y, alpha=0.1):
    out = []
    for row, c in zip(z, y, strict=True):
        log_norm = _lse(row)
        out.append(log_norm - row[c] + alpha * log_norm * log_norm)
    return out


def ref_nce(z, y, num_noise=25, noise=None):
    """−log g_y − t·Σ_j q_j log(1 − g_j), g_j = σ(z_j − log(t·q_j)); classes with q_j = 0 have g_j = 1."""
    k = len(z[0])
    q = [1.0 / k] * k if noise is None else list(noise)
    t = float(num_noise)
    out = []
    for row, c in zip(z, y, strict=True):
        data = -_log_sigmoid(row[c] - math.log(t * q[c])) if q[c] > 0 else 0.0
        noise_part = 0.0
        for j in range(k):
            if q[j] > 0:
                noise_part -= t * q[j] * _log_sigmoid(-(row[j] - math.log(t * q[j])))
        out.append(data + noise_part)
    return out


def ref_bce(z, y):
    out = []
    for row, c in zip(z, y, strict=True):
        total = 0.0
        for j, v in enumerate(row):
            total -= _log_sigmoid(v) if j == c else _log_sigmoid(-v)
        out.append(total)
    return out


def ref_batch_ce_rows(z, y):
    """Per row: −log m − log Q_B(i, y_i), Q_B the softmax over all m·k logits; their mean is the KL."""
    flat = [v for row in z for v in row]
    log_total = _lse(flat)
    m = len(z)
    return [-(row[c] - log_total) - math.log(m) for row, c in zip(z, y, strict=True)]


def ref_batch_max_margin(z, y, margin=1.0):
    """The batch value ("mean"): (1/m)·max(0, γ − z₊ + z₋) + mean_i hinge_i, found by loops."""
    m = len(z)
    z_plus = math.inf
    z_minus = -math.inf
    for row, c in zip(z, y, strict=True):
        if row[c] < z_plus:
            z_plus = row[c]
        for j, v in enumerate(row):
            if j != c and v > z_minus:
                z_minus = v
    hinges = ref_max_margin(z, y, margin)
    return max(0.0, margin - z_plus + z_minus) / m + sum(hinges) / m


def ref_z_loss(z, y, a=1.0, b=2.0):
    out = []
    for row, c in zip(z, y, strict=True):
        k = len(row)
        mu = sum(row) / k
        sd = math.sqrt(sum((v - mu) ** 2 for v in row) / k)  # population std: divide by k
        zhat = (row[c] - mu) / sd
        out.append(_softplus(a * (b - zhat)) / a)
    return out


def ref_decoupled(z, positives):
    """positives: one collection of class indices per row."""
    out = []
    for row, pos in zip(z, positives, strict=True):
        pos = set(pos)
        negatives = [v for j, v in enumerate(row) if j not in pos]
        terms = [row[l] - _lse([row[l], *negatives]) for l in sorted(pos)]
        out.append(-sum(terms) / len(terms))
    return out


# --------------------------------------------------------------------------------------------------------
# Naive float64 torch references (gradients by autograd).
# --------------------------------------------------------------------------------------------------------


def _others(z, i, c):
    return torch.stack([z[i, j] for j in range(z.shape[1]) if j != c])


def tref_ce(z, y):
    rows = []
    for i, c in enumerate(y):
        e = torch.exp(z[i])
        rows.append(-torch.log(e[c] / e.sum()))
    return torch.stack(rows)


def tref_max_margin(z, y, margin=1.0):
    return torch.stack([torch.relu(margin - z[i, c] + _others(z, i, c).max()) for i, c in enumerate(y)])


def tref_self_norm(z, y, alpha=0.1):
    rows = []
    for i, c in enumerate(y):
        log_norm = torch.log(torch.exp(z[i]).sum())
        rows.append(log_norm - z[i, c] + alpha * log_norm**2)
    return torch.stack(rows)


def tref_nce(z, y, num_noise=25, noise=None):
    k = z.shape[1]
    q = [1.0 / k] * k if noise is None else list(noise)
    t = float(num_noise)
    rows = []
    for i, c in enumerate(y):
        total = z.new_zeros(())
        if q[c] > 0:
            total = total - torch.log(torch.sigmoid(z[i, c] - math.log(t * q[c])))
        for j in range(k):
            if q[j] > 0:
                total = total - t * q[j] * torch.log(1 - torch.sigmoid(z[i, j] - math.log(t * q[j])))
        rows.append(total)
    return torch.stack(rows)


def tref_bce(z, y):
    rows = []
    for i, c in enumerate(y):
        p = torch.sigmoid(z[i])
        rows.append(-torch.log(p[c]) - torch.log(1 - _others(p[None], 0, c)).sum())
    return torch.stack(rows)


def tref_batch_ce_rows(z, y):
    e = torch.exp(z)
    big_q = e / e.sum()
    m = z.shape[0]
    return torch.stack([-torch.log(big_q[i, c]) - math.log(m) for i, c in enumerate(y)])


def tref_batch_max_margin(z, y, margin=1.0):
    m = z.shape[0]
    z_plus = torch.stack([z[i, c] for i, c in enumerate(y)]).min()
    z_minus = torch.cat([_others(z, i, c) for i, c in enumerate(y)]).max()
    return (torch.relu(margin - z_plus + z_minus) + tref_max_margin(z, y, margin).sum()) / m


def tref_z_loss(z, y, a=1.0, b=2.0):
    k = z.shape[1]
    rows = []
    for i, c in enumerate(y):
        mu = z[i].sum() / k
        sd = torch.sqrt(((z[i] - mu) ** 2).sum() / k)
        zhat = (z[i, c] - mu) / sd
        rows.append(torch.log1p(torch.exp(a * (b - zhat))) / a)
    return torch.stack(rows)


def tref_decoupled(z, y):
    return tref_ce(z, y)  # one positive: e^{z_y}/(e^{z_y} + Σ_{j≠y} e^{z_j}) is the softmax


# --------------------------------------------------------------------------------------------------------
# The specification table.
# --------------------------------------------------------------------------------------------------------

NOISE_WITH_ZERO = [0.3, 0.0, 0.1, 0.2, 0.05, 0.25, 0.1]  # k = 7, class 1 is never noise


@dataclass
class Spec:
    fn: Callable
    ref: Callable  # plain floats -> per-example list (or, for batch_max_margin, the batch value)
    tref: Callable  # float64 tensor -> per-example tensor (or the batch value)
    kwargs: dict = field(default_factory=dict)
    batch_value: bool = False  # only batch_max_margin: no per-example value, "none" refused
    tensor_kwargs: tuple = ()  # kwargs to turn into tensors for the library call

    def lib_kwargs(self, device="cpu"):
        kw = dict(self.kwargs)
        for name in self.tensor_kwargs:
            kw[name] = torch.tensor(kw[name], dtype=torch.float64, device=device)
        return kw


SPECS = {
    "ce": Spec(cross_entropy, ref_ce, tref_ce),
    "max_margin": Spec(max_margin, ref_max_margin, tref_max_margin, {"margin": 1.0}),
    "max_margin_g0.5": Spec(max_margin, ref_max_margin, tref_max_margin, {"margin": 0.5}),
    "self_norm": Spec(self_normalization, ref_self_norm, tref_self_norm, {"alpha": 0.1}),
    "self_norm_a1": Spec(self_normalization, ref_self_norm, tref_self_norm, {"alpha": 1.0}),
    "nce_uniform": Spec(nce, ref_nce, tref_nce, {"num_noise": 25}),
    "nce_t2.5": Spec(nce, ref_nce, tref_nce, {"num_noise": 2.5}),
    "nce_nonuniform": Spec(
        nce, ref_nce, tref_nce, {"num_noise": 3, "noise": NOISE_WITH_ZERO}, tensor_kwargs=("noise",)
    ),
    "bce": Spec(binary_cross_entropy, ref_bce, tref_bce),
    "batch_ce": Spec(batch_cross_entropy, ref_batch_ce_rows, tref_batch_ce_rows),
    "batch_max_margin": Spec(
        batch_max_margin, ref_batch_max_margin, tref_batch_max_margin, {"margin": 1.0}, batch_value=True
    ),
    "batch_max_margin_g2.5": Spec(
        batch_max_margin, ref_batch_max_margin, tref_batch_max_margin, {"margin": 2.5}, batch_value=True
    ),
    "z_loss": Spec(z_loss, ref_z_loss, tref_z_loss, {"a": 1.0, "b": 2.0}),
    "z_loss_a3": Spec(z_loss, ref_z_loss, tref_z_loss, {"a": 3.0, "b": 0.5}),
    "decoupled_softmax": Spec(decoupled_softmax, lambda z, y: ref_decoupled(z, [[c] for c in y]), tref_decoupled),
}

M, K = 5, 7
TARGETS = [1, 0, 6, 3, 1]  # class 1 has noise probability 0 in NOISE_WITH_ZERO: its data term is 0


def random_logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(M, K, generator=g, dtype=torch.float64)


def grid_logits(seed: int, m: int = M, k: int = K, step: float = 0.37) -> torch.Tensor:
    """Distinct values on a grid of spacing ``step`` (no ties; every hinge ≥ 0.09 away from its kink)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m * k, generator=g).to(torch.float64)
    return ((perm - (m * k - 1) / 2) * step).view(m, k)


def ref_reduce(spec: Spec, z: torch.Tensor, y: list[int], reduction: str) -> torch.Tensor:
    zl = z.double().tolist()
    if spec.batch_value:
        value = spec.ref(zl, y, **spec.kwargs)
        return torch.tensor(value if reduction == "mean" else value * len(zl), dtype=torch.float64)
    rows = spec.ref(zl, y, **spec.kwargs)
    if reduction == "none":
        return torch.tensor(rows, dtype=torch.float64)
    return torch.tensor(math.fsum(rows) / (len(rows) if reduction == "mean" else 1), dtype=torch.float64)


def tref_reduce(spec: Spec, z: torch.Tensor, y: list[int], reduction: str) -> torch.Tensor:
    out = spec.tref(z, y, **spec.kwargs)
    if spec.batch_value:
        return out if reduction == "mean" else out * z.shape[0]
    return {"mean": out.mean(), "sum": out.sum(), "none": out}[reduction]


def reductions(spec: Spec) -> tuple[str, ...]:
    return ("mean", "sum") if spec.batch_value else ("mean", "sum", "none")


def _scalarise(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A scalar from a loss output; "none" outputs are weighted so every entry's gradient is checked."""
    return out if out.dim() == 0 else (out * weights.to(out.dtype)).sum()


CASES = [(name, r) for name, spec in SPECS.items() for r in reductions(spec)]


# --------------------------------------------------------------------------------------------------------
# Values.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_value_matches_loop_reference(name, reduction, seed):
    spec = SPECS[name]
    z = random_logits(seed)
    got = spec.fn(z, torch.tensor(TARGETS), reduction=reduction, **spec.lib_kwargs())
    expected = ref_reduce(spec, z, TARGETS, reduction)
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(SPECS))
def test_value_is_stable_for_large_logits(name):
    """Logits of size ~±100: the naive formulas overflow in float32; the library must stay exact."""
    spec = SPECS[name]
    z = random_logits(3, scale=40.0)
    got = spec.fn(z, torch.tensor(TARGETS), **spec.lib_kwargs())
    assert torch.isfinite(got)
    torch.testing.assert_close(got, ref_reduce(spec, z, TARGETS, "mean"), rtol=1e-10, atol=1e-10)
    got32 = spec.fn(z.float(), torch.tensor(TARGETS), **spec.lib_kwargs())
    assert torch.isfinite(got32)
    torch.testing.assert_close(got32.double(), ref_reduce(spec, z.float(), TARGETS, "mean"), rtol=1e-5, atol=1e-4)


def test_references_are_not_trivially_equal():
    """The references distinguish the losses: a reference that returned the same thing for all would pass
    nothing above, but guard against a copy-paste slip in the table too."""
    z = random_logits(0).tolist()
    values = {name: round(sum(spec.ref(z, TARGETS, **spec.kwargs)) if not spec.batch_value
                          else spec.ref(z, TARGETS, **spec.kwargs), 9) for name, spec in SPECS.items()}
    same_as_ce = {n for n, v in values.items() if v == values["ce"]}
    assert same_as_ce == {"ce", "decoupled_softmax"}  # decoupled softmax with one positive is ce
    assert len(set(values.values())) == len(values) - 1


def test_z_loss_uses_population_std():
    """With the sample std (÷(k−1)) the value would differ; check the reference distinguishes them."""
    z = torch.tensor([[3.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    got = z_loss(z, torch.tensor([0]), a=1.0, b=2.0)
    pop = (3.0 - 1.0) / math.sqrt(((2**2) + 1 + 4 + 1) / 4)
    sample = (3.0 - 1.0) / math.sqrt(((2**2) + 1 + 4 + 1) / 3)
    assert got.item() == pytest.approx(math.log1p(math.exp(2.0 - pop)), rel=1e-12)
    assert got.item() != pytest.approx(math.log1p(math.exp(2.0 - sample)), rel=1e-3)


def test_z_loss_is_shift_and_scale_invariant():
    z = random_logits(4)
    y = torch.tensor(TARGETS)
    torch.testing.assert_close(z_loss(3.5 * z - 7.0, y), z_loss(z, y), rtol=1e-12, atol=1e-12)


def test_nce_nonuniform_data_term_vanishes_for_zero_noise_class():
    """A target whose class has q = 0: g_y = σ(+∞) = 1, so only the noise term remains."""
    z = random_logits(5)
    q = torch.tensor(NOISE_WITH_ZERO, dtype=torch.float64)
    y = torch.tensor([1])
    got = nce(z[:1], y, num_noise=3, noise=q)
    pairs = zip(z[0].tolist(), q.tolist(), strict=True)
    noise_only = -sum(3 * qj * _log_sigmoid(-(zj - math.log(3 * qj))) for zj, qj in pairs if qj > 0)
    assert got.item() == pytest.approx(noise_only, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_class_index_paths_equal_the_unfused_forms(dtype):
    """bce and exact nce fold the target's term into one autograd function for class indices (scalars for
    uniform noise, vectors otherwise); they must equal the one-hot multi-label form, computed by separate
    terms, and nce with uniform noise must equal nce given the uniform vector, in value and gradient."""
    m, k = 9, 13
    z = torch.randn(m, k, generator=torch.Generator().manual_seed(5), dtype=torch.float64).mul(4).to(dtype)
    y = torch.randint(0, k, (m,), generator=torch.Generator().manual_seed(6))
    one_hot = torch.nn.functional.one_hot(y, k)
    uniform = torch.full((k,), 1.0 / k, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-6}
    cases = [(binary_cross_entropy, {}, {}), (nce, {}, {"noise": uniform}), (nce, {"num_noise": 3}, {}),
             (nce, {"noise": uniform}, {})]
    for fn, kwargs, other in cases:
        for reduction in ("none", "sum"):
            a = z.clone().requires_grad_(True)
            b = z.clone().requires_grad_(True)
            fused = fn(a, y, reduction=reduction, **kwargs)
            reference = fn(b, one_hot, reduction=reduction, **kwargs, **other)
            torch.testing.assert_close(fused, reference, **tol)
            weights = (torch.linspace(0.5, 2.0, m, dtype=dtype) if reduction == "none"
                       else torch.tensor(1.7, dtype=dtype))
            (fused * weights).sum().backward()
            (reference * weights).sum().backward()
            torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("gap", [5.0, 12.0, 30.0, 80.0])
def test_bce_keeps_relative_accuracy_on_well_separated_logits(gap):
    """True logits at +gap, false ones at −gap: every term of the loss and of the gradient is tiny. Written as
    Σ_j softplus(z_j) − z_y and σ(z_y) − 1 they cancel to 0 in float32 past gap ≈ 17; the loss must keep float32's
    relative accuracy there (the PoLS-aligned regime), against float64 on the same inputs."""
    m, k = 4, 50
    z64 = torch.full((m, k), -gap, dtype=torch.float64)
    y = torch.tensor([0, 7, 49, 7])
    z64[torch.arange(m), y] = gap
    z64 += torch.linspace(-0.5, 0.5, m * k, dtype=torch.float64).view(m, k)  # distinct values
    z32 = z64.float().requires_grad_(True)
    got = binary_cross_entropy(z32, y, reduction="none")
    ref_z = z32.detach().double().requires_grad_(True)  # the float32 inputs, in float64
    ref = torch.nn.functional.softplus(-ref_z.gather(1, y[:, None])).squeeze(1) + \
        torch.nn.functional.softplus(ref_z.scatter(1, y[:, None], float("-inf"))).sum(dim=1)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=0)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z32.grad.double(), ref_z.grad, rtol=1e-5, atol=0)
    # multi-label targets: a second positive in row 1, also at +gap
    z_ml = z32.detach().clone()
    targets = torch.nn.functional.one_hot(y, k).bool()
    targets[1, 3] = True
    z_ml[1, 3] = gap
    z_ml.requires_grad_(True)
    got = binary_cross_entropy(z_ml, targets, reduction="none")
    ref_z = z_ml.detach().double().requires_grad_(True)
    ref = torch.nn.functional.softplus(torch.where(targets, -ref_z, ref_z)).sum(dim=1)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=0)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z_ml.grad.double(), ref_z.grad, rtol=1e-5, atol=0)


def test_max_margin_hinge_is_zero_when_separated():
    z = torch.tensor([[5.0, 1.0, 3.9], [0.0, 2.0, 1.5]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # row 0: 1 − 5 + 3.9 = −0.1 → 0; row 1: 1 − 2 + 1.5 = 0.5
    assert max_margin(z, y, reduction="none").tolist() == pytest.approx([0.0, 0.5], abs=1e-12)
    assert max_margin(z, y, margin=0.05, reduction="none").tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def test_batch_max_margin_uses_batch_extremes():
    """Every row separated within itself (per-example hinge 0), yet the batch term is active."""
    z = torch.tensor([[5.0, 1.0], [-4.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # z₊ = min(5, −1) = −1, z₋ = max(1, −4) = 1: (1/2)·max(0, 1 + 1 + 1) = 1.5, hinges: 0 and max(0, 1−(−1)−4) = 0
    assert batch_max_margin(z, y).item() == pytest.approx(1.5, abs=1e-12)
    assert batch_max_margin(z, y, reduction="sum").item() == pytest.approx(3.0, abs=1e-12)
    assert max_margin(z, y).item() == pytest.approx(0.0, abs=1e-12)


def test_batch_max_margin_refuses_none():
    z = random_logits(0)
    with pytest.raises(ValueError, match="reduction must be one of .*'none'"):
        batch_max_margin(z, torch.tensor(TARGETS), reduction="none")


# --------------------------------------------------------------------------------------------------------
# batch_ce: the authors' 1e-6 trap.
# --------------------------------------------------------------------------------------------------------


def _batch_ce_with_eps(z: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The public TensorFlow code's version: log(Q_B + 1e-6)."""
    e = torch.exp(z.double() - z.double().max())
    big_q = e / e.sum()
    m = z.shape[0]
    return -math.log(m) - torch.log(big_q[torch.arange(m), y] + eps).mean()


def test_batch_ce_trap_all_zero_logits():
    m, k = 128, 1000
    y = torch.arange(m) % k
    for dtype in (torch.float32, torch.float64):
        z = torch.zeros(m, k, dtype=dtype, requires_grad=True)
        got = batch_cross_entropy(z, y)
        # Q_B = 1/(m·k) everywhere, P_B = 1/m on m pairs: KL = log(m·k) − log(m) = log k.
        assert got.item() == pytest.approx(math.log(k), rel=1e-6 if dtype == torch.float32 else 1e-12)
        assert math.log(k) == pytest.approx(6.9078, abs=1e-4)
        got.backward()
        exact_grad = z.grad.double().clone()
    # Exact gradient: Q_B − P_B.
    expected_grad = torch.full((m, k), 1.0 / (m * k), dtype=torch.float64)
    expected_grad[torch.arange(m), y] -= 1.0 / m
    torch.testing.assert_close(exact_grad, expected_grad, rtol=1e-10, atol=1e-14)
    # The eps version is wrong by more than 0.1 nats and has a smaller gradient.
    z_eps = torch.zeros(m, k, dtype=torch.float64, requires_grad=True)
    with_eps = _batch_ce_with_eps(z_eps, y)
    assert abs(with_eps.item() - math.log(k)) > 0.1
    with_eps.backward()
    assert z_eps.grad.norm() < 0.95 * exact_grad.norm()


def test_batch_ce_large_batch_random_logits():
    m, k = 128, 1000
    g = torch.Generator().manual_seed(11)
    z = 3.0 * torch.randn(m, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (m,), generator=g)
    rows = ref_batch_ce_rows(z.tolist(), y.tolist())
    exact = math.fsum(rows) / m
    assert batch_cross_entropy(z, y).item() == pytest.approx(exact, rel=1e-11)
    assert batch_cross_entropy(z.float(), y).item() == pytest.approx(exact, rel=1e-5)
    assert abs(_batch_ce_with_eps(z, y).item() - exact) > 1e-3


# --------------------------------------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------------------------------------


def _check_kinks_far(name: str, z: torch.Tensor, y: list[int]) -> None:
    """Precondition for the margin losses: no ties, every hinge argument away from 0, and some rows active."""
    spec = SPECS[name]
    if spec.fn not in (max_margin, batch_max_margin):
        return
    zl = z.tolist()
    margin = spec.kwargs["margin"]
    args = []
    for row, c in zip(zl, y, strict=True):
        args.append(margin - row[c] + max(v for j, v in enumerate(row) if j != c))
    z_plus = min(row[c] for row, c in zip(zl, y, strict=True))
    z_minus = max(v for row, c in zip(zl, y, strict=True) for j, v in enumerate(row) if j != c)
    args.append(margin - z_plus + z_minus)
    assert min(abs(a) for a in args) > 0.05
    assert any(a > 0 for a in args)
    assert len({v for row in zl for v in row}) == z.numel()


@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_gradient_matches_autograd_on_reference(name, reduction):
    spec = SPECS[name]
    z = grid_logits(seed=7)
    _check_kinks_far(name, z, TARGETS)
    weights = torch.linspace(0.5, 1.5, M, dtype=torch.float64)

    z_lib = z.clone().requires_grad_(True)
    out = spec.fn(z_lib, torch.tensor(TARGETS), reduction=reduction, **spec.lib_kwargs())
    _scalarise(out, weights).backward()

    z_ref = z.clone().requires_grad_(True)
    out_ref = tref_reduce(spec, z_ref, TARGETS, reduction)
    # The torch reference agrees with the loop reference (so it is a reference at all) ...
    torch.testing.assert_close(out_ref.detach(), ref_reduce(spec, z, TARGETS, reduction), rtol=1e-10, atol=1e-12)
    _scalarise(out_ref, weights).backward()
    # ... and its gradient is the library's.
    assert z_lib.grad.abs().sum() > 0
    torch.testing.assert_close(z_lib.grad, z_ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_gradcheck(name, reduction):
    spec = SPECS[name]
    m, k = 4, 7
    y = [1, 0, 6, 3]
    z = grid_logits(seed=13, m=m, k=k, step=0.41)
    _check_kinks_far(name, z, y)
    z.requires_grad_(True)
    target = torch.tensor(y)
    kwargs = spec.lib_kwargs()
    assert torch.autograd.gradcheck(lambda x: spec.fn(x, target, reduction=reduction, **kwargs), (z,))


def test_z_loss_constant_row_has_zero_gradient():
    z = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    out = z_loss(z, torch.tensor([0, 2]), reduction="none")
    assert out[0].item() == pytest.approx(math.log1p(math.exp(2.0)), rel=1e-12)  # ẑ := 0
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[0].abs().max() == 0


@pytest.mark.parametrize("value", [0.1, -3.7, 1e4])
def test_z_loss_constant_float32_row_is_not_rounding_noise(value):
    # The float32 mean of 1000 copies of 0.1 is not exactly 0.1: the variance must not decide constancy.
    z = torch.full((2, 1000), value, dtype=torch.float32, requires_grad=True)
    assert (z.detach() - z.detach().mean(dim=1, keepdim=True)).square().mean() > 0 or value == 1e4
    target = torch.tensor([0, 999])
    out = z_loss(z, target, reduction="none")
    assert torch.equal(z_score(z.detach(), target), torch.zeros(2))
    assert out.detach().tolist() == pytest.approx([math.log1p(math.exp(2.0))] * 2, rel=1e-6)
    out.sum().backward()
    assert z.grad.abs().max() == 0


# --------------------------------------------------------------------------------------------------------
# dtypes and devices.
# --------------------------------------------------------------------------------------------------------

DTYPE_TOL = {  # value vs the float64 result on the un-rounded input; gradient vs float64 on the rounded input
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPE_CASES = ["ce", "max_margin", "self_norm", "nce_uniform", "nce_nonuniform", "bce", "batch_ce",
               "batch_max_margin", "z_loss", "decoupled_softmax"]


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("name", DTYPE_CASES)
def test_dtype_and_device(name, dtype, device):
    spec = SPECS[name]
    m, k = 6, 7
    y = [1, 0, 6, 3, 1, 4]
    z64 = grid_logits(seed=21, m=m, k=k, step=0.37)
    _check_kinks_far(name, z64, y)
    target = torch.tensor(y, device=device)
    x = z64.to(device=device, dtype=dtype).requires_grad_(True)
    out = spec.fn(x, target, **spec.lib_kwargs(device))
    half = dtype in (torch.float16, torch.bfloat16)
    # Half precision is computed (and returned) in float32; float32/float64 keep their dtype.
    assert out.dtype == (torch.float32 if half else dtype)
    assert out.device.type == device.type
    rounded = x.detach().double().cpu()  # the values the loss actually saw
    rtol, atol = DTYPE_TOL[dtype]
    # Against the float64 result on the rounded input: float32-accurate for every non-float64 dtype.
    exact_on_rounded = ref_reduce(spec, rounded, y, "mean")
    tight = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-5)
    torch.testing.assert_close(out.detach().double().cpu(), exact_on_rounded, rtol=tight[0], atol=tight[1])
    # Against the float64 result on the original input: within the dtype's own resolution.
    torch.testing.assert_close(out.detach().double().cpu(), ref_reduce(spec, z64, y, "mean"), rtol=rtol, atol=atol)

    out.backward()
    assert x.grad is not None
    assert x.grad.dtype == dtype
    assert x.grad.device.type == device.type
    assert torch.isfinite(x.grad).all()
    z_ref = rounded.clone().requires_grad_(True)
    tref_reduce(spec, z_ref, y, "mean").backward()
    torch.testing.assert_close(x.grad.double().cpu(), z_ref.grad, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------
# Sampled NCE.
# --------------------------------------------------------------------------------------------------------

SAMPLED_NOISE = {
    "uniform": None,
    "nonuniform": [0.4, 0.0, 0.1, 0.3, 0.15, 0.05],
}


@pytest.mark.parametrize("noise_kind", list(SAMPLED_NOISE))
def test_sampled_nce_averages_to_exact(noise_kind, gen):
    q_list = SAMPLED_NOISE[noise_kind]
    k, t, draws = 6, 5, 2000
    base = 1.5 * torch.randn(3, k, generator=gen, dtype=torch.float64)
    base_y = [0, 1, 5]
    noise = None if q_list is None else torch.tensor(q_list, dtype=torch.float64)
    z = base.repeat_interleave(draws, dim=0)  # each row repeated: independent draws per copy
    y = torch.tensor(base_y).repeat_interleave(draws)
    per_row = nce(z, y, num_noise=t, noise=noise, sampled=True, generator=gen, reduction="none")
    exact = ref_nce(base.tolist(), base_y, num_noise=t, noise=q_list)
    for r in range(3):
        samples = per_row[r * draws:(r + 1) * draws]
        se = samples.std().item() / math.sqrt(draws)
        assert se > 0  # really sampled (a constant would mean the exact path was taken)
        assert abs(samples.mean().item() - exact[r]) < 5 * se, (r, samples.mean().item(), exact[r], se)
    # and the reduction "mean" over the copies is the same average
    mean = nce(z, y, num_noise=t, noise=noise, sampled=True, generator=gen)
    assert abs(mean.item() - sum(exact) / 3) < 5 * per_row.std().item() / math.sqrt(per_row.numel())


def test_sampled_nce_never_draws_zero_probability_class(gen):
    k, t, n = 6, 7, 3000
    q = torch.tensor(SAMPLED_NOISE["nonuniform"], dtype=torch.float64)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.randint(0, k, (n,), generator=gen)
    y[y == 1] = 2  # no row has class 1 as its target
    per_row = nce(z, y, num_noise=t, noise=q, sampled=True, generator=gen, reduction="none")
    # Drawing class 1 would add softplus(z + ~700) ≈ 700 to a row.
    assert per_row.max().item() < 100
    per_row.sum().backward()
    assert torch.count_nonzero(z.grad[:, 1]) == 0
    # every class with q > 0 was drawn somewhere
    for j in (0, 2, 3, 4, 5):
        assert torch.count_nonzero(z.grad[:, j]) > 0


def test_sampled_nce_is_reproducible_with_a_seed():
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    a = nce(z, y, num_noise=4, sampled=True, generator=torch.Generator().manual_seed(5))
    b = nce(z, y, num_noise=4, sampled=True, generator=torch.Generator().manual_seed(5))
    c = nce(z, y, num_noise=4, sampled=True, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_sampled_nce_refuses_fractional_num_noise():
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="integer"):
        nce(z, torch.tensor([0, 1]), num_noise=2.5, sampled=True)
