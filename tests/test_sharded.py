"""Class-sharded linear head: two gloo processes, each holding part of the classes, give the values, gradients and
SGD updates of one process with the full head on the global batch (float64, tight tolerances).

Broken on purpose, each of these made tests here fail (then restored): the row maximum left local (not
all-reduced); the loss computed on the local batch instead of the gathered global one; the sums all-reduced with
``torch.distributed.nn.functional.all_reduce`` (its backward all-reduces again: head gradients 2x); the feature
gradient taken from this rank's own copy only (no sum over ranks); ``feature_grad="ddp"`` not scaling by N; nce's
shift ``log(t/k)`` taken with the shard's class count instead of the global k.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from logitsep.core.checks import value_checks
from logitsep.heads import CosineHead, LinearHead
from logitsep.losses import get_loss
from logitsep.sharded import (
    SHARDED_LOSSES,
    ShardedLinearHead,
    gather_features,
    loss_on_logit_shard,
    shard_bounds,
    sharded_loss,
)

WORLD = 2
D = 4
NOISE = torch.tensor([0.05, 0.25, 0.1, 0.2, 0.15, 0.15, 0.1], dtype=torch.float64)

# case -> (loss, keyword arguments, k, local batch sizes of the 2 ranks, scale of the features)
CASES = {
    "ce": ("ce", {}, 7, (4, 4), 1.0),
    "ce_k8": ("ce", {}, 8, (4, 4), 1.0),
    "ce_sum_uneven_batches": ("ce", {"reduction": "sum"}, 7, (3, 5), 1.0),
    "ce_none": ("ce", {"reduction": "none"}, 7, (4, 4), 1.0),
    "ce_huge_logits": ("ce", {}, 7, (4, 4), 2000.0),  # exp overflows float64 without the max subtraction
    "self_norm": ("self_norm", {"alpha": 0.3}, 7, (4, 4), 1.0),
    "batch_ce": ("batch_ce", {}, 7, (4, 4), 1.0),
    "batch_ce_none_uneven_batches": ("batch_ce", {"reduction": "none"}, 7, (5, 2), 1.0),
    "batch_ce_huge_logits": ("batch_ce", {}, 7, (4, 4), 2000.0),
    "bce": ("bce", {}, 7, (4, 4), 1.0),
    "bce_large_logits": ("bce", {}, 7, (4, 4), 60.0),
    "nce": ("nce", {"num_noise": 5}, 7, (4, 4), 1.0),
    "nce_custom_noise": ("nce", {"num_noise": 3, "noise": NOISE}, 7, (4, 4), 1.0),
}
STEP_LOSSES = {"ce": {}, "self_norm": {}, "batch_ce": {}, "bce": {}, "nce": {"num_noise": 5}}
STEP_K, STEP_IN, STEP_BATCH, STEP_LR, STEPS = 7, 5, 8, 0.5, 2


def _case_data(case: str):
    """The global batch of a case: features [M, d], targets [M], the full head, and weights of a 'none' loss."""
    _, _, k, sizes, scale = CASES[case]
    g = torch.Generator().manual_seed(sorted(CASES).index(case))
    m = sum(sizes)
    h = torch.randn(m, D, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, k, (m,), generator=g)
    y[0], y[-1] = 0, k - 1  # both shards hold a target
    head = LinearHead(D, k).double()
    with torch.no_grad():
        head.weight.copy_(torch.rand(k, D, generator=g, dtype=torch.float64) - 0.5)
        head.bias.copy_(torch.rand(k, generator=g, dtype=torch.float64) - 0.5)
    v = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return h, y, head, v


def _rows(sizes, rank: int) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def _scalar(loss: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (loss * v).sum() if loss.dim() else loss


@torch.no_grad()
def _sgd_step(params) -> None:
    """One step of plain SGD (what torch.optim.SGD without momentum does), gradients cleared."""
    for p in params:
        p -= STEP_LR * p.grad
        p.grad = None


def _step_data(step_seed: int):
    g = torch.Generator().manual_seed(100 + step_seed)
    xs = [torch.randn(STEP_BATCH, STEP_IN, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    ys = [torch.randint(0, STEP_K, (STEP_BATCH,), generator=g) for _ in range(STEPS)]
    torch.manual_seed(step_seed)
    backbone = nn.Sequential(nn.Linear(STEP_IN, D), nn.Tanh()).double()
    head = LinearHead(D, STEP_K).double()
    return xs, ys, backbone, head


# ------------------------------------------------------------------------------------------ the 2 processes


def _run_case(case: str, rank: int) -> dict:
    name, kwargs, k, sizes, scale = CASES[case]
    h, y, full, v = _case_data(case)
    rows = _rows(sizes, rank)
    mine = h[rows].clone().requires_grad_()
    head = ShardedLinearHead.from_full(full)
    loss = sharded_loss(name, mine, y[rows], head, **kwargs)
    _scalar(loss, v).backward()
    out = {"loss": loss.detach(), "h": mine.grad, "weight": head.weight.grad, "bias": head.bias.grad,
           "bounds": (head.start, head.stop)}
    # finite differences: the directional derivative of the global loss along a random direction of every rank's
    # features and shard, by central differences, against Σ_r <gradient_r, direction_r>
    g = torch.Generator().manual_seed(1000 + rank)
    dirs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (mine, head.weight, head.bias)]
    eps = 1e-6 * scale
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            shifted = ShardedLinearHead.from_full(full)
            shifted.weight += sign * eps * dirs[1]
            shifted.bias += sign * eps * dirs[2]
            values.append(_scalar(sharded_loss(name, mine + sign * eps * dirs[0], y[rows], shifted, **kwargs), v))
    analytic = sum((a * b).sum() for a, b in zip((mine.grad, head.weight.grad, head.bias.grad), dirs, strict=True))
    dist.all_reduce(analytic)
    out["fd"] = ((values[0] - values[1]) / (2 * eps)).item()
    out["analytic"] = analytic.item()
    return out


def _run_steps(name: str, rank: int) -> dict:
    """STEPS SGD steps of a data-parallel backbone (feature_grad="ddp") and the sharded head, 4 rows per rank.

    The backbone's gradients are averaged over the ranks after the backward, which is what DDP computes (DDP and
    torch.optim are not used here: the first use of either imports torch._dynamo, 2 to 4 s; test_distributed trains
    through both)."""
    xs, ys, backbone, full = _step_data(sorted(STEP_LOSSES).index(name))
    head = ShardedLinearHead.from_full(full)
    rows = _rows((STEP_BATCH // 2, STEP_BATCH // 2), rank)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        loss = sharded_loss(name, backbone(x[rows]), y[rows], head, feature_grad="ddp", **STEP_LOSSES[name])
        loss.backward()
        for p in backbone.parameters():  # DDP's averaging; the head's shards are not averaged
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        _sgd_step([*backbone.parameters(), *head.parameters()])
        losses.append(loss.item())
    gathered = head.gather_full(dst=None)
    return {"losses": losses, "backbone": {k: v.clone() for k, v in backbone.state_dict().items()},
            "head": {k: v.clone() for k, v in gathered.state_dict().items()}}


def _run_round_trip(rank: int) -> dict:
    out = {}
    for bias in (True, False):
        torch.manual_seed(7)  # the same full head on both ranks (their shards' own init draws differ in length)
        full = LinearHead(3, 5, bias=bias)
        head = ShardedLinearHead.from_full(full)
        h = torch.randn(4, 3)
        out[bias] = {"full": full.state_dict(), "forward": head(h), "h": h, "bounds": (head.start, head.stop),
                     "to_0": head.gather_full(dst=0), "to_1": head.gather_full(dst=1),
                     "all": head.gather_full(dst=None)}
        restored = ShardedLinearHead(3, 5, bias=bias)
        restored.load_full_state_dict(full.state_dict())
        out[bias]["restored"] = restored.state_dict()
    # gather_features alone: rank r's rows come back; the gradient of rank r's rows is summed over the ranks
    x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    gathered = gather_features(x, grad_scale=3.0)
    (gathered * (1.0 + rank)).sum().backward()
    out["gather"] = (gathered.detach(), x.grad)
    # a bad target on rank 1 only: every rank raises the same error (no rank is left waiting in a collective)
    head = ShardedLinearHead.from_full(LinearHead(3, 5))
    target = torch.tensor([0, 5]) if rank == 1 else torch.tensor([1, 2])
    try:
        sharded_loss("ce", torch.randn(2, 3), target, head)
        out["error"] = None
    except ValueError as err:
        out["error"] = str(err)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = {"cases": {case: _run_case(case, rank) for case in CASES},
                   "steps": {name: _run_steps(name, rank) for name in STEP_LOSSES},
                   "round_trip": _run_round_trip(rank)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 gloo processes computed (one spawn for every check, to pay process start once)."""
    root = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(actual, expected, scale=1.0):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * scale)


# ------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_process_loss_and_gradients(case, ranks):
    name, kwargs, k, sizes, scale = CASES[case]
    h, y, full, v = _case_data(case)
    h.requires_grad_()
    reference = get_loss(name, **kwargs)(full(h), y)
    _scalar(reference, v).backward()
    for rank, result in enumerate(ranks):
        res = result["cases"][case]
        start, stop = res["bounds"]
        assert (start, stop) == shard_bounds(k, WORLD, rank)
        _close(res["loss"], reference.detach(), scale)  # the global loss, on every rank
        _close(res["h"], h.grad[_rows(sizes, rank)], scale)  # this rank's features: exactly ∂L/∂h_r
        _close(res["weight"], full.weight.grad[start:stop], scale)
        _close(res["bias"], full.bias.grad[start:stop], scale)
    assert ranks[0]["cases"][case]["fd"] == ranks[1]["cases"][case]["fd"]
    fd, analytic = ranks[0]["cases"][case]["fd"], ranks[0]["cases"][case]["analytic"]
    assert fd == pytest.approx(analytic, rel=1e-6, abs=1e-8 * scale)


def test_the_huge_logits_would_overflow_without_the_max():
    h, y, full, _ = _case_data("ce_huge_logits")
    with torch.no_grad():
        assert not math.isfinite(float(torch.exp(full(h)).sum(dim=1).max()))


@pytest.mark.parametrize("name", list(STEP_LOSSES))
def test_sgd_steps_with_a_data_parallel_backbone_match_one_process(name, ranks):
    xs, ys, backbone, head = _step_data(sorted(STEP_LOSSES).index(name))
    loss_fn = get_loss(name, **STEP_LOSSES[name])
    losses = []
    for x, y in zip(xs, ys, strict=True):
        loss = loss_fn(head(backbone(x)), y)
        loss.backward()
        _sgd_step([*backbone.parameters(), *head.parameters()])
        losses.append(loss.item())
    for result in ranks:
        res = result["steps"][name]
        assert res["losses"] == pytest.approx(losses, rel=1e-12)
        for key, value in backbone.state_dict().items():
            _close(res["backbone"][key], value)
        for key, value in head.state_dict().items():  # gathered from both shards
            _close(res["head"][key], value)
    moved = head.weight.detach() - _step_data(sorted(STEP_LOSSES).index(name))[3].weight.detach()
    assert float(moved.abs().min()) > 1e-4  # every class's row took part in the steps


def test_gather_full_and_from_full_round_trip(ranks):
    for bias in (True, False):
        full = ranks[0]["round_trip"][bias]["full"]
        for rank, result in enumerate(ranks):
            res = result["round_trip"][bias]
            start, stop = res["bounds"]
            expected = nn.functional.linear(res["h"], full["weight"][start:stop],
                                            full["bias"][start:stop] if bias else None)
            torch.testing.assert_close(res["forward"], expected, rtol=0, atol=0)
            assert [key for key in ("to_0", "to_1") if res[key] is not None] == [f"to_{rank}"]
            for gathered in (res[f"to_{rank}"], res["all"]):
                assert isinstance(gathered, LinearHead) and (gathered.k, gathered.d) == (5, 3)
                assert gathered.state_dict().keys() == full.keys()
                for key, value in full.items():
                    assert torch.equal(gathered.state_dict()[key], value)
            for key, value in res["restored"].items():
                assert torch.equal(value, full[key][start:stop])


def test_gather_features_sums_the_gradients_of_each_ranks_rows(ranks):
    for rank, result in enumerate(ranks):
        gathered, grad = result["round_trip"]["gather"]
        torch.testing.assert_close(gathered, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert torch.equal(grad, torch.full((rank + 1, 2), 3.0 * (1.0 + 2.0)))  # Σ_r (1 + r), times grad_scale


def test_a_bad_target_on_one_rank_raises_on_every_rank(ranks):
    for result in ranks:
        assert "target values must be in [0, 5) for 5 classes, got range [0, 5]" in result["round_trip"]["error"]


# ------------------------------------------------------------------------------------- one process, no group


def test_shard_bounds_put_every_class_in_exactly_one_shard():
    for k in range(1, 24):
        for n in range(1, k + 1):
            bounds = [shard_bounds(k, n, r) for r in range(n)]
            assert bounds[0][0] == 0 and bounds[-1][1] == k
            assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))  # contiguous, in rank order
            sizes = [stop - start for start, stop in bounds]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert shard_bounds(7, 2, 0) == (0, 4) and shard_bounds(7, 2, 1) == (4, 7)
    with pytest.raises(ValueError, match="3 classes cannot be sharded over 4 ranks"):
        shard_bounds(3, 4, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard_bounds(5, 2, 2)


def test_shards_sliced_offline_make_up_the_full_head():
    full = LinearHead(3, 7)
    shards = [ShardedLinearHead.from_full(full, rank=r, world_size=3) for r in range(3)]
    assert [s.k_shard for s in shards] == [3, 2, 2]
    assert torch.equal(torch.cat([s.weight for s in shards]), full.weight)
    assert torch.equal(torch.cat([s.bias for s in shards]), full.bias)
    with pytest.raises(ValueError, match="its process group has 1 rank"):  # no group of 3 to compute with
        sharded_loss("ce", torch.randn(2, 3), torch.tensor([0, 1]), shards[1])
    with pytest.raises(ValueError, match=r"full weight must be \[7, 3\]"):
        shards[0].load_full_state_dict(LinearHead(3, 6).state_dict())
    with pytest.raises(TypeError, match="cosine heads cannot be sharded"):
        ShardedLinearHead.from_full(CosineHead(3, 7))


@pytest.mark.parametrize("name", SHARDED_LOSSES)
def test_alone_it_is_the_registered_loss(name):
    torch.manual_seed(0)
    full = LinearHead(4, 6).double()
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, 2, 2, 3])
    head = ShardedLinearHead.from_full(full)
    loss = sharded_loss(name, h, y, head)
    loss.backward()
    h_grad, h.grad = h.grad, None
    reference = get_loss(name)(full(h), y)
    reference.backward()
    _close(loss.detach(), reference.detach())
    _close(h_grad, h.grad)
    _close(head.weight.grad, full.weight.grad)
    _close(head.bias.grad, full.bias.grad)
    # the logit-shard form, with the built module
    _close(loss_on_logit_shard(get_loss(name), full(h), y, k=6, start=0).detach(), reference.detach())
    with pytest.raises(ValueError, match=r"rank 0 of 1 holds the classes \[0, 6\] of k=6"):
        loss_on_logit_shard(name, full(h)[:, 2:], y, k=6, start=2)  # alone, the logits must cover every class


def test_what_is_not_supported_is_refused_clearly():
    head = ShardedLinearHead(4, 6)
    h, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="multi-label"):
        sharded_loss("bce", h, torch.zeros(3, 6, dtype=torch.bool), head)
    with pytest.raises(ValueError, match="takes the cosines of a CosineHead"):
        sharded_loss("arcface", h, y, head)
    with pytest.raises(ValueError, match="'max_margin' has no sharded form"):
        sharded_loss("max_margin", h, y, head)
    with pytest.raises(ValueError, match="sampled nce is not supported"):
        sharded_loss("nce", h, y, head, sampled=True)
    with pytest.raises(ValueError, match="feature_grad must be one of"):
        sharded_loss("ce", h, y, head, feature_grad="mean")
    with pytest.raises(ValueError, match="features must be"):
        sharded_loss("ce", torch.randn(3, 5), y, head)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 6\)"):
        sharded_loss("ce", h, torch.tensor([0, 1, 6]), head)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sharded_loss("ce", torch.tensor([[float("nan")] * 4] * 3), y, head)
    with value_checks(False):  # off: NaN propagates, as in the registered losses
        assert torch.isnan(sharded_loss("ce", torch.tensor([[float("nan")] * 4] * 3), y, head))
    with pytest.raises(ValueError, match="at least 2 examples"):
        sharded_loss("batch_ce", h[:1], y[:1], head)
