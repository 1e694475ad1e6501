"""Multi-label targets (a ``[m, k]`` 0/1 matrix) for ``bce``, ``nce``, ``batch_ce`` and ``decoupled_softmax``.

- one positive per row: each equals its single-label form on the same data;
- several positives: each equals a loop reference (plain floats, ``math``), gradients by gradcheck and against
  autograd through a naive float64 torch version;
- invalid matrices are refused with a message naming the problem.
"""

from __future__ import annotations

import math

import pytest
import torch

from logitsep.losses import (
    batch_cross_entropy,
    batch_max_margin,
    binary_cross_entropy,
    cross_entropy,
    decoupled_softmax,
    get_loss,
    nce,
)


def _lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---- loop references: z is a list of rows, T a list of 0/1 rows -----------------------------------------


def ref_bce(z, T):
    out = []
    for row, trow in zip(z, T, strict=True):
        out.append(sum(-_log_sigmoid(v) if t else -_log_sigmoid(-v) for v, t in zip(row, trow, strict=True)))
    return out


def ref_nce(z, T, num_noise=25, noise=None):
    """Every positive is one data sample with its own t noise samples: −Σ_{l∈P} log g_l − |P|·t·E_q log(1 − g)."""
    k = len(z[0])
    q = [1.0 / k] * k if noise is None else noise
    t = float(num_noise)
    out = []
    for row, trow in zip(z, T, strict=True):
        data = 0.0
        for j in range(k):
            if trow[j] and q[j] > 0:
                data -= _log_sigmoid(row[j] - math.log(t * q[j]))
        noise_expect = 0.0
        for j in range(k):
            if q[j] > 0:
                noise_expect += q[j] * _log_sigmoid(-(row[j] - math.log(t * q[j])))
        out.append(data - sum(trow) * t * noise_expect)
    return out


def ref_batch_ce(z, T):
    """Returns (per-row sums, N): P_B = 1/N on each of the N positive pairs of the whole batch."""
    log_total = _lse([v for row in z for v in row])
    n = sum(sum(trow) for trow in T)
    rows = []
    for row, trow in zip(z, T, strict=True):
        rows.append(sum(-math.log(n) - (v - log_total) for v, t in zip(row, trow, strict=True) if t))
    return rows, n


def ref_decoupled(z, T):
    out = []
    for row, trow in zip(z, T, strict=True):
        negatives = [v for v, t in zip(row, trow, strict=True) if not t]
        terms = [v - _lse([v, *negatives]) for v, t in zip(row, trow, strict=True) if t]
        out.append(-sum(terms) / len(terms))
    return out


def reduce_ref(name, z, T, reduction, **kw):
    if name == "batch_ce":
        rows, n = ref_batch_ce(z, T)
        if reduction == "none":
            return torch.tensor(rows, dtype=torch.float64)
        return torch.tensor(math.fsum(rows) / (n if reduction == "mean" else 1), dtype=torch.float64)
    rows = {"bce": ref_bce, "nce": ref_nce, "decoupled_softmax": ref_decoupled}[name](z, T, **kw)
    if reduction == "none":
        return torch.tensor(rows, dtype=torch.float64)
    return torch.tensor(math.fsum(rows) / (len(rows) if reduction == "mean" else 1), dtype=torch.float64)


# ---- naive float64 torch versions (autograd gradients) --------------------------------------------------


def tref(name, z, T, **kw):
    """Per-row values (batch_ce: the KL itself) from explicit exp/log/sigmoid; T is a 0/1 float64 tensor."""
    if name == "bce":
        p = torch.sigmoid(z)
        return -(T * torch.log(p) + (1 - T) * torch.log(1 - p)).sum(1)
    if name == "nce":
        k = z.shape[1]
        noise = [1.0 / k] * k if kw.get("noise") is None else kw["noise"]
        q = torch.tensor(noise, dtype=torch.float64)
        t = float(kw.get("num_noise", 25))
        g = torch.sigmoid(z - torch.log(t * q))
        return -(T * torch.log(g)).sum(1) - T.sum(1) * t * (q * torch.log(1 - g)).sum(1)
    if name == "batch_ce":
        big_q = torch.exp(z) / torch.exp(z).sum()
        n = T.sum()
        return (T * (-torch.log(n) - torch.log(big_q))).sum() / n
    if name == "decoupled_softmax":
        e = torch.exp(z)
        neg = ((1 - T) * e).sum(1, keepdim=True)
        return -(T * torch.log(e / (e + neg))).sum(1) / T.sum(1)
    raise AssertionError(name)


FUNCTIONS = {
    "bce": binary_cross_entropy,
    "nce": nce,
    "batch_ce": batch_cross_entropy,
    "decoupled_softmax": decoupled_softmax,
}
SINGLE_LABEL_FORM = {  # what each loss is for one positive per row, and what it must equal
    "bce": binary_cross_entropy,
    "nce": nce,
    "batch_ce": batch_cross_entropy,
    "decoupled_softmax": cross_entropy,
}
NOISE = [0.25, 0.05, 0.2, 0.3, 0.2]  # k = 5, non-uniform
KWARGS = {
    "bce": [{}],
    "nce": [{"num_noise": 25}, {"num_noise": 4, "noise": NOISE}],
    "batch_ce": [{}],
    "decoupled_softmax": [{}],
}
LOSS_CASES = [(name, kw) for name, kws in KWARGS.items() for kw in kws]
LOSS_IDS = [name + ("_noise" if "noise" in kw else "") for name, kw in LOSS_CASES]
M, K = 5, 5


def lib_kwargs(kw):
    out = dict(kw)
    if "noise" in out:
        out["noise"] = torch.tensor(out["noise"], dtype=torch.float64)
    return out


def logits(seed=0, m=M, k=K):
    return 2.0 * torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Several positives per row: 1, 2, 3, 1, 4 positives.
MULTI = torch.tensor(
    [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
        [0, 0, 0, 0, 1],
        [1, 1, 1, 1, 0],
    ]
)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("encoding", [torch.long, torch.uint8, torch.float32, torch.float64, torch.bool], ids=str)
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES, ids=LOSS_IDS)
def test_one_positive_per_row_equals_single_label(name, kw, encoding, reduction):
    z = logits(1)
    y = torch.tensor([3, 0, 4, 4, 1])
    T = torch.zeros(M, K, dtype=encoding)
    T[torch.arange(M), y] = 1
    matrix = FUNCTIONS[name](z, T, reduction=reduction, **lib_kwargs(kw))
    indices = SINGLE_LABEL_FORM[name](z, y, reduction=reduction, **lib_kwargs(kw))
    torch.testing.assert_close(matrix, indices, rtol=1e-12, atol=1e-12)
    # and both are the loop reference (not merely equal to each other)
    torch.testing.assert_close(matrix, reduce_ref(name, z.tolist(), T.long().tolist(), reduction, **kw),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES, ids=LOSS_IDS)
def test_several_positives_match_loop_reference(name, kw, reduction):
    for seed in (2, 3):
        z = logits(seed)
        got = FUNCTIONS[name](z, MULTI, reduction=reduction, **lib_kwargs(kw))
        expected = reduce_ref(name, z.tolist(), MULTI.tolist(), reduction, **kw)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "kw"), LOSS_CASES, ids=LOSS_IDS)
def test_several_positives_differ_from_first_positive_only(name, kw):
    """The extra positives matter: the value is not that of the first positive of each row."""
    z = logits(2)
    first = MULTI.float().argmax(1)
    got = FUNCTIONS[name](z, MULTI, **lib_kwargs(kw))
    single = SINGLE_LABEL_FORM[name](z, first, **lib_kwargs(kw))
    assert abs(got.item() - single.item()) > 1e-3


@pytest.mark.parametrize(("name", "kw"), LOSS_CASES, ids=LOSS_IDS)
def test_several_positives_gradient(name, kw):
    z = logits(4).requires_grad_(True)
    T = MULTI
    out = FUNCTIONS[name](z, T, **lib_kwargs(kw))
    out.backward()
    z_ref = z.detach().clone().requires_grad_(True)
    ref_value = tref(name, z_ref, T.double(), **kw)
    ref_value = ref_value if ref_value.dim() == 0 else ref_value.mean()
    torch.testing.assert_close(out.detach(), ref_value.detach(), rtol=1e-10, atol=1e-12)
    ref_value.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-9, atol=1e-12)
    kwargs = lib_kwargs(kw)
    small = logits(5)[:3].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: FUNCTIONS[name](x, T[:3], reduction="sum", **kwargs), (small,))


def test_batch_ce_is_uniform_over_pairs_not_rows():
    """P_B = 1/N on each positive pair: a row with 4 positives weighs 4 times a row with 1."""
    z = logits(6)
    got = batch_cross_entropy(z, MULTI).item()
    log_q = (z - torch.logsumexp(z.flatten(), 0)).tolist()
    pairs = [(i, j) for i in range(M) for j in range(K) if MULTI[i, j]]
    n = len(pairs)
    pair_uniform = -math.log(n) - sum(log_q[i][j] for i, j in pairs) / n
    row_uniform = sum(  # the alternative P(i, j) = 1/(m·n_i)
        (1 / (M * len(ps))) * (-math.log(M * len(ps)) - log_q[i][j])
        for i, ps in enumerate([[j for j in range(K) if MULTI[i, j]] for i in range(M)])
        for j in ps
    )
    assert got == pytest.approx(pair_uniform, rel=1e-12)
    assert abs(got - row_uniform) > 1e-3


def test_batch_ce_rows_without_positives_are_allowed():
    """P_B is over the pairs of the batch: a row with no positive only enters through Q_B."""
    z = logits(7)
    T = MULTI.clone()
    T[3] = 0
    got = batch_cross_entropy(z, T, reduction="none")
    expected = reduce_ref("batch_ce", z.tolist(), T.tolist(), "none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[3].item() == 0.0
    z2 = z.clone()
    z2[3] += 5.0  # raising the logits of a row without positives raises the loss (through Q_B)
    assert batch_cross_entropy(z2, T).item() > batch_cross_entropy(z, T).item()


def test_bce_allows_rows_without_positives():
    z = logits(8)
    T = MULTI.clone()
    T[1] = 0
    got = binary_cross_entropy(z, T, reduction="none")
    torch.testing.assert_close(got, reduce_ref("bce", z.tolist(), T.tolist(), "none"), rtol=1e-10, atol=1e-12)


def test_decoupled_softmax_all_positive_row():
    """A row where every class is positive has no competitor: its loss is 0 and its gradient 0 (not NaN)."""
    z = logits(9).requires_grad_(True)
    T = MULTI.clone()
    T[2] = 1
    out = decoupled_softmax(z, T, reduction="none")
    assert out[2].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[2].abs().max().item() == 0.0
    torch.testing.assert_close(out.detach(), reduce_ref("decoupled_softmax", z.tolist(), T.tolist(), "none"),
                               rtol=1e-10, atol=1e-12)


def test_decoupled_softmax_positives_do_not_compete():
    """Raising another positive leaves a positive's term unchanged; raising a negative increases it."""
    z = torch.tensor([[1.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    T = torch.tensor([[1, 1, 0, 0]])
    base = decoupled_softmax(z, T).item()
    z_pos = z.clone()
    z_pos[0, 1] += 3.0
    z_neg = z.clone()
    z_neg[0, 2] += 3.0
    # only term l=1 changes (its own logit went up): loss decreases, term l=0 untouched
    expected = -0.5 * ((1.0 - _lse([1.0, 0.0, -1.0])) + (5.0 - _lse([5.0, 0.0, -1.0])))
    assert decoupled_softmax(z_pos, T).item() == pytest.approx(expected, rel=1e-12)
    assert decoupled_softmax(z_neg, T).item() > base


def test_nce_sampled_multilabel_averages_to_exact():
    g = torch.Generator().manual_seed(3)
    z = logits(10)[:2]
    T = MULTI[1:3]  # 2 and 3 positives
    draws = 2000
    per_row = nce(z.repeat_interleave(draws, 0), T.repeat_interleave(draws, 0), num_noise=5, sampled=True,
                  generator=g, reduction="none")
    exact = ref_nce(z.tolist(), T.tolist(), num_noise=5)
    for r in range(2):
        samples = per_row[r * draws:(r + 1) * draws]
        se = samples.std().item() / math.sqrt(draws)
        assert se > 0
        assert abs(samples.mean().item() - exact[r]) < 5 * se


def test_module_forms_take_matrices():
    z = logits(11)
    for name in FUNCTIONS:
        got = get_loss(name)(z, MULTI)
        assert got.item() == pytest.approx(reduce_ref(name, z.tolist(), MULTI.tolist(), "mean").item(), rel=1e-10)


# ---- invalid matrices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("bad", [2, -1, 0.5, math.nan], ids=["2", "-1", "0.5", "nan"])
def test_values_other_than_0_1(name, bad):
    T = MULTI.double()
    T[1, 2] = bad
    with pytest.raises(ValueError, match=r"multi-label target must contain only 0 and 1"):
        FUNCTIONS[name](logits(), T)
    if bad == 2:
        with pytest.raises(ValueError, match=r"multi-label target must contain only 0 and 1"):
            FUNCTIONS[name](logits(), (MULTI * 2))


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shape", [(M, K + 1), (M + 1, K), (M - 1, K), (K, M + 1)])
def test_wrong_shape(name, shape):
    with pytest.raises(ValueError, match=rf"multi-label target must have the logits' shape \({M}, {K}\)"):
        FUNCTIONS[name](logits(), torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_complex_target(name):
    with pytest.raises(TypeError, match=r"target must be real"):
        FUNCTIONS[name](logits(), MULTI.to(torch.complex64))


@pytest.mark.parametrize(("name", "msg"), [
    ("nce", r"nce: every row of a multi-label target needs at least one positive"),
    ("decoupled_softmax", r"decoupled_softmax: every row needs at least one positive; rows \[1, 3\] have none"),
])
def test_rows_without_positives_refused_where_needed(name, msg):
    T = MULTI.clone()
    T[1] = 0
    T[3] = 0
    with pytest.raises(ValueError, match=msg):
        FUNCTIONS[name](logits(), T)


def test_batch_ce_needs_one_positive_pair():
    with pytest.raises(ValueError, match=r"batch_ce: the multi-label target has no positive pair"):
        batch_cross_entropy(logits(), torch.zeros(M, K, dtype=torch.long))


def test_batch_max_margin_refuses_matrices():
    with pytest.raises(ValueError, match=r"batch_max_margin: target must be 1-D.*no multi-label"):
        batch_max_margin(logits(), MULTI)
