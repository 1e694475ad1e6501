"""Bad input, for every loss of the softmax, margin, binary, batch and spherical families, in both forms
(functional and the registry's module): the exception type and a message that names the problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitsep.losses import (
    LOSSES,
    batch_cross_entropy,
    batch_max_margin,
    binary_cross_entropy,
    cross_entropy,
    decoupled_softmax,
    get_loss,
    max_margin,
    nce,
    self_normalization,
    z_loss,
)

FUNCTIONS = {
    "ce": cross_entropy,
    "max_margin": max_margin,
    "self_norm": self_normalization,
    "nce": nce,
    "bce": binary_cross_entropy,
    "batch_ce": batch_cross_entropy,
    "batch_max_margin": batch_max_margin,
    "z_loss": z_loss,
    "decoupled_softmax": decoupled_softmax,
}
NAMES = list(FUNCTIONS)
BATCH = {"batch_ce", "batch_max_margin"}
MULTILABEL = {"bce", "nce", "batch_ce", "decoupled_softmax"}
SINGLE_LABEL = [n for n in NAMES if n not in MULTILABEL]
FORMS = ["functional", "module"]
M, K = 4, 5


def call(name: str, form: str, logits, target, **kwargs):
    if form == "functional":
        return FUNCTIONS[name](logits, target, **kwargs)
    return get_loss(name, **kwargs)(logits, target)


def good_logits() -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(0))


def good_target() -> torch.Tensor:
    return torch.tensor([0, 4, 2, 1])


def test_families_are_registered():
    assert set(NAMES) <= set(LOSSES)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_valid_input_is_accepted(name, form):
    """Positive control: the inputs below differ from this one only in the defect under test."""
    out = call(name, form, good_logits(), good_target())
    assert out.dim() == 0 and torch.isfinite(out)


# ---- logits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(M,), (2, M, K), ()], ids=["1d", "3d", "0d"])
def test_logits_not_2d(name, form, shape):
    with pytest.raises(ValueError, match=r"logits must be 2-D"):
        call(name, form, torch.zeros(shape), good_target())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [good_logits().tolist(), good_logits().numpy(), None], ids=["list", "numpy", "none"])
def test_logits_not_a_tensor(name, form, bad):
    with pytest.raises(TypeError, match=r"logits must be a torch.Tensor"):
        call(name, form, bad, good_target())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_logits_integer(name, form, dtype):
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor.*" + str(dtype)):
        call(name, form, torch.ones(M, K, dtype=dtype), good_target())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_logits_not_finite(name, form, bad):
    z = good_logits()
    z[2, 3] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        call(name, form, z, good_target())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_one_class_or_empty(name, form):
    with pytest.raises(ValueError, match=r"at least 2 classes"):
        call(name, form, torch.zeros(M, 1), torch.zeros(M, dtype=torch.long))
    with pytest.raises(ValueError, match=r"empty batch"):
        call(name, form, torch.zeros(0, K), torch.zeros(0, dtype=torch.long))


# ---- target ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_target_not_integer(name, form, dtype):
    with pytest.raises(TypeError, match=r"target must be an integer tensor of class indices.*" + str(dtype)):
        call(name, form, good_logits(), good_target().to(dtype))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_target_not_a_tensor(name, form):
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor, got list"):
        call(name, form, good_logits(), [0, 4, 2, 1])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad_value", [-1, K, K + 10], ids=["negative", "k", "above_k"])
def test_target_out_of_range(name, form, bad_value):
    y = good_target()
    y[1] = bad_value
    with pytest.raises(ValueError, match=r"target values must be in \[0, 5\) for 5 classes"):
        call(name, form, good_logits(), y)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [M - 1, M + 1])
def test_target_length_mismatch(name, form, n):
    with pytest.raises(ValueError, match=rf"target has {n} entries but logits have {M} rows"):
        call(name, form, good_logits(), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
def test_target_wrong_rank(name, form):
    with pytest.raises(ValueError, match=r"target must be .*\[batch\]"):
        call(name, form, good_logits(), torch.zeros(M, K, 1, dtype=torch.long))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SINGLE_LABEL)
def test_single_label_losses_refuse_matrix_target(name, form):
    t = torch.zeros(M, K, dtype=torch.long)
    t[torch.arange(M), good_target()] = 1
    with pytest.raises(ValueError, match=r"takes no multi-label targets"):
        call(name, form, good_logits(), t)


# ---- batch losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(BATCH))
def test_batch_loss_needs_two_examples(name, form):
    with pytest.raises(ValueError, match=r"needs at least 2 examples, got 1"):
        call(name, form, good_logits()[:1], good_target()[:1])
    assert torch.isfinite(call(name, form, good_logits()[:2], good_target()[:2]))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", [n for n in NAMES if n not in BATCH])
def test_per_example_loss_accepts_one_example(name, form):
    assert torch.isfinite(call(name, form, good_logits()[:1], good_target()[:1]))


# ---- parameters -----------------------------------------------------------------------------------------

POSITIVE_PARAMS = [
    ("max_margin", "margin"),
    ("batch_max_margin", "margin"),
    ("self_norm", "alpha"),
    ("z_loss", "a"),
    ("nce", "num_noise"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("name", "param"), POSITIVE_PARAMS)
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, math.inf, math.nan])
def test_non_positive_parameter(name, param, value, form):
    with pytest.raises(ValueError, match=rf"{param} must be finite and > 0"):
        call(name, form, good_logits(), good_target(), **{param: value})


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("name", "param"), POSITIVE_PARAMS)
@pytest.mark.parametrize("value", ["1", None, True], ids=["str", "none", "bool"])
def test_parameter_not_a_number(name, param, value, form):
    with pytest.raises(TypeError, match=rf"{param} must be a real number"):
        call(name, form, good_logits(), good_target(), **{param: value})


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("value", ["2", None])
def test_z_loss_b_must_be_a_number(form, value):
    with pytest.raises(TypeError, match=r"b must be a real number"):
        call("z_loss", form, good_logits(), good_target(), b=value)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_z_loss_b_must_be_finite(form, value):
    with pytest.raises(ValueError, match=r"b must be finite"):
        call("z_loss", form, good_logits(), good_target(), b=value)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["avg", "MEAN", None, "batchmean"])
def test_unknown_reduction(name, form, reduction):
    with pytest.raises(ValueError, match=r"reduction must be one of \(.*'mean'.*\), got " + repr(reduction)):
        call(name, form, good_logits(), good_target(), reduction=reduction)


@pytest.mark.parametrize("form", FORMS)
def test_batch_max_margin_refuses_none(form):
    with pytest.raises(ValueError, match=r"batch_max_margin: reduction must be one of \('mean', 'sum'\), got 'none'"):
        call("batch_max_margin", form, good_logits(), good_target(), reduction="none")


# ---- NCE noise distribution -----------------------------------------------------------------------------


BAD_NOISE = [
    (torch.full((K + 1,), 1.0 / (K + 1)), ValueError, r"noise must be a probability vector of length 5"),
    (torch.full((K - 1,), 1.0 / (K - 1)), ValueError, r"noise must be a probability vector of length 5"),
    (torch.full((1, K), 1.0 / K), ValueError, r"noise must be a probability vector of length 5"),
    (torch.tensor([0.5, -0.1, 0.2, 0.2, 0.2]), ValueError, r"noise must have finite, non-negative entries"),
    (torch.tensor([0.5, math.nan, 0.2, 0.2, 0.1]), ValueError, r"noise must have finite, non-negative entries"),
    (torch.tensor([0.5, 0.1, 0.2, 0.2, 0.2]), ValueError, r"noise must sum to 1, got 1\.2"),
    (torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1]), ValueError, r"noise must sum to 1, got 0\.5"),
    ([0.2] * K, TypeError, r"noise must be a torch.Tensor or None, got list"),
    (np.full(K, 0.2), TypeError, r"noise must be a torch.Tensor or None, got ndarray"),
    (torch.tensor([1, 0, 0, 0, 0]), TypeError, r"noise must be a floating-point probability vector"),
]
BAD_NOISE_IDS = ["long", "short", "2d", "negative", "nan", "sum>1", "sum<1", "list", "numpy", "integer"]


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize(("noise", "exc", "msg"), BAD_NOISE, ids=BAD_NOISE_IDS)
def test_nce_bad_noise_functional(noise, exc, msg, sampled):
    with pytest.raises(exc, match=msg):
        nce(good_logits(), good_target(), noise=noise, sampled=sampled)


@pytest.mark.parametrize(("noise", "exc", "msg"), BAD_NOISE, ids=BAD_NOISE_IDS)
def test_nce_bad_noise_module(noise, exc, msg):
    """The module refuses what it can at construction; a wrong length shows only against the logits."""
    wrong_length = "length 5" in msg and noise.dim() == 1
    if wrong_length:
        loss = get_loss("nce", noise=noise)
        with pytest.raises(exc, match=msg):
            loss(good_logits(), good_target())
    else:
        with pytest.raises(exc, match=msg.replace("length 5", "length")):
            get_loss("nce", noise=noise)


def test_nce_valid_noise_with_zero_entry_is_accepted():
    q = torch.tensor([0.5, 0.0, 0.2, 0.2, 0.1])
    assert torch.isfinite(nce(good_logits(), good_target(), noise=q))
    assert torch.isfinite(get_loss("nce", noise=q)(good_logits(), good_target()))


# ---- get_loss -------------------------------------------------------------------------------------------


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss 'cross_entropy'; valid names: ") as info:
        get_loss("cross_entropy")
    message = str(info.value)
    for name in LOSSES:
        assert name in message
    listed = message.split("valid names: ", 1)[1].split(", ")
    assert listed == sorted(LOSSES)


def test_get_loss_name_not_a_string():
    with pytest.raises(TypeError, match=r"loss name must be a string, got int"):
        get_loss(3)


@pytest.mark.parametrize("name", NAMES)
def test_get_loss_unknown_kwarg(name):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'gamma'"):
        get_loss(name, gamma=1.0)


def test_value_checks_can_be_turned_off_and_only_the_value_checks(monkeypatch):
    """Inside ``value_checks(False)`` no check reads a tensor value (on a GPU each read waits for the device):
    NaN logits, out-of-range classes, non-0/1 targets and cosines beyond [-1, 1] pass the checks; shape, dtype
    and argument checks still raise. The block restores the previous state, also after an exception."""
    import logitsep.core.checks as checks
    from logitsep.core.checks import check_logits, check_target
    from logitsep.losses import get_loss, value_checks, value_checks_enabled

    nan_logits = torch.tensor([[0.0, float("nan")], [1.0, 2.0]])
    assert value_checks_enabled()
    with pytest.raises(ValueError, match="NaN"):
        check_logits(nan_logits, "ce")
    with value_checks(False):
        assert not value_checks_enabled()

        def no_reads(*args, **kwargs):
            raise AssertionError("a value check read the tensor")

        with monkeypatch.context() as m:  # nothing below may reduce a tensor to a Python number
            m.setattr(torch, "aminmax", no_reads)
            m.setattr(torch, "isfinite", no_reads)
            m.setattr(checks.math, "isfinite", no_reads)
            assert check_logits(nan_logits, "ce") is nan_logits
            assert check_target(torch.tensor([0, 7]), nan_logits, "ce").tolist() == [0, 7]
            assert check_target(torch.tensor([[2, 0], [0, 1]]), nan_logits, "bce", multilabel=True).dtype == torch.bool
        with pytest.raises(ValueError, match="2-D"):
            check_logits(torch.zeros(3), "ce")
        with pytest.raises(TypeError, match="integer"):
            check_target(torch.tensor([0.0, 1.0]), nan_logits, "ce")
        cos = get_loss("cosface")(torch.tensor([[1.5, -0.2], [0.3, 0.1]]), torch.tensor([0, 1]))
        clamped = get_loss("cosface")(torch.tensor([[1.0, -0.2], [0.3, 0.1]]), torch.tensor([0, 1]))
        torch.testing.assert_close(cos, clamped)  # beyond [-1, 1]: clamped, not refused
        with pytest.raises(RuntimeError):
            with value_checks(True):
                assert value_checks_enabled()
                raise RuntimeError("inner")
        assert not value_checks_enabled()
    assert value_checks_enabled()
    with pytest.raises(ValueError, match=r"cosines must lie in \[-1, 1\]"):
        get_loss("cosface")(torch.tensor([[1.5, -0.2], [0.3, 0.1]]), torch.tensor([0, 1]))
