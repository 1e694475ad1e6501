"""Cosine-margin losses: cosface, arcface, elasticface, norm_softmax (``logitsep.losses.cosine``).

The references below are written differently from the library on purpose: loops over rows in float64 with
``math.acos`` / ``math.cos`` and an explicit log-sum-exp.
"""

from __future__ import annotations

import math

import pytest
import torch

from logitsep.losses import LOSSES, get_loss, loss_spec
from logitsep.losses.cosine import (
    ArcFaceLoss,
    CosFaceLoss,
    ElasticFaceLoss,
    NormSoftmaxLoss,
    arc_margin,
    arcface,
    cosface,
    elastic_margins,
    elasticface,
    norm_softmax,
)

NAMES = ("cosface", "arcface", "elasticface", "norm_softmax")


# ------------------------------------------------------------------------------------------------ references


def ref_arc_target(c: float, m: float) -> float:
    """ArcFace target cosine with the InsightFace fallback past π (capped at -1) and the angle clipped at 0."""
    theta = math.acos(c)
    if theta + m > math.pi:
        return min(c - m * math.sin(m), -1.0)
    if theta + m < 0:
        return 1.0
    return math.cos(theta + m)


def ref_margin_ce(cos: torch.Tensor, y: torch.Tensor, scale: float, targets: list[float], reduction: str):
    """CE over rows: logits scale·cos, with row i's target column replaced by scale·targets[i]."""
    losses = []
    for i in range(cos.shape[0]):
        yi = int(y[i])
        z = [scale * float(v) for v in cos[i].tolist()]
        z[yi] = scale * targets[i]
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        losses.append(lse - z[yi])
    if reduction == "none":
        return losses
    total = math.fsum(losses)
    return total / len(losses) if reduction == "mean" else total


def ref_loss(name: str, cos: torch.Tensor, y: torch.Tensor, scale: float, margins: list[float], reduction: str):
    cos = cos.double()
    t = [float(cos[i, int(y[i])]) for i in range(cos.shape[0])]
    if name == "norm_softmax":
        targets = t
    elif name in ("cosface", "elastic_cos"):
        targets = [t[i] - margins[i] for i in range(len(t))]
    else:  # arcface, elastic_arc
        targets = [ref_arc_target(t[i], margins[i]) for i in range(len(t))]
    return ref_margin_ce(cos, y, scale, targets, reduction)


def f64(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def random_cosines(gen: torch.Generator, m: int, k: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(m, k, generator=gen, dtype=torch.float64)


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------- registry


def test_registered_with_alignment_not_established() -> None:
    for name in NAMES:
        assert name in LOSSES
        assert LOSSES[name].pols_aligned is None
        assert LOSSES[name].name == name
        assert loss_spec(name).inputs == "cosines" and loss_spec(name).head == "cosine"
    assert isinstance(get_loss("cosface"), CosFaceLoss)
    assert isinstance(get_loss("arcface"), ArcFaceLoss)
    assert isinstance(get_loss("elasticface", variant="cos"), ElasticFaceLoss)
    assert isinstance(get_loss("norm_softmax"), NormSoftmaxLoss)


def test_defaults_are_the_papers() -> None:
    assert (CosFaceLoss().scale, CosFaceLoss().margin) == (64.0, 0.35)
    assert (ArcFaceLoss().scale, ArcFaceLoss().margin) == (64.0, 0.5)
    assert NormSoftmaxLoss().scale == 64.0
    resolved = {
        (v, p): (ElasticFaceLoss(variant=v, plus=p).margin, ElasticFaceLoss(variant=v, plus=p).std)
        for v in ("arc", "cos")
        for p in (False, True)
    }
    assert resolved == {
        ("arc", False): (0.5, 0.05),
        ("cos", False): (0.35, 0.05),
        ("arc", True): (0.5, 0.0175),
        ("cos", True): (0.35, 0.02),
    }
    assert ElasticFaceLoss(margin=0.4, std=0.0).std == 0.0
    assert "margin=0.5" in repr(ArcFaceLoss()) and "variant='cos'" in repr(ElasticFaceLoss(variant="cos"))


# ------------------------------------------------------------------------------------------ values vs reference


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("scale", "margin"), [(64.0, 0.5), (10.0, 0.35), (1.0, 1.2), (30.0, 0.0)])
def test_cosface_arcface_norm_softmax_match_reference(gen, reduction, scale, margin) -> None:
    cos = random_cosines(gen, 9, 6)
    y = torch.randint(0, 6, (9,), generator=gen)
    # exact edges and the arcface fallback region (θ + m > π) on target entries
    cos[0, y[0]] = 1.0
    cos[1, y[1]] = -1.0
    cos[2, y[2]] = -0.99
    cos[3, (y[3] + 1) % 6] = -1.0
    ms = [margin] * 9
    cases = {
        "cosface": cosface(cos, y, scale=scale, margin=margin, reduction=reduction),
        "arcface": arcface(cos, y, scale=scale, margin=margin, reduction=reduction),
        "norm_softmax": norm_softmax(cos, y, scale=scale, reduction=reduction),
    }
    for name, got in cases.items():
        want = f64(ref_loss(name, cos, y, scale, ms, reduction))
        assert got.dtype == torch.float64
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=name)


def test_the_margins_change_the_loss(gen) -> None:
    cos = random_cosines(gen, 8, 5, -0.5, 0.5)
    y = torch.randint(0, 5, (8,), generator=gen)
    base = norm_softmax(cos, y, scale=16.0)
    assert cosface(cos, y, scale=16.0, margin=0.2) > base
    assert arcface(cos, y, scale=16.0, margin=0.2) > base
    # the arc and cos margins differ (the angle is not the cosine)
    assert not torch.allclose(cosface(cos, y, scale=16.0, margin=0.2), arcface(cos, y, scale=16.0, margin=0.2))


def test_margin_zero_makes_the_family_one_loss(gen) -> None:
    cos = random_cosines(gen, 16, 7)
    cos[0, 0], cos[1, 1], cos[2, 2] = 1.0, -1.0, 0.0
    y = torch.randint(0, 7, (16,), generator=gen)
    y[:3] = torch.tensor([0, 1, 2])
    for dtype in (torch.float32, torch.float64):
        c = cos.to(dtype)
        ns = norm_softmax(c, y, scale=20.0, reduction="none")
        assert torch.equal(cosface(c, y, scale=20.0, margin=0.0, reduction="none"), ns)
        assert torch.equal(arcface(c, y, scale=20.0, margin=0.0, reduction="none"), ns)
        for variant in ("arc", "cos"):
            el = elasticface(c, y, scale=20.0, margin=0.0, std=0.0, variant=variant, reduction="none")
            assert torch.equal(el, ns)


# ---------------------------------------------------------------------------------------------- arc_margin


def test_arc_margin_values_match_acos_reference() -> None:
    c = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64)
    for m in (0.0, 0.1, 0.5, 1.0, 2.5, -0.3):
        got = arc_margin(c, m)
        if 0 < m < 2.33:  # the cap at -1 never acts: InsightFace's rule as published
            insightface = torch.where(c > math.cos(math.pi - m), torch.cos(torch.acos(c) + m), c - m * math.sin(m))
            torch.testing.assert_close(got, insightface, rtol=0, atol=1e-12)
        want = torch.tensor([ref_arc_target(v, m) for v in c.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"m={m}")


@pytest.mark.parametrize("m", [0.0, 0.35, 0.5, 1.0, 2.0, 2.5, 3.0, -0.3])
def test_arc_margin_is_monotonic_in_the_angle(m) -> None:
    theta = torch.linspace(0.0, math.pi, 5001, dtype=torch.float64)
    values = arc_margin(torch.cos(theta), m)
    assert bool((values[1:] <= values[:-1] + 1e-15).all()), "target logit must not increase with θ"
    if m > 0:
        # the naive cos(θ + m) turns back up past π: the reason for the fallback
        naive = torch.cos(theta + m)
        assert bool((naive[1:] > naive[:-1]).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [0.5, 0.35, 1.0])
def test_arc_margin_gradient_is_finite_at_plus_minus_one(dtype, m) -> None:
    c = torch.tensor([1.0, -1.0], dtype=dtype, requires_grad=True)
    arc_margin(c, m).sum().backward()
    assert bool(torch.isfinite(c.grad).all()), c.grad
    # the naive formulations are infinite / NaN there: the trap this guards against
    naive = torch.tensor([1.0, -1.0], dtype=dtype, requires_grad=True)
    torch.cos(torch.acos(naive) + m).sum().backward()
    assert not bool(torch.isfinite(naive.grad).all())
    sq = torch.tensor([1.0, -1.0], dtype=dtype, requires_grad=True)
    (sq * math.cos(m) - torch.sqrt(1 - sq * sq) * math.sin(m)).sum().backward()
    assert not bool(torch.isfinite(sq.grad).all())


def test_arc_margin_gradient_matches_acos_reference_away_from_the_edges() -> None:
    c = torch.linspace(-0.999, 0.999, 801, dtype=torch.float64)
    for m in (0.5, 0.35, 1.3):
        x = c.clone().requires_grad_(True)
        arc_margin(x, m).sum().backward()
        ref = c.clone().requires_grad_(True)
        past_pi = torch.acos(c) + m > math.pi
        # reference: cos(acos(c) + m) where θ + m ≤ π, the linear fallback elsewhere
        torch.where(past_pi, ref - m * math.sin(m), torch.cos(torch.acos(ref) + m)).sum().backward()
        torch.testing.assert_close(x.grad, ref.grad, rtol=1e-9, atol=1e-9)
        # float32 agrees with the float64 reference too
        x32 = c.float().requires_grad_(True)
        arc_margin(x32, m).sum().backward()
        torch.testing.assert_close(x32.grad.double(), ref.grad, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_loss_gradient_is_finite_at_plus_minus_one(name, gen) -> None:
    cos = random_cosines(gen, 6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cos[0, 0], cos[1, 1], cos[2, 0], cos[3, 3], cos[4, 1] = 1.0, -1.0, 1.0, 1.0, -1.0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = cos.to(dtype, copy=True).requires_grad_(True)
        fn = get_loss(name, generator=seeded()) if name == "elasticface" else get_loss(name)
        fn(x, y).backward()
        assert x.grad.dtype == dtype
        assert bool(torch.isfinite(x.grad).all()), (name, dtype, x.grad)


@pytest.mark.parametrize("name", ["cosface", "arcface", "norm_softmax", "elastic_arc", "elastic_cos", "elastic_plus"])
def test_gradcheck_float64(name, gen) -> None:
    cos = random_cosines(gen, 5, 4, -0.8, 0.8).requires_grad_(True)
    y = torch.tensor([0, 3, 1, 1, 2])

    def fn(c):
        if name == "cosface":
            return cosface(c, y, scale=4.0, margin=0.3, reduction="none")
        if name == "arcface":
            return arcface(c, y, scale=4.0, margin=0.5, reduction="none")
        if name == "norm_softmax":
            return norm_softmax(c, y, scale=4.0, reduction="none")
        variant = "cos" if name == "elastic_cos" else "arc"
        # a fresh generator per call: the same margins every evaluation
        return elasticface(c, y, scale=4.0, std=0.1, variant=variant, plus=name == "elastic_plus",
                           generator=seeded(3), reduction="none")

    assert torch.autograd.gradcheck(fn, (cos,))


def test_arcface_gradient_matches_acos_reference(gen) -> None:
    cos = random_cosines(gen, 7, 5, -0.95, 0.95)
    y = torch.randint(0, 5, (7,), generator=gen)
    x = cos.clone().requires_grad_(True)
    arcface(x, y, scale=8.0, margin=0.5).backward()
    r = cos.clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(y, 5).bool()
    theta = torch.acos(r)
    target = torch.where(theta + 0.5 > math.pi, r - 0.5 * math.sin(0.5), torch.cos(theta + 0.5))
    logits = 8.0 * torch.where(onehot, target, r)
    (torch.logsumexp(logits, 1) - logits[onehot]).mean().backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ elasticface


@pytest.mark.parametrize("plus", [False, True])
def test_elasticface_std_zero_is_arcface_and_cosface_exactly(gen, plus) -> None:
    cos = random_cosines(gen, 12, 6)
    cos[0, 0] = 1.0
    y = torch.randint(0, 6, (12,), generator=gen)
    y[0] = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        c = cos.to(dtype)
        for margin in (0.5, 0.35, 0.1):
            for reduction in ("mean", "none"):
                arc = arcface(c, y, scale=64.0, margin=margin, reduction=reduction)
                el = elasticface(c, y, margin=margin, std=0.0, variant="arc", plus=plus, reduction=reduction)
                assert torch.equal(el, arc), (dtype, margin)
                cf = cosface(c, y, scale=64.0, margin=margin, reduction=reduction)
                el = elasticface(c, y, margin=margin, std=0.0, variant="cos", plus=plus, reduction=reduction)
                assert torch.equal(el, cf), (dtype, margin)


def test_elastic_margins_are_margin_plus_std_times_a_standard_normal() -> None:
    t = torch.zeros(6, dtype=torch.float64)
    got = elastic_margins(t, 0.5, 0.05, generator=seeded(11))
    z = torch.randn(6, generator=seeded(11), dtype=torch.float64)
    torch.testing.assert_close(got, 0.5 + 0.05 * z, rtol=0, atol=1e-15)
    assert got.dtype == torch.float64
    # drawn in float64 whatever the dtype: the same seed gives the same margins (rounded) in every dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        other = elastic_margins(t.to(dtype), 0.5, 0.05, generator=seeded(11))
        assert other.dtype == torch.float32
        assert torch.equal(other, got.float())
    many = elastic_margins(torch.zeros(64), 0.5, 0.05, generator=seeded(11))
    many64 = elastic_margins(torch.zeros(64, dtype=torch.float64), 0.5, 0.05, generator=seeded(11))
    assert torch.equal(many, many64.float())


def test_elastic_margin_statistics() -> None:
    margins = elastic_margins(torch.zeros(40_000), 0.5, 0.05, generator=seeded(1))
    assert abs(float(margins.mean()) - 0.5) < 0.002
    assert abs(float(margins.std()) - 0.05) < 0.002


def test_elasticface_plus_assigns_sorted_margins_by_closeness() -> None:
    # target cosines with a known order; decreasing-cosine order is [1, 2, 0, 4, 3] (not its own inverse)
    t = torch.tensor([0.1, 0.9, 0.5, -0.7, -0.3], dtype=torch.float64)
    raw = elastic_margins(t, 0.5, 0.2, plus=False, generator=seeded(5))
    got = elastic_margins(t, 0.5, 0.2, plus=True, generator=seeded(5))
    order = sorted(range(5), key=lambda i: -float(t[i]))
    assert order == [1, 2, 0, 4, 3]
    ranked = sorted(raw.tolist())
    intended = [0.0] * 5
    for rank, sample in enumerate(order):
        intended[sample] = ranked[rank]  # the closest sample gets the smallest margin
    assert got.tolist() == intended
    assert float(got[1]) == min(ranked) and float(got[3]) == max(ranked)
    # the public code's gather, sorted[order], lands on other samples on this very case
    gathered = [ranked[order[i]] for i in range(5)]
    assert gathered != intended
    assert got.tolist() != gathered
    # the same holds through the loss, for both variants
    cos = torch.tensor(
        [[0.1, 0.2, -0.1], [0.3, 0.9, 0.0], [0.5, 0.1, 0.2], [0.0, 0.4, -0.7], [-0.3, 0.6, 0.1]], dtype=torch.float64
    )
    y = torch.tensor([0, 1, 0, 2, 0])
    assert torch.equal(cos[torch.arange(5), y], t)
    for variant, ref_name in (("arc", "elastic_arc"), ("cos", "elastic_cos")):
        loss = elasticface(cos, y, scale=8.0, margin=0.5, std=0.2, variant=variant, plus=True,
                           generator=seeded(5), reduction="none")
        want = ref_loss(ref_name, cos, y, 8.0, intended, "none")
        wrong = ref_loss(ref_name, cos, y, 8.0, gathered, "none")
        torch.testing.assert_close(loss, f64(want), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(loss, f64(wrong), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["arc", "cos"])
def test_elasticface_matches_reference_with_the_drawn_margins(gen, variant) -> None:
    # margin 0 with a wide std: half the draws are negative (the arc angle is then clipped at 0)
    cos = random_cosines(gen, 10, 5)
    cos[0, 0] = 1.0
    y = torch.randint(0, 5, (10,), generator=gen)
    y[0] = 0
    for margin, std in ((0.5, 0.05), (0.0, 0.5), (0.35, 1.0)):
        z = torch.randn(10, generator=seeded(9), dtype=torch.float64)
        margins = (margin + std * z).tolist()
        assert margin > 0 or min(margins) < 0
        got = elasticface(cos, y, scale=16.0, margin=margin, std=std, variant=variant, generator=seeded(9),
                          reduction="none")
        want = ref_loss(f"elastic_{variant}", cos, y, 16.0, margins, "none")
        torch.testing.assert_close(got, f64(want), rtol=1e-11, atol=1e-11)


def test_elasticface_draws_are_reproducible_and_fresh_each_call(gen) -> None:
    cos = random_cosines(gen, 16, 5, -0.9, 0.9)
    y = torch.randint(0, 5, (16,), generator=gen)
    a = elasticface(cos, y, std=0.1, generator=seeded(1))
    b = elasticface(cos, y, std=0.1, generator=seeded(1))
    assert torch.equal(a, b)
    g = seeded(1)
    first, second = elasticface(cos, y, std=0.1, generator=g), elasticface(cos, y, std=0.1, generator=g)
    assert torch.equal(first, a) and not torch.equal(first, second)
    module = ElasticFaceLoss(std=0.1, generator=seeded(1))
    assert torch.equal(module(cos, y), a)
    torch.manual_seed(0)
    c = elasticface(cos, y, std=0.1)
    torch.manual_seed(0)
    assert torch.equal(elasticface(cos, y, std=0.1), c)


# ------------------------------------------------------------------------------------------- module == functional


def test_modules_equal_functional_forms(gen) -> None:
    cos = random_cosines(gen, 8, 5)
    y = torch.randint(0, 5, (8,), generator=gen)
    assert torch.equal(CosFaceLoss(scale=30.0, margin=0.2)(cos, y), cosface(cos, y, scale=30.0, margin=0.2))
    assert torch.equal(ArcFaceLoss(reduction="sum")(cos, y), arcface(cos, y, reduction="sum"))
    assert torch.equal(NormSoftmaxLoss(scale=5.0)(cos, y), norm_softmax(cos, y, scale=5.0))
    el = ElasticFaceLoss(variant="cos", plus=True, generator=seeded(2), reduction="none")(cos, y)
    assert torch.equal(el, elasticface(cos, y, variant="cos", plus=True, generator=seeded(2), reduction="none"))


# --------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(name, dtype, gen, device) -> None:
    cos = random_cosines(gen, 12, 6)
    cos[0, 0], cos[1, 0] = 1.0, -1.0
    y = torch.randint(0, 6, (12,), generator=gen).to(device)
    c = cos.to(dtype).to(device)
    kwargs = {"generator": seeded()} if name == "elasticface" else {}
    got = get_loss(name, **kwargs)(c, y)
    assert got.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert bool(torch.isfinite(got))
    # the same loss as float64 on the (rounded) inputs
    kwargs = {"generator": seeded()} if name == "elasticface" else {}
    want = get_loss(name, **kwargs)(c.double(), y)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if dtype in (torch.float16, torch.bfloat16):
        kwargs = {"generator": seeded()} if name == "elasticface" else {}
        assert torch.equal(got, get_loss(name, **kwargs)(c.float(), y))


def test_half_precision_rounding_above_one_is_accepted() -> None:
    y = torch.tensor([0, 1])
    for dtype in (torch.float16, torch.bfloat16):
        above = torch.tensor(1.0, dtype=dtype) + torch.finfo(dtype).eps  # one ulp above 1
        c = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=dtype)
        c[0, 0] = above
        torch.testing.assert_close(arcface(c, y), arcface(c.float().clamp(-1, 1), y))


# ----------------------------------------------------------------------------------------------- bad inputs


def test_cosines_out_of_range_are_refused() -> None:
    y = torch.tensor([0, 1])
    for fn in (cosface, arcface, norm_softmax, elasticface):
        with pytest.raises(ValueError, match=r"\[-1, 1\].*found values in \[-0\.5, 3\]"):
            fn(torch.tensor([[3.0, 0.0], [-0.5, 0.2]]), y)
        with pytest.raises(ValueError, match="found values in"):
            fn(torch.tensor([[1.001, 0.0], [0.0, 0.2]], dtype=torch.float64), y)
        with pytest.raises(ValueError, match="found values in"):
            fn(torch.tensor([[0.0, -1.0001], [0.0, 0.2]]), y)
        with pytest.raises(ValueError, match="NaN"):
            fn(torch.tensor([[float("nan"), 0.0], [0.0, 0.2]]), y)


def test_rounding_beyond_one_is_clamped() -> None:
    y = torch.tensor([0, 1])
    c = torch.tensor([[1.0 + 5e-6, -1.0 - 5e-6], [0.3, 0.2]], dtype=torch.float64)
    clean = c.clamp(-1, 1)
    for fn in (cosface, arcface, norm_softmax):
        assert torch.equal(fn(c, y), fn(clean, y))
    x = c.clone().requires_grad_(True)
    arcface(x, y).backward()
    assert bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("name", NAMES)
def test_cosines_beyond_one_are_clamped_with_value_checks_off(name) -> None:
    """With the value checks off nothing is refused, but every cosine loss still clamps into [−1, 1]: the value
    is that of the clamped cosines, never NaN from acos or a margin past π."""
    from logitsep.losses import value_checks

    y = torch.tensor([0, 1])
    c = torch.tensor([[1.5, -0.2], [0.3, -3.0]])
    kwargs = {"generator": seeded()} if name == "elasticface" else {}
    want = get_loss(name, **kwargs)(c.clamp(-1, 1), y)
    with value_checks(False):
        kwargs = {"generator": seeded()} if name == "elasticface" else {}
        got = get_loss(name, **kwargs)(c, y)
    assert bool(torch.isfinite(got))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_dtypes_and_targets(name) -> None:
    fn = get_loss(name)
    y = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="cosines"):
        fn([[0.1, 0.2]], y)
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.tensor([[0, 1], [1, 0]]), y)
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.tensor([0.1, 0.2]), y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fn(torch.tensor([[0.1], [0.2]]), y)
    c = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(ValueError, match="range"):
        fn(c, torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        fn(c, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="entries"):
        fn(c, torch.tensor([0, 1, 1]))


def test_bad_hyperparameters() -> None:
    c = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    y = torch.tensor([0, 1])
    for name in NAMES:
        for bad in (0.0, -1.0, float("inf")):
            with pytest.raises(ValueError, match="scale"):
                get_loss(name, scale=bad)
        with pytest.raises(TypeError, match="scale"):
            get_loss(name, scale="64")
        with pytest.raises(ValueError, match="reduction"):
            get_loss(name, reduction="avg")
    with pytest.raises(ValueError, match="scale"):
        norm_softmax(c, y, scale=0.0)
    for fn in (cosface, arcface, elasticface):
        with pytest.raises(ValueError, match="margin"):
            fn(c, y, margin=-0.1)
        with pytest.raises(ValueError, match="scale"):
            fn(c, y, scale=-2.0)
        with pytest.raises(ValueError, match="reduction"):
            fn(c, y, reduction="mena")
    for cls in (CosFaceLoss, ArcFaceLoss, ElasticFaceLoss):
        with pytest.raises(ValueError, match="margin"):
            cls(margin=-0.5)
    assert CosFaceLoss(margin=0.0).margin == 0.0 and ArcFaceLoss(margin=0).margin == 0.0
    with pytest.raises(ValueError, match="std"):
        elasticface(c, y, std=-0.01)
    with pytest.raises(ValueError, match="std"):
        ElasticFaceLoss(std=float("nan"))
    with pytest.raises(ValueError, match="variant"):
        elasticface(c, y, variant="sphere")
    with pytest.raises(ValueError, match="variant"):
        ElasticFaceLoss(variant="ARC")
    with pytest.raises(TypeError, match="plus"):
        elasticface(c, y, plus="yes")
    with pytest.raises(TypeError, match="generator"):
        elasticface(c, y, generator=0)
    with pytest.raises(TypeError, match="generator"):
        ElasticFaceLoss(generator="seed")
    with pytest.raises(TypeError, match="target_cosines"):
        elastic_margins(torch.tensor([1, 2]), 0.5, 0.05)
    with pytest.raises(ValueError, match="1-D"):
        elastic_margins(torch.zeros(2, 2), 0.5, 0.05)


def test_elasticface_declares_when_it_needs_the_global_batch():
    # logitsep.distributed gathers the global batch for losses that couple examples (ElasticFace+ ranks the batch)
    # or draw per-example random numbers (ElasticFace's margins when std > 0), so N processes draw what one would.
    from logitsep.distributed import couples_examples

    assert couples_examples(get_loss("elasticface", plus=True))
    assert couples_examples(get_loss("elasticface", plus=False))  # random margins (std > 0 by default)
    assert couples_examples(get_loss("elasticface", plus=True, std=0.0))
    assert not couples_examples(get_loss("elasticface", plus=False, std=0.0))  # fixed margins: per example
    assert not couples_examples(get_loss("arcface"))
