"""Heads with single-logit scoring (``logitsep.heads``): the cosine head."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from logitsep.heads import CosineHead, LinearHead
from logitsep.losses.cosine import arcface
from logitsep.losses.spherical import z_score
from logitsep.models import build_model


def ref_cosines(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Row by row in float64 with math.sqrt: cos_ij = h_i·w_j / (‖h_i‖·‖w_j‖)."""
    h, w = h.double().tolist(), w.double().tolist()
    out = []
    for hi in h:
        nh = math.sqrt(math.fsum(v * v for v in hi))
        row = []
        for wj in w:
            nw = math.sqrt(math.fsum(v * v for v in wj))
            row.append(math.fsum(a * b for a, b in zip(hi, wj, strict=True)) / (nh * nw))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def make_head(d: int = 6, k: int = 9, scale: float = 1.0, seed: int = 0) -> CosineHead:
    torch.manual_seed(seed)
    return CosineHead(d, k, scale=scale)


def test_forward_gives_cosines(gen) -> None:
    head = make_head()
    assert tuple(head.weight.shape) == (9, 6)
    h = torch.randn(5, 6, generator=gen)
    cos = head(h)
    assert tuple(cos.shape) == (5, 9) and cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref_cosines(h, head.weight.detach()), rtol=1e-6, atol=1e-6)
    # invariant to the norm of the embedding and of the class weights
    torch.testing.assert_close(head(3.5 * h), cos)
    with torch.no_grad():
        head.weight.mul_(torch.arange(1, 10, dtype=torch.float32)[:, None])
    torch.testing.assert_close(head(h), cos)


def test_cosines_stay_in_range_and_hit_plus_minus_one(gen) -> None:
    head = make_head(d=32, k=4)
    w = head.weight.detach()
    h = torch.cat([w[:2] * 7.3, -w[2:3] * 0.01, torch.randn(100, 32, generator=gen)])
    cos = head(h).detach()
    assert float(cos.min()) >= -1.0 and float(cos.max()) <= 1.0
    torch.testing.assert_close(cos[0, 0], torch.tensor(1.0))
    torch.testing.assert_close(cos[1, 1], torch.tensor(1.0))
    torch.testing.assert_close(cos[2, 2], torch.tensor(-1.0))
    # the arcface gradient through the head is finite when an embedding sits on its class centre
    hh = h.clone().requires_grad_(True)
    arcface(head(hh), torch.tensor([0, 1, 2] + [3] * 100)).backward()
    assert bool(torch.isfinite(hh.grad).all()) and bool(torch.isfinite(head.weight.grad).all())


def test_zero_vectors_give_zero_cosines_not_nan() -> None:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        head = make_head().to(dtype)
        h = torch.zeros(2, 6, dtype=dtype)
        h[1, 0] = 1.0
        cos = head(h)
        assert bool(torch.isfinite(cos).all()), dtype
        assert bool((cos[0] == 0).all())
        assert bool(torch.isfinite(head.score(h, 3)).all())


def test_logits_are_scaled_cosines(gen) -> None:
    head = make_head(scale=16.0)
    h = torch.randn(4, 6, generator=gen)
    everything = head.logits(h, torch.arange(9))
    torch.testing.assert_close(everything, 16.0 * head(h))
    assert tuple(everything.shape) == (4, 9)
    some = head.logits(h, torch.tensor([7, 2, 7]))
    assert tuple(some.shape) == (4, 3)
    torch.testing.assert_close(some, 16.0 * head(h)[:, [7, 2, 7]])
    torch.testing.assert_close(head.logits(h, [7, 2, 7]), some)
    assert tuple(head.logits(h, torch.tensor([], dtype=torch.long)).shape) == (4, 0)
    # one logit of a class is the scaled cosine too; score is the same method
    torch.testing.assert_close(head.logit(h, 3), 16.0 * head(h)[:, 3])
    assert CosineHead.score is CosineHead.logit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_score_equals_the_forward_column(gen, dtype) -> None:
    head = make_head(d=16, k=11).to(dtype)
    h = torch.randn(7, 16, generator=gen).to(dtype)
    full = head(h)
    tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 2e-2}[dtype]
    for c in (0, 5, 10, torch.tensor(4)):
        got = head.score(h, c)
        assert tuple(got.shape) == (7,) and got.dtype == dtype
        torch.testing.assert_close(got, full[:, int(c)], rtol=tol, atol=tol)
    classes = torch.tensor([3, 0, 10, 10, 2, 7, 3])
    got = head.score(h, classes)
    torch.testing.assert_close(got, full.gather(1, classes[:, None]).squeeze(1), rtol=tol, atol=tol)
    # a different class gives a different cosine (the test can fail)
    assert not torch.allclose(head.score(h, 1), full[:, 2])


def test_score_costs_one_dot_product_per_example(gen) -> None:
    m, d, k = 8, 32, 4096
    head = make_head(d=d, k=k)
    h = torch.randn(m, d, generator=gen)
    with FlopCounterMode(display=False) as full:
        head(h)
    assert full.get_total_flops() == 2 * m * d * k  # the counter sees the full product
    for c in (17, torch.randint(0, k, (m,), generator=gen)):
        with FlopCounterMode(display=False) as one:
            head.score(h, c)
        assert one.get_total_flops() <= 2 * m * d


def test_score_reads_only_the_rows_of_the_queried_classes(gen) -> None:
    head = make_head(d=8, k=50)
    h = torch.randn(3, 8, generator=gen)
    head.score(h, torch.tensor([4, 9, 4])).sum().backward()
    touched = (head.weight.grad != 0).any(dim=1).nonzero().flatten().tolist()
    assert touched == [4, 9]


def test_initial_rows_have_unit_norm_on_average() -> None:
    head = make_head(d=256, k=200)
    norms = head.weight.detach().norm(dim=1)
    assert abs(float(norms.mean()) - 1.0) < 0.05


def test_training_with_a_margin_loss_separates_classes() -> None:
    torch.manual_seed(0)
    centres = torch.randn(4, 10)
    y = torch.arange(4).repeat(16)
    x = centres[y] + 0.3 * torch.randn(64, 10)
    head = CosineHead(10, 4, scale=16.0)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(60):
        loss = arcface(head(x), y, scale=16.0, margin=0.3)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert float((head.logits(x, torch.arange(4)).argmax(1) == y).float().mean()) > 0.9
    # one logit per example is the scaled cosine of the example with its class row (row-by-row float64 reference)
    ref = ref_cosines(x, head.weight.detach())[torch.arange(len(y)), y]
    torch.testing.assert_close(head.score(x, y).double(), 16.0 * ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
    for d, k in ((0, 3), (3, 0), (2.5, 3), (3, True), ("4", 3)):
        with pytest.raises(ValueError, match="positive integer"):
            CosineHead(d, k)
    with pytest.raises(ValueError, match="scale"):
        CosineHead(3, 4, scale=0.0)
    head = make_head()
    with pytest.raises(ValueError, match=r"\[batch, 6\]"):
        head(torch.zeros(6))
    with pytest.raises(ValueError, match=r"\[batch, 6\]"):
        head(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        head(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        head.score([[0.0] * 6], 1)
    h = torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        head.score(h, 9)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        head.score(h, -1)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        head.score(h, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"\[2\] tensor"):
        head.score(h, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer"):
        head.score(h, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="int"):
        head.score(h, 1.0)
    with pytest.raises(TypeError, match="int"):
        head.score(h, True)
    assert "d=6, k=9" in repr(head)


# ---------------------------------------------------------------------------------------------- LinearHead


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    def sized(self, k: int) -> list[tuple[int, ...]]:
        """The shapes with a dimension of size ``k`` (the number of classes)."""
        return [s for s in self.shapes if k in s]


def ref_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every logit by a Python loop in float64 with math.fsum."""
    h, w, b = h.double().tolist(), w.double().tolist(), b.double().tolist()
    return torch.tensor([[math.fsum([*(x * y for x, y in zip(hi, wj, strict=True)), bj]) for wj, bj in zip(w, b,
                          strict=True)] for hi in h], dtype=torch.float64)


def ref_zscores(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Brute force: all logits in float64, two-pass mean and population variance, one row at a time."""
    z = (h.double() @ w.double().T + b.double()).detach()
    out = []
    for i in range(z.shape[0]):
        row = z[i]
        mean = row.sum() / row.numel()
        var = ((row - mean) ** 2).sum() / row.numel()
        out.append(0.0 if var == 0 else float((row[int(c[i])] - mean) / var.sqrt()))
    return torch.tensor(out, dtype=torch.float64)


def naive_zscores(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The uncentred identity E[z²] − E[z]² in float64 per example (what the head must NOT do)."""
    h, w, b = h.double(), w.double(), b.double()
    k = w.shape[0]
    s1 = h @ w.sum(0) + b.sum()
    s2 = ((h @ (w.T @ w)) * h).sum(1) + 2 * h @ (w.T @ b) + b @ b
    mean = s1 / k
    return ((h * w[c]).sum(1) + b[c] - mean) / (s2 / k - mean**2).clamp_min(0).sqrt()


def linear(d: int = 6, k: int = 9, seed: int = 0) -> LinearHead:
    torch.manual_seed(seed)
    return LinearHead(d, k)


def test_linear_head_is_an_nn_linear_with_the_same_init_and_state_dict() -> None:
    torch.manual_seed(3)
    ref = nn.Linear(20, 7)
    torch.manual_seed(3)
    head = LinearHead(20, 7)
    assert isinstance(head, nn.Linear) and (head.d, head.k) == (20, 7)
    assert (head.in_features, head.out_features) == (20, 7)
    assert list(head.state_dict()) == ["weight", "bias"] == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(head.state_dict()[key], value)
    # a checkpoint of an nn.Linear head loads into the LinearHead of build_model
    model = build_model("mlp", (16,), 5)
    assert isinstance(model.head, LinearHead)
    plain = nn.Sequential()
    plain.add_module("head", nn.Linear(500, 5))
    model.head.load_state_dict(plain.head.state_dict())
    assert torch.equal(model.head.weight, plain.head.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_linear_logit_and_logits_equal_the_reference(gen, dtype) -> None:
    head = linear(d=7, k=13).to(dtype)
    h = torch.randn(5, 7, generator=gen).to(dtype)
    ref = ref_logits(h, head.weight.detach(), head.bias.detach())
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    full = head(h)
    assert tuple(full.shape) == (5, 13) and full.dtype == dtype
    torch.testing.assert_close(full.double(), ref, rtol=tol, atol=tol)
    for c in (0, 6, 12, torch.tensor(9)):
        got = head.logit(h, c)
        assert tuple(got.shape) == (5,) and got.dtype == dtype
        torch.testing.assert_close(got.double(), ref[:, int(c)], rtol=tol, atol=tol)
    per_row = torch.tensor([12, 0, 3, 3, 7])
    torch.testing.assert_close(head.logit(h, per_row).double(), ref.gather(1, per_row[:, None])[:, 0],
                               rtol=tol, atol=tol)
    classes = torch.tensor([4, 11, 4, 0])
    got = head.logits(h, classes)
    assert tuple(got.shape) == (5, 4)
    torch.testing.assert_close(got.double(), ref[:, classes], rtol=tol, atol=tol)
    assert not torch.allclose(head.logit(h, 1).double(), ref[:, 2])  # the test can fail


@pytest.mark.parametrize("make", [lambda: linear(d=32, k=4099), lambda: make_head(d=32, k=4099)])
def test_single_logits_never_touch_all_classes(gen, make) -> None:
    """No operation of logit / logits produces a tensor with a dimension of size k; forward does."""
    head = make()
    m, d, k = 8, 32, 4099
    h = torch.randn(m, d, generator=gen)
    with ShapeRecorder() as full:
        head(h)
    assert (m, k) in full.sized(k)  # the recorder sees the full product
    for c in (17, torch.randint(0, k, (m,), generator=gen)):
        with ShapeRecorder() as one, FlopCounterMode(display=False) as flops:
            head.logit(h, c)
        assert one.shapes and one.sized(k) == []
        assert flops.get_total_flops() <= 2 * m * d
    with ShapeRecorder() as some:
        head.logits(h, torch.tensor([5, 6, 7]))
    assert some.sized(k) == [] and (m, 3) in some.shapes


def test_linear_logit_gradient_reaches_only_the_queried_rows(gen) -> None:
    head = linear(d=8, k=50)
    h = torch.randn(3, 8, generator=gen)
    head.logit(h, torch.tensor([4, 9, 4])).sum().backward()
    assert (head.weight.grad != 0).any(dim=1).nonzero().flatten().tolist() == [4, 9]
    assert head.bias.grad.nonzero().flatten().tolist() == [4, 9]
    assert head.bias.grad[4] == 2 and head.bias.grad[9] == 1


# ------------------------------------------------------------------------------------------------ z-score


@pytest.mark.parametrize(("d", "k"), [(5, 2), (6, 9), (16, 3), (24, 700)])
def test_zscore_equals_the_brute_force_from_all_logits(gen, d, k) -> None:
    head = linear(d=d, k=k)
    with torch.no_grad():
        head.bias.normal_(generator=gen)
    h = torch.randn(11, d, generator=gen, dtype=torch.float64)
    c = torch.randint(0, k, (11,), generator=gen)
    ref = ref_zscores(h, head.weight.detach(), head.bias.detach(), c)
    got = head.zscore(h, c)
    assert got.dtype == torch.float64 and tuple(got.shape) == (11,)
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-11)
    # the loss's z-score on the head's own logits agrees, and so does one class for every row
    torch.testing.assert_close(head.zscore(h.float(), c), z_score(head(h.float()), c), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.zscore(h, 1), ref_zscores(h, head.weight, head.bias, torch.ones(11).long()),
                               rtol=1e-11, atol=1e-11)
    assert not torch.allclose(got, head.zscore(h, (c + 1) % k))


def test_zscore_with_many_classes(gen) -> None:
    head = linear(d=8, k=100_000)
    h = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    c = torch.tensor([0, 99_999, 5, 50_000, 5, 12345])
    ref = ref_zscores(h, head.weight.detach(), head.bias.detach(), c)
    torch.testing.assert_close(head.zscore(h, c), ref, rtol=1e-10, atol=1e-10)


def test_zscore_is_exact_under_a_large_common_offset(gen) -> None:
    """Logits ~1e7 + O(1): the uncentred E[z²] − E[z]² loses every digit in float64; the head does not."""
    d, k = 10, 500
    head = linear(d=d, k=k)
    u = torch.randn(d, generator=gen)
    with torch.no_grad():
        head.weight.copy_(1e3 * u + torch.randn(k, d, generator=gen))  # a common direction in every row
        head.bias.copy_(1e7 + torch.randn(k, generator=gen) * 4)       # and a common bias
    h = (u / u.norm())[None, :].double() * 3e3 + torch.randn(7, d, generator=gen, dtype=torch.float64)
    c = torch.randint(0, k, (7,), generator=gen)
    w, b = head.weight.detach(), head.bias.detach()
    ref = ref_zscores(h, w, b, c)
    assert float((h @ w.double().T + b.double()).mean()) > 1e7  # the offset is really there
    torch.testing.assert_close(head.zscore(h, c), ref, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(naive_zscores(h, w, b, c), ref, rtol=1e-9, atol=1e-9)  # what the cache avoids


def test_zscore_of_constant_logits_is_zero() -> None:
    head = linear(d=4, k=6)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))  # every row the same
        head.bias.fill_(0.25)
    h = torch.randn(3, 4)
    assert torch.equal(head.zscore(h, 2), torch.zeros(3))
    assert torch.equal(ref_zscores(h, head.weight.detach(), head.bias.detach(), torch.full((3,), 2)), torch.zeros(3))


def test_zscore_statistics_match_the_design_identity() -> None:
    """RᵀR = [[Q, Wᵀb], [(Wᵀb)ᵀ, ‖b‖²]] − [w̄; Σb][w̄; Σb]ᵀ/k, the DESIGN.md quantities."""
    head = linear(d=5, k=40)
    s = head._zstats_now()
    r = torch.cat([s["r_w"].T, s["r_b"][:, None]], dim=1)
    w, b = head.weight.detach().double(), head.bias.detach().double()
    q, wtb, sb, bb, wbar = w.T @ w, w.T @ b, b.sum(), b @ b, w.sum(0)
    top = torch.cat([q, wtb[:, None]], 1)
    gram = torch.cat([top, torch.cat([wtb, bb[None]])[None, :]], 0)
    v = torch.cat([wbar, sb[None]])
    torch.testing.assert_close(r.T @ r, gram - torch.outer(v, v) / 40, rtol=1e-12, atol=1e-12)


def test_zscore_cache_follows_the_weights(gen) -> None:
    head = linear(d=6, k=30)
    h = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    c = torch.randint(0, 30, (5,), generator=gen)

    def check() -> None:
        ref = ref_zscores(h, head.weight.detach(), head.bias.detach(), c)
        torch.testing.assert_close(head.zscore(h, c), ref, rtol=1e-10, atol=1e-10)

    check()
    calls = []
    original = head._compute_zstats
    head._compute_zstats = lambda: calls.append(1) or original()
    head.zscore(h, c)
    assert calls == []  # cached: unchanged weights are not re-read
    # an optimizer step
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(head(h.float()), c).backward()
    opt.step()
    check()
    assert calls == [1]
    # load_state_dict
    head.load_state_dict(linear(d=6, k=30, seed=7).state_dict())
    check()
    # an in-place edit of the weight only (the bias unchanged)
    with torch.no_grad():
        head.weight[2].mul_(3.0)
    check()
    assert len(calls) == 3
    # an in-place edit of the bias only
    with torch.no_grad():
        head.bias[3] += 5.0
    check()
    # new parameters, another dtype
    head.weight = nn.Parameter(torch.randn(30, 6, generator=gen))
    check()
    head.double()
    check()
    assert len(calls) == 6
    # edits through .data are invisible to the version counters: refresh() is the documented way
    head.weight.data.mul_(2.0)
    head.refresh()
    check()
    # a deep copy has its own cache
    other = copy.deepcopy(head)
    with torch.no_grad():
        other.weight.zero_()
    check()


def test_zscore_accepts_any_float_dtype_and_returns_it(gen) -> None:
    head = linear(d=6, k=9)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        got = head.zscore(torch.randn(4, 6, generator=gen).to(dtype), 3)
        assert got.dtype == dtype and bool(torch.isfinite(got).all())


def test_linear_head_bad_arguments() -> None:
    for d, k in ((0, 3), (3, 0), (2.5, 3), (3, True)):
        with pytest.raises(ValueError, match="positive integer"):
            LinearHead(d, k)
    head = linear()
    h = torch.zeros(2, 6)
    for fn in (head, lambda x: head.logit(x, 1), lambda x: head.zscore(x, 1), lambda x: head.logits(x, [1])):
        with pytest.raises(ValueError, match=r"\[batch, 6\]"):
            fn(torch.zeros(2, 5))
        with pytest.raises(TypeError, match="floating-point"):
            fn(torch.zeros(2, 6, dtype=torch.long))
        with pytest.raises(TypeError, match="torch.Tensor"):
            fn([[0.0] * 6])
    with pytest.raises(TypeError, match="dtype torch.float64 but the head's weights have dtype torch.float32"):
        head.logit(h.double(), 1)
    for fn in (head.logit, head.zscore):
        with pytest.raises(ValueError, match=r"\[0, 9\)"):
            fn(h, 9)
        with pytest.raises(ValueError, match=r"\[0, 9\)"):
            fn(h, torch.tensor([0, -1]))
        with pytest.raises(ValueError, match=r"\[2\] tensor"):
            fn(h, torch.tensor([0, 1, 2]))
        with pytest.raises(TypeError, match="integer"):
            fn(h, torch.tensor([0.0, 1.0]))
        with pytest.raises(TypeError, match="int"):
            fn(h, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        head.logits(h, torch.tensor([3, 9]))
    with pytest.raises(ValueError, match="1-D"):
        head.logits(h, torch.tensor([[3]]))
    with pytest.raises(TypeError, match="integers"):
        head.logits(h, [1, 2.0])
    with pytest.raises(TypeError, match="integer"):
        head.logits(h, torch.tensor([True]))
    with pytest.raises(TypeError, match="list of ints"):
        head.logits(h, "1")


def test_heads_on_every_device(gen, device) -> None:
    head = linear(d=12, k=40).to(device)
    h_cpu = torch.randn(6, 12, generator=gen)
    c_cpu = torch.randint(0, 40, (6,), generator=gen)
    h, c = h_cpu.to(device), c_cpu.to(device)
    w, b = head.weight.detach().cpu(), head.bias.detach().cpu()
    ref = ref_logits(h_cpu, w, b)
    torch.testing.assert_close(head(h).cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.logit(h, c).cpu().double(), ref.gather(1, c_cpu[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.logit(h, c_cpu).cpu().double(), ref.gather(1, c_cpu[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.logits(h, torch.tensor([3, 1])).cpu().double(), ref[:, [3, 1]],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.zscore(h.double(), c).cpu(), ref_zscores(h_cpu, w, b, c_cpu),
                               rtol=1e-10, atol=1e-10)
    cos = make_head(d=12, k=40, scale=3.0).to(device)
    torch.testing.assert_close(cos.logit(h, c).cpu(), 3.0 * cos(h).cpu().gather(1, c_cpu[:, None])[:, 0],
                               rtol=1e-5, atol=1e-5)
    if device.type != "cpu":
        with pytest.raises(ValueError, match="is on cpu but the head's weights are on"):
            head.logit(h_cpu, 1)


def test_zscore_benchmark_runs_on_small_sizes(tmp_path) -> None:
    """Smoke test of `logitsep bench zscore` (no timing is asserted): files, rows, and both paths agree."""
    from logitsep.cli import main

    assert main(["bench", "zscore", "--ks", "4,6", "--d", "8", "--batch", "4", "--repeat", "1", "--out",
                 str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zscore_speed.csv", "zscore_speed.json",
                                                          "zscore_speed.png"]
    rows = json.loads((tmp_path / "zscore_speed.json").read_text())["rows"]
    assert [r["k"] for r in rows] == [16, 64]
    assert all(r["max_err_cached"] < 1e-5 and r["speedup"] > 0 for r in rows)
