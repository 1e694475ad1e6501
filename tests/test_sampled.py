"""Sampled losses (logitsep.losses.sampled), sparse row gathers and RowSparseSGD (logitsep.optim)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from logitsep.core.rows import gather_rows
from logitsep.losses import (
    Candidates,
    SampledLoss,
    batch_cross_entropy,
    binary_cross_entropy,
    loss_spec,
    nce,
    sample_candidates,
    sampled_batch_ce,
    sampled_bce,
    sampled_nce,
)
from logitsep.optim import RowSparseSGD

EXACT = {"bce": binary_cross_entropy, "nce": nce, "batch_ce": batch_cross_entropy}
SAMPLED = {"bce": sampled_bce, "nce": sampled_nce, "batch_ce": sampled_batch_ce}


def _problem(m=6, k=11, d=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(k, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(k, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(k, (m,), generator=g)
    return h, w, b, y


def _noise(k, seed=1):
    q = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    return q / q.sum()


@pytest.mark.parametrize("name", ["bce", "nce", "batch_ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_coverage_equals_the_exact_loss_values_and_gradients(name, reduction):
    h, w, b, y = _problem()
    k = w.shape[0]
    kwargs = {"num_noise": 7} if name == "nce" else {}
    exact = EXACT[name](h @ w.T + b, y, reduction=reduction, **kwargs)
    grads_exact = torch.autograd.grad(exact.sum(), (h, w, b))
    sampled = SAMPLED[name](h, w, b, y, num_sampled=k, reduction=reduction, **kwargs)
    grads = torch.autograd.grad(sampled.sum(), (h, w, b))
    torch.testing.assert_close(sampled, exact, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_exact, strict=True):
        torch.testing.assert_close(got.to_dense(), want, rtol=1e-12, atol=1e-12)


def test_full_coverage_nce_with_a_custom_noise_distribution():
    h, w, b, y = _problem()
    q = _noise(w.shape[0])
    exact = nce(h @ w.T + b, y, num_noise=5, noise=q)
    torch.testing.assert_close(sampled_nce(h, w, b, y, 10**6, num_noise=5, noise=q), exact, rtol=1e-12, atol=0)


def _mean_over_draws(name, num_sampled, draws, **kwargs):
    h, w, b, y = _problem(m=4, k=40, seed=3)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        values = torch.stack([SAMPLED[name](h, w, b, y, num_sampled, generator=gen, **kwargs) for _ in range(draws)])
        exact = EXACT[name](h @ w.T + b, y, **{k: v for k, v in kwargs.items()})
    return values, exact


@pytest.mark.parametrize("name,kwargs", [("bce", {}), ("nce", {"num_noise": 5}), ("nce", {"num_noise": 5,
                                                                                          "noise": _noise(40)})])
def test_bce_and_nce_estimates_are_unbiased(name, kwargs):
    values, exact = _mean_over_draws(name, num_sampled=6, draws=3000, **kwargs)
    sem = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - exact) < 4 * sem, (float(values.mean()), float(exact), float(sem))
    assert values.std() > 0  # the candidates did vary: the test is not the full-coverage case


@pytest.mark.parametrize("name", ["bce", "nce", "batch_ce"])
def test_estimates_approach_the_exact_loss_as_the_sample_grows(name):
    errors = []
    for num_sampled in (2, 8, 32, 128):
        values, exact = _mean_over_draws(name, num_sampled, draws=300)
        errors.append(float(((values - exact) ** 2).mean().sqrt()))  # RMS error: bias and spread together
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.2 * errors[0], errors


def test_sampled_batch_ce_is_biased_low_by_jensen():
    values, exact = _mean_over_draws("batch_ce", num_sampled=4, draws=2000)
    assert float(values.mean()) < float(exact)
    assert float(values.max()) <= float(exact) + 1e-9 or float(values.mean()) < float(exact)


def test_inclusion_weights_match_a_brute_force_probability():
    k, n = 9, 5
    y = torch.tensor([0, 0])
    q = _noise(k)
    c = sample_candidates(y, k, n, noise=q, dtype=torch.float64)
    for j, lw in zip(c.classes.tolist(), c.log_weight.tolist(), strict=True):
        if j == 0:
            assert lw == 0.0  # a true class of the batch is always in
            continue
        miss = 1.0
        for _ in range(n):
            miss *= 1.0 - float(q[j])
        assert math.isclose(-lw, math.log(1.0 - miss), rel_tol=1e-12)
    assert c.classes[c.target_pos].tolist() == y.tolist()


@pytest.mark.parametrize("k,n", [(20, 6), (20, 15), (1000, 40)])
def test_inclusion_frequency_matches_the_weights(k, n):
    trials = 4000
    y = torch.tensor([3])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(k)
    for _ in range(trials):
        c = sample_candidates(y, k, n, generator=gen)
        assert len(c.classes) == n  # the true class and n - 1 others: the same count whatever k
        assert torch.allclose(c.log_weight[c.classes != 3].exp(), torch.tensor((k - 1) / (n - 1)))
        counts[c.classes] += 1
    freq = counts / trials
    expected = (n - 1) / (k - 1)  # a simple random sample of n - 1 of the k - 1 other classes
    assert freq[3] == 1.0
    others = torch.cat([freq[:3], freq[4:]])
    assert abs(float(others.mean()) - expected) < 0.01
    assert float((others - expected).abs().max()) < 5 * math.sqrt(expected * (1 - expected) / trials) + 0.01


@pytest.mark.parametrize("k,y", [(14, [0, 5, 6, 13]), (13, [1, 2, 12])])
def test_uniform_candidates_are_a_simple_random_sample(k, y):
    """Every 3-subset of the other classes equally likely (a chi-square test over all of them), the true classes
    never drawn (both cases take the batch-of-draws path: 2·(s + |T|) ≤ k); seeded, so deterministic."""
    y = torch.tensor(y)
    others = [j for j in range(k) if j not in y.tolist()]
    subsets = {s: 0 for s in itertools.combinations(others, 3)}
    gen = torch.Generator().manual_seed(1)
    trials = 200 * len(subsets)
    for _ in range(trials):
        c = sample_candidates(y, k, len(y) + 3, generator=gen).classes.tolist()
        assert c == sorted(set(c)) and set(y.tolist()) <= set(c) and len(c) == len(y) + 3
        subsets[tuple(j for j in c if j not in y.tolist())] += 1
    expected = trials / len(subsets)
    chi2 = sum((n - expected) ** 2 / expected for n in subsets.values())
    dof = len(subsets) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)


@pytest.mark.parametrize("name", ["bce", "nce", "batch_ce"])
def test_gradcheck_with_fixed_candidates(name):
    h, w, b, y = _problem(m=3, k=7, d=2, seed=5)
    c = sample_candidates(y, 7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert len(c.classes) < 7

    def f(h, w, b):
        return SAMPLED[name](h, w, b, y, 3, candidates=c)

    # the head's gradient is sparse: compare against the dense gradient of the same function through plain indexing
    assert torch.autograd.gradcheck(lambda h: f(h, w.detach(), b.detach()), (h,))
    loss = f(h, w, b)
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.is_sparse and gb.is_sparse
    assert sorted(gw.coalesce().indices()[0].tolist()) == c.classes.tolist()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda wr, br: _dense_reference(name, h.detach(), wr, br, y, c),
                                    (w2[c.classes].detach().requires_grad_(), b2[c.classes].detach().requires_grad_()))
    dense_w, dense_b = torch.autograd.grad(_dense_reference(name, h.detach(), w[c.classes], b[c.classes], y, c),
                                           (w, b))
    torch.testing.assert_close(gw.to_dense(), dense_w)
    torch.testing.assert_close(gb.to_dense(), dense_b)


def _dense_reference(name, h, wc, bc, y, c: Candidates):
    """The same estimate written with loops over the candidates (float64, no sparse gathers)."""
    m, s = h.shape[0], len(c.classes)
    k_total = None
    rows = []
    if name == "batch_ce":
        terms = [h[i] @ wc[j] + bc[j] + c.log_weight[j] for i in range(m) for j in range(s)]
        log_z = torch.logsumexp(torch.stack(terms), dim=0)
        for i in range(m):
            j = int(c.target_pos[i])
            rows.append(log_z - (h[i] @ wc[j] + bc[j]) - math.log(m))
        return torch.stack(rows).mean()
    for i in range(m):
        total = 0.0
        for j in range(s):
            z = h[i] @ wc[j] + bc[j]
            weight = math.exp(float(c.log_weight[j]))
            if name == "bce":
                total = total + (torch.nn.functional.softplus(-z) if j == int(c.target_pos[i])
                                 else weight * torch.nn.functional.softplus(z))
            else:  # nce, uniform noise over the 7 classes of the problem, num_noise 25
                k_total = 7
                log_tq = math.log(25 / k_total)
                total = total + 25 * (weight / k_total) * torch.nn.functional.softplus(z - log_tq)
                if j == int(c.target_pos[i]):
                    total = total + torch.nn.functional.softplus(log_tq - z)
        rows.append(total)
    return torch.stack(rows).mean()


def test_sampled_module_and_registry():
    assert loss_spec("nce").sampled is sampled_nce
    assert loss_spec("ce").sampled is None
    h, w, b, y = _problem()
    loss = SampledLoss("nce", 100, num_noise=7)
    torch.testing.assert_close(loss(h, w, b, y), nce(h @ w.T + b, y, num_noise=7))
    with pytest.raises(ValueError, match="no sampled form"):
        SampledLoss("ce", 10)
    with pytest.raises(ValueError, match="takes cosines|no sampled form"):
        SampledLoss("arcface", 10)
    with pytest.raises(ValueError, match="sampled=True"):
        SampledLoss("nce", 10, sampled=True)
    with pytest.raises(ValueError, match="num_sampled"):
        SampledLoss("bce", 0)


def test_bad_inputs_are_named():
    h, w, b, y = _problem()
    with pytest.raises(ValueError, match="multi-label"):
        sampled_bce(h, w, b, torch.zeros(6, 11, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 11\)"):
        sampled_bce(h, w, b, torch.full((6,), 11), 3)
    with pytest.raises(ValueError, match="same d"):
        sampled_nce(h, w[:, :2], b, y, 3)
    with pytest.raises(ValueError, match="at least 2"):
        sampled_batch_ce(h[:1], w, b, y[:1], 3)
    with pytest.raises(TypeError, match="h must be"):
        sampled_bce(h.long(), w, b, y, 3)


def test_gather_rows_refuses_unsorted_rows():
    with pytest.raises(ValueError, match="sorted and distinct"):
        gather_rows(torch.zeros(5, 2), torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="sorted and distinct"):
        gather_rows(torch.zeros(5, 2), torch.tensor([1, 1]))


# --------------------------------------------------------------------------------------------- RowSparseSGD


def _sgd_pair(momentum=0.9, weight_decay=0.01, lr=0.1, catch_up=True, dtype=torch.float64):
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 3, dtype=dtype))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.SGD([a], lr=lr, momentum=momentum, weight_decay=weight_decay)
    ours = RowSparseSGD([b], lr=lr, momentum=momentum, weight_decay=weight_decay, catch_up=catch_up)
    return a, b, ref, ours


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05)])
def test_dense_gradients_follow_torch_sgd(momentum, weight_decay):
    a, b, ref, ours = _sgd_pair(momentum, weight_decay)
    for step in range(5):
        g = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_sparse_gradients_over_every_row_follow_torch_sgd():
    a, b, ref, ours = _sgd_pair()
    rows = torch.arange(8)
    for step in range(5):
        g = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        a.grad = g.clone()
        b.grad = torch.sparse_coo_tensor(rows[None], g.clone(), (8, 3), check_invariants=True)
        ref.step()
        ours.step()
    torch.testing.assert_close(b, a, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("rows", [[5, 1, 6], [1, 5, 5, 6]], ids=["unsorted", "repeated"])
def test_uncoalesced_sparse_gradients_are_summed_per_row(rows):
    # gradients from gather_rows come sorted and distinct and skip coalesce(); any other sparse gradient is
    # coalesced first (a repeated row's values summed), as torch's SGD sums a dense gradient's contributions
    a, b, ref, ours = _sgd_pair(0.9, 0.0)
    for step in range(3):
        g = torch.randn(len(rows), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        a.grad = torch.zeros(8, 3, dtype=torch.float64).index_add_(0, torch.tensor(rows), g)
        b.grad = torch.sparse_coo_tensor(torch.tensor([rows]), g, (8, 3), check_invariants=True)
        ref.step()
        ours.step()
    torch.testing.assert_close(ours.dense_view(b), a.detach(), rtol=1e-14, atol=1e-14)


def test_lazy_rule_moves_only_the_touched_rows_with_per_row_momentum():
    lr, mu, wd = 0.1, 0.9, 0.01
    _, p, _, opt = _sgd_pair(mu, wd, lr, catch_up=False)
    theta = p.detach().clone()
    velocity = torch.zeros_like(theta)
    for step, rows in enumerate([[1, 4], [4, 6], [0, 1, 7], [4]]):
        g = torch.randn(len(rows), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        p.grad = torch.sparse_coo_tensor(torch.tensor([rows]), g, (8, 3), check_invariants=True)
        opt.step()
        for r, gr in zip(rows, g, strict=True):  # the reference: one row at a time
            velocity[r] = mu * velocity[r] + gr + wd * theta[r]
            theta[r] = theta[r] - lr * velocity[r]
    torch.testing.assert_close(p.detach(), theta, rtol=1e-14, atol=1e-14)
    untouched = [2, 3, 5]
    torch.testing.assert_close(p.detach()[untouched], _sgd_pair()[1].detach()[untouched], rtol=0, atol=0)


def _touch_schedule(steps):
    """Rows touched at each step: row 0 always, row 1 every third step, row 2 at steps 5 and 700 (a gap longer
    than horizon(0.9) = 349: the phi path), row 3 first at step 790, rows 4-7 never."""
    for t in range(steps):
        rows = [0] + ([1] if t % 3 == 0 else []) + ([2] if t in (5, 700) else []) + ([3] if t == 790 else [])
        yield t, rows


@pytest.mark.parametrize("mu", [0.9, 0.5])
def test_catch_up_equals_dense_sgd_on_the_densified_gradients(mu):
    # the reference is torch's SGD on gradients that are zero outside the touched rows (no weight decay): a
    # skipped row keeps moving by its decaying momentum there, with each step's own learning rate
    steps = 800
    a, b, ref, ours = _sgd_pair(mu, 0.0, 0.1)
    gen = torch.Generator().manual_seed(1)
    for t, rows in _touch_schedule(steps):
        lr = 0.05 * (1 + math.cos(math.pi * t / steps)) + 0.01
        ref.param_groups[0]["lr"] = ours.param_groups[0]["lr"] = lr
        values = torch.randn(len(rows), 3, dtype=torch.float64, generator=gen)
        ours.catch_up(b, torch.tensor(rows))
        torch.testing.assert_close(b.detach()[rows], a.detach()[rows], rtol=1e-13, atol=1e-13)  # what a forward reads
        dense = torch.zeros(8, 3, dtype=torch.float64)
        dense[rows] = values
        a.grad = dense
        b.grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, (8, 3), check_invariants=True)
        ref.step()
        ours.step()
    lagging = b.detach().clone()
    torch.testing.assert_close(ours.dense_view(b), a.detach(), rtol=1e-13, atol=1e-13)
    assert torch.equal(b.detach(), lagging)  # dense_view changed nothing
    ours.catch_up(b)
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-13, atol=1e-13)
    assert not torch.equal(lagging[1], a.detach()[1])  # before the catch-up row 1 still waited for its momentum
    ours.catch_up(b)  # idempotent
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-13, atol=1e-13)


def test_catch_up_of_parameters_stepped_at_different_steps_uses_each_ones_rates():
    # weight and bias share one coefficient table when their recent rates agree (RowSparseSGD._short_table); here
    # each has no gradient at some steps (torch's SGD skips it entirely there), as many for both but not the same
    # ones, so at equal step counts their rates differ and a shared table would move one by the wrong amounts
    steps, mu = 60, 0.9
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in ((8, 3), (8,))]
    sparse = [torch.nn.Parameter(p.detach().clone()) for p in dense]
    ref, ours = torch.optim.SGD(dense, lr=0.1, momentum=mu), RowSparseSGD(sparse, lr=0.1, momentum=mu)
    gen = torch.Generator().manual_seed(3)
    for t, rows in _touch_schedule(steps):
        ref.param_groups[0]["lr"] = ours.param_groups[0]["lr"] = 0.01 + 0.1 * (t % 7) / 7
        for d, s in zip(dense, sparse, strict=True):
            d.grad = s.grad = None
            if t % 4 == (1 if s.dim() == 1 else 3):
                continue  # no gradient for this one at this step
            ours.catch_up(s, torch.tensor(rows))
            torch.testing.assert_close(s.detach()[rows], d.detach()[rows], rtol=1e-13, atol=1e-13)
            values = torch.randn((len(rows),) + tuple(s.shape[1:]), dtype=torch.float64, generator=gen)
            d.grad = torch.zeros_like(d).index_put_((torch.tensor(rows),), values)
            s.grad = torch.sparse_coo_tensor(torch.tensor([rows]), values, s.shape, check_invariants=True)
        ref.step()
        ours.step()
    for d, s in zip(dense, sparse, strict=True):
        torch.testing.assert_close(ours.dense_view(s), d.detach(), rtol=1e-13, atol=1e-13)


def test_catch_up_with_weight_decay_decays_at_touches_only():
    lr, mu, wd = 0.1, 0.9, 0.05
    _, p, _, opt = _sgd_pair(mu, wd, lr)
    theta, velocity = p.detach().clone(), torch.zeros(8, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    for _, rows in _touch_schedule(40):
        g = torch.randn(len(rows), 3, dtype=torch.float64, generator=gen)
        p.grad = torch.sparse_coo_tensor(torch.tensor([rows]), g, (8, 3), check_invariants=True)
        opt.step()
        for r in range(8):  # the documented rule, one row at a time
            if r in rows:
                velocity[r] = mu * velocity[r] + g[rows.index(r)] + wd * theta[r]
            else:
                velocity[r] = mu * velocity[r]
            theta[r] = theta[r] - lr * velocity[r]
    opt.catch_up(p)
    torch.testing.assert_close(p.detach(), theta, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("catch_up", [True, False])
def test_state_dict_round_trip_resumes_exactly(dtype, catch_up):
    def run(split):
        _, p, _, opt = _sgd_pair(catch_up=catch_up, dtype=dtype)
        for step in range(40):
            if step == split:
                state = opt.state_dict()
                p2 = torch.nn.Parameter(p.detach().clone())
                opt = RowSparseSGD([p2], lr=0.1, momentum=0.9, weight_decay=0.01, catch_up=catch_up)
                opt.load_state_dict(state)
                p = p2
            opt.param_groups[0]["lr"] = 0.1 / (1 + step) ** 0.5  # rates with no short float32 form
            rows = torch.tensor([[step % 8, (3 * step) % 7]]).unique(dim=1)
            opt.catch_up(p, rows[0])
            g = torch.randn(rows.shape[1], 3, dtype=dtype, generator=torch.Generator().manual_seed(step))
            p.grad = torch.sparse_coo_tensor(rows, g, (8, 3), check_invariants=True)
            opt.step()
        opt.catch_up(p)
        return p.detach(), opt.state_dict()

    (resumed, state), (once, _) = run(split=23), run(split=None)
    torch.testing.assert_close(resumed, once, rtol=0, atol=0)
    if catch_up:  # the counters stay integers and the rates float64 through load_state_dict
        kept = state["state"][0]
        assert kept["last_step"].dtype == kept["step"].dtype == torch.int64
        assert kept["lr_history"].dtype == kept["phi"].dtype == torch.float64


@pytest.mark.parametrize("between", ["nothing", "state_dict", "resume", "other_rows"])
def test_velocities_kept_back_by_catch_up_reach_the_state(between):
    """catch_up keeps the caught-up velocities for the next step; a state_dict (or a resume from it) or a
    catch-up of other rows in between writes them first, and every path takes the same steps."""
    def run(mode):
        _, p, _, opt = _sgd_pair(weight_decay=0.0)
        for step, rows in _touch_schedule(30):  # at step 21 row 1 comes back after two skipped steps
            rows = torch.tensor(rows)
            opt.catch_up(p, rows)
            if step == 21 and mode == "state_dict":
                opt.state_dict()
            if step == 21 and mode == "resume":
                state = opt.state_dict()
                p = torch.nn.Parameter(p.detach().clone())
                opt = RowSparseSGD([p], lr=0.1, momentum=0.9)
                opt.load_state_dict(state)
            if step == 21 and mode == "other_rows":
                opt.catch_up(p, torch.tensor([5, 6]))
            g = torch.randn(len(rows), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
            p.grad = torch.sparse_coo_tensor(rows[None], g, (8, 3), check_invariants=True)
            opt.step()
        return opt.dense_view(p)

    torch.testing.assert_close(run(between), run("nothing"), rtol=0, atol=0)


def test_catch_up_refuses_a_foreign_tensor_and_a_bad_flag():
    _, p, _, opt = _sgd_pair()
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.catch_up(torch.zeros(8, 3), torch.tensor([0]))
    with pytest.raises(TypeError, match="catch_up must be a bool"):
        RowSparseSGD([p], lr=0.1, catch_up="yes")


def test_training_step_through_sampled_loss_touches_only_candidate_rows():
    h, w, b, y = _problem(k=50)
    w = torch.nn.Parameter(w.detach())
    b = torch.nn.Parameter(b.detach())
    before = w.detach().clone()
    opt = RowSparseSGD([w, b], lr=0.5, momentum=0.9)
    c = sample_candidates(y, 50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sampled_nce(h.detach(), w, b, y, 4, candidates=c).backward()
    opt.step()
    changed = (w.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == c.classes.tolist()


def _sampled_nce_run(optimizer: str, steps: int = 30, k: int = 50):
    """A two-layer model trained with sampled NCE on fixed candidate sets: RowSparseSGD with the catch-up before
    each forward ("catch_up"), lazy ("lazy"), or torch SGD on the densified head gradients ("dense")."""
    torch.manual_seed(0)
    body = torch.nn.Linear(4, 4).double()
    w = torch.nn.Parameter(torch.randn(k, 4, dtype=torch.float64) * 0.3)
    b = torch.nn.Parameter(torch.zeros(k, dtype=torch.float64))
    params = [*body.parameters(), w, b]
    opt = (torch.optim.SGD(params, lr=0.2, momentum=0.9) if optimizer == "dense"
           else RowSparseSGD(params, lr=0.2, momentum=0.9, catch_up=optimizer == "catch_up"))
    loss = SampledLoss("nce", 6, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(5, 4, dtype=torch.float64, generator=gen)
        y = torch.randint(k, (5,), generator=gen)
        c = loss.candidates(y, k, torch.float64)
        if optimizer == "catch_up":
            opt.catch_up(w, c.classes)
            opt.catch_up(b, c.classes)
        opt.zero_grad()
        loss(body(x), w, b, y, candidates=c).backward()
        if optimizer == "dense":
            w.grad, b.grad = w.grad.to_dense(), b.grad.to_dense()
        opt.step()
    if optimizer != "dense":
        opt.catch_up(w)
        opt.catch_up(b)
    return [p.detach() for p in params]


def test_sampled_training_with_catch_up_equals_dense_sgd():
    dense, ours, lazy = (_sampled_nce_run(o) for o in ("dense", "catch_up", "lazy"))
    for a, b in zip(dense, ours, strict=True):  # features and head: every forward read what dense SGD had
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(lazy[-2], dense[-2], atol=1e-6)  # the lazy rule is another optimizer
