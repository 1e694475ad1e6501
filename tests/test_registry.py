"""The loss registry: names, ``get_loss`` keyword pass-through, class attributes, module vs functional form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from logitsep.losses import (
    LOSSES,
    BatchCrossEntropyLoss,
    BatchMaxMarginLoss,
    BinaryCrossEntropyLoss,
    CrossEntropyLoss,
    DecoupledSoftmaxLoss,
    MaxMarginLoss,
    NCELoss,
    SelfNormalizationLoss,
    ZLoss,
    batch_cross_entropy,
    batch_max_margin,
    binary_cross_entropy,
    cross_entropy,
    decoupled_softmax,
    get_loss,
    max_margin,
    nce,
    register,
    self_normalization,
    z_loss,
)

# name -> (module class, functional form, non-default keyword arguments, PoLS alignment per DESIGN.md)
FAMILIES = {
    "ce": (CrossEntropyLoss, cross_entropy, {}, False),
    "max_margin": (MaxMarginLoss, max_margin, {"margin": 2.5}, False),
    "self_norm": (SelfNormalizationLoss, self_normalization, {"alpha": 0.7}, True),
    "nce": (NCELoss, nce, {"num_noise": 3, "noise": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])}, True),
    "bce": (BinaryCrossEntropyLoss, binary_cross_entropy, {}, True),
    "batch_ce": (BatchCrossEntropyLoss, batch_cross_entropy, {}, True),
    "batch_max_margin": (BatchMaxMarginLoss, batch_max_margin, {"margin": 3.0}, True),
    "z_loss": (ZLoss, z_loss, {"a": 2.0, "b": 0.5}, None),
    "decoupled_softmax": (DecoupledSoftmaxLoss, decoupled_softmax, {}, None),
}

# Every name of DESIGN.md's loss table, with its "PoLS-aligned" column ("measure it" = None).
DESIGN_ALIGNMENT = {
    "ce": False,
    "max_margin": False,
    "self_norm": True,
    "nce": True,
    "bce": True,
    "batch_ce": True,
    "batch_max_margin": True,
    "z_loss": None,
    "smooth_topk_svm": None,
    "cosface": None,
    "arcface": None,
    "elasticface": None,
    "norm_softmax": None,
    "decoupled_softmax": None,
}


def data():
    g = torch.Generator().manual_seed(1)
    return 2 * torch.randn(6, 5, generator=g), torch.tensor([0, 4, 2, 1, 3, 3])


def test_registry_contains_the_family_names():
    names = sorted(LOSSES)
    for name in FAMILIES:
        assert name in names
    assert names == sorted(set(names))


def test_every_registered_name_is_in_the_design_table():
    """Registry names are a public contract: nothing outside DESIGN.md's table may appear."""
    assert set(LOSSES) <= set(DESIGN_ALIGNMENT)


@pytest.mark.parametrize("name", sorted(DESIGN_ALIGNMENT))
def test_pols_aligned_matches_design(name):
    assert name in LOSSES, f"{name} is in DESIGN.md's table but not registered"
    assert LOSSES[name].pols_aligned is DESIGN_ALIGNMENT[name]
    assert get_loss(name).pols_aligned is DESIGN_ALIGNMENT[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_class_attributes(name):
    cls, _, _, aligned = FAMILIES[name]
    assert LOSSES[name] is cls
    assert issubclass(cls, nn.Module)
    assert cls.name == name
    assert cls.pols_aligned is aligned
    module = get_loss(name)
    assert type(module) is cls
    assert module.name == name
    assert module.pols_aligned is aligned


@pytest.mark.parametrize(("name", "reduction"), [(name, reduction) for name in FAMILIES
                                                   for reduction in ("mean", "sum", "none")
                                                   if (name, reduction) != ("batch_max_margin", "none")])
def test_module_and_functional_agree(name, reduction):
    cls, fn, kwargs, _ = FAMILIES[name]
    z, y = data()
    module = get_loss(name, reduction=reduction, **kwargs)
    got = module(z, y)
    expected = fn(z, y, reduction=reduction, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.shape == (() if reduction != "none" else (6,))


@pytest.mark.parametrize("name", [n for n, v in FAMILIES.items() if v[2]])
def test_get_loss_passes_kwargs_through(name):
    """The non-default keyword arguments change the value, and the module reproduces the functional form
    with them (so they were not dropped on the way)."""
    _, fn, kwargs, _ = FAMILIES[name]
    z, y = data()
    with_kwargs = get_loss(name, **kwargs)(z, y)
    default = get_loss(name)(z, y)
    assert abs(with_kwargs.item() - default.item()) > 1e-4
    torch.testing.assert_close(with_kwargs, fn(z, y, **kwargs))
    for key, value in kwargs.items():
        stored = getattr(get_loss(name, **kwargs), key)
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(stored, value)
        else:
            assert stored == value


def test_get_loss_reduction_kwarg():
    z, y = data()
    total = get_loss("ce", reduction="sum")(z, y)
    mean = get_loss("ce")(z, y)
    assert total.item() == pytest.approx(6 * mean.item(), rel=1e-6)


def test_get_loss_returns_new_instances():
    assert get_loss("ce") is not get_loss("ce")


def test_nce_module_sampled_uses_its_generator():
    z, y = data()
    a = get_loss("nce", num_noise=4, sampled=True, generator=torch.Generator().manual_seed(0))(z, y)
    b = get_loss("nce", num_noise=4, sampled=True, generator=torch.Generator().manual_seed(0))(z, y)
    exact = get_loss("nce", num_noise=4)(z, y)
    assert a.item() == b.item()
    assert a.item() != exact.item()


def test_nce_module_noise_is_a_buffer():
    q = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    module = get_loss("nce", noise=q)
    assert "noise" in dict(module.named_buffers())
    q[0] = 0.5  # the module keeps its own copy
    assert module.noise[0].item() == pytest.approx(0.1)
    assert "noise" not in dict(get_loss("nce").named_buffers())  # None buffers are not listed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_nce_module_survives_a_dtype_cast(dtype):
    """``.to(dtype)`` casts the noise buffer; a half-precision q sums to 1 only within its own eps."""
    q = torch.full((10,), 0.1)
    module = get_loss("nce", num_noise=4, noise=q).to(dtype)
    assert module.noise.dtype == dtype
    z = torch.randn(3, 10, generator=torch.Generator().manual_seed(2)).to(dtype)
    y = torch.tensor([0, 5, 9])
    expected = nce(z.double(), y, num_noise=4)  # uniform q = 0.1 exactly
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(module(z, y).double(), expected, rtol=tol, atol=tol)


def test_nce_half_noise_still_refused_when_far_from_one():
    with pytest.raises(ValueError, match=r"noise must sum to 1"):
        nce(torch.randn(2, 4), torch.tensor([0, 1]), noise=torch.tensor([0.3, 0.3, 0.3, 0.3], dtype=torch.float16))


def test_register_refuses_a_duplicate_name():
    before = dict(LOSSES)

    class Dummy(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"loss 'ce' is registered twice"):
        register("ce", pols_aligned=False, functional=cross_entropy)(Dummy)
    assert LOSSES == before
    assert LOSSES["ce"] is CrossEntropyLoss


def test_batch_max_margin_has_no_per_example_value():
    """``z₊`` and ``z₋`` are taken over the whole batch: ``reduction="none"`` is refused, by both forms."""
    z, y = data()
    with pytest.raises(ValueError, match="reduction"):
        batch_max_margin(z, y, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        get_loss("batch_max_margin", reduction="none")(z, y)
