"""Heads with single-logit scoring (``logitsep.heads``): the cosine head."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from logitsep.heads import CosineHead
from logitsep.losses.cosine import arcface


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
    assert torch.equal(head.logits(h), 16.0 * head(h))
    assert tuple(head.logits(h).shape) == (4, 9)


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
    assert float((head.logits(x).argmax(1) == y).float().mean()) > 0.9
    assert torch.equal(head.score(x, y), head.score(x, y))


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
