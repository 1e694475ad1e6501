"""The paper's Section III counter-example (Keren, Sabato & Schuller, ICDM 2018).

Two examples, two classes: z(x₁) = (2α, α) with label 0 and z(x₂) = (−2α, −α) with label 1. Each example's
true logit is its larger one, so cross-entropy and max-margin (γ = 1, α ≥ γ) go to 0 as α grows, yet the
PoLS is violated: the true logit of x₂ (−α) is below the false logit of x₁ (α). A PoLS-aligned loss can
not be small here: it stays bounded away from 0 (in fact it grows with α).
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from logitsep.losses import LOSSES, get_loss

ALPHAS = [1.0, 5.0, 20.0, 50.0]
NOT_ALIGNED = ["ce", "max_margin"]
ALIGNED = ["self_norm", "nce", "bce", "batch_ce", "batch_max_margin"]
NOT_ESTABLISHED = ["z_loss", "decoupled_softmax"]
TARGET = torch.tensor([0, 1])


def counterexample(alpha: float, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([[2 * alpha, alpha], [-2 * alpha, -alpha]], dtype=dtype)


def values(name: str, dtype=torch.float64) -> list[float]:
    loss = get_loss(name, margin=1.0) if "margin" in name else get_loss(name)
    return [loss(counterexample(a, dtype), TARGET).item() for a in ALPHAS]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_the_example_violates_the_pols(alpha):
    z = counterexample(alpha)
    true_logits = z[torch.arange(2), TARGET]
    false_logits = z[torch.arange(2), 1 - TARGET]
    # within each example the true logit wins ...
    assert bool((true_logits > false_logits).all())
    # ... but across examples a false logit beats a true one
    assert true_logits.min().item() == -alpha
    assert false_logits.max().item() == alpha
    assert true_logits.min() < false_logits.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", NOT_ALIGNED)
def test_non_aligned_losses_go_to_zero(name, dtype):
    assert LOSSES[name].pols_aligned is False
    vals = values(name, dtype)
    if name == "ce":
        # −log softmax = log(1 + e^{−α}) for both examples
        for a, v in zip(ALPHAS, vals, strict=True):
            assert v == pytest.approx(math.log1p(math.exp(-a)), rel=1e-5, abs=1e-7)
        assert all(later <= earlier for earlier, later in pairwise(vals))
        assert vals[0] > 0.3  # log(1 + e^{-1}) = 0.313: the decrease is real
    else:
        # max(0, 1 − 2α + α) = max(0, 1 − α) = 0 for α ≥ γ = 1
        assert vals == [0.0] * len(ALPHAS)
    assert vals[-1] < 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ALIGNED)
def test_aligned_losses_stay_large(name, dtype):
    assert LOSSES[name].pols_aligned is True
    vals = values(name, dtype)
    assert all(math.isfinite(v) for v in vals)
    assert min(vals) > 0.5, vals
    assert all(later > earlier for earlier, later in pairwise(vals)), vals
    assert vals[-1] > 20, vals  # at α = 50 every aligned loss is at least of order α


def test_aligned_values_by_hand():
    """A few closed forms at α = 20 (terms below e^{−20} neglected)."""
    a = 20.0
    z = counterexample(a)
    # bce: x₁'s false logit α and x₂'s true logit −α each cost ≈ α (softplus(α)): mean over 2 examples ≈ α
    assert get_loss("bce")(z, TARGET).item() == pytest.approx(a, rel=1e-6)
    # batch max-margin: z₊ = −α, z₋ = α: (1/2)·(1 + 2α), per-example hinges 0
    assert get_loss("batch_max_margin")(z, TARGET).item() == pytest.approx((1 + 2 * a) / 2, rel=1e-12)
    # batch ce: lse of all four ≈ 2α; log Q at the true pairs ≈ 0 and −3α: −log 2 + (0 + 3α)/2
    assert get_loss("batch_ce")(z, TARGET).item() == pytest.approx(-math.log(2) + 1.5 * a, rel=1e-6)


@pytest.mark.parametrize("name", NOT_ESTABLISHED)
def test_losses_of_unknown_alignment_are_marked_none(name):
    assert LOSSES[name].pols_aligned is None


def test_alignment_flags_of_every_family_loss():
    expected = {**dict.fromkeys(NOT_ALIGNED, False), **dict.fromkeys(ALIGNED, True),
                **dict.fromkeys(NOT_ESTABLISHED, None)}
    for name, flag in expected.items():
        assert LOSSES[name].pols_aligned is flag, name
    for name, cls in LOSSES.items():  # any other registered loss: per DESIGN.md, "measure it"
        if name not in expected:
            assert cls.pols_aligned is None, name
