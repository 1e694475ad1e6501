"""SGD whose step touches only the rows a sparse gradient names: the optimizer of sampled training.

:class:`RowSparseSGD` is ``torch.optim.SGD`` (heavy-ball momentum μ, weight decay λ, no dampening, no Nesterov)
for parameters whose gradient is a sparse COO tensor (a head's ``weight`` / ``bias`` gathered by
:func:`logitsep.core.rows.gather_rows`): a step updates the gradient's rows ``R`` only, ``O(|R|·d)`` whatever the
number of rows. A dense gradient gets torch's rule exactly (``v ← μ·v + g + λ·θ``, ``v = g + λ·θ`` at the first
step).

**Momentum of the rows a step skips** (``catch_up=True``, the default). Dense SGD keeps moving a row whose gradient
is zero: ``v ← μ·v``, ``θ ← θ − η_s·v`` at every skipped step ``s``. Here a row's skipped steps are applied when it
is next touched, in closed form: after skipping steps ``a+1 … b−1`` (``a`` its last update)

    ``θ ← θ − (Σ_{i=1}^{b−1−a} η_{a+i}·μ^i)·v``,   ``v ← μ^{b−1−a}·v``,

with the learning rates of those steps (the optimizer keeps every step's rate; ``O(1)`` a row, see
:meth:`RowSparseSGD._short_table`), then the step's own update
``v ← μ·v + g + λ·θ``, ``θ ← θ − η_b·v``. Call :meth:`catch_up` on the rows a step will read *before* its forward
pass (training does: :func:`logitsep.losses.sampled.sample_candidates` first) and the rows it reads are those of
dense SGD: with ``λ = 0`` the run equals ``torch.optim.SGD`` on the densified gradients to float rounding (tested,
float64; the terms with ``μ^i < 2⁻⁵³`` are dropped). Weight decay is applied at a row's own steps only (the decay
dense SGD would apply at skipped steps is not), as Partial FC does.

``catch_up=False`` is Partial FC's "lazy" per-row momentum: a skipped row waits with its velocity unchanged and
gets ``v ← μ·v + g`` at its next touch. It re-applies a velocity computed against features many steps old; on
sampled NCE it diverged where the catch-up (and dense SGD) trained (README, "Many classes").

The state (``momentum_buffer``, dense, the parameter's shape; for sparse parameters also ``step``, ``last_step``
[rows], and ``lr_history`` and ``phi``, float64, one value a step) goes through ``state_dict`` /
``load_state_dict`` with its dtypes kept, so the training checkpoints store and restore it (resume is exact). A
large momentum buffer is placed in huge pages (:mod:`logitsep.core.hugepages`: a step's random rows without a page
walk each).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .core import hugepages

__all__ = ["RowSparseSGD"]

# state that load_state_dict restores with its own dtype (torch would cast it to the parameter's)
_KEEP_DTYPE = ("step", "last_step", "lr_history", "phi")


class RowSparseSGD(torch.optim.Optimizer):
    """See the module docstring. ``params`` as for any torch optimizer."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, catch_up: bool = True) -> None:
        if not lr > 0:
            raise ValueError(f"RowSparseSGD: lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"RowSparseSGD: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"RowSparseSGD: weight_decay must be non-negative, got {weight_decay}")
        if not isinstance(catch_up, bool):
            raise TypeError(f"RowSparseSGD: catch_up must be a bool, got {type(catch_up).__name__}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "catch_up": catch_up})
        self._deferred: dict[Tensor, tuple[Tensor, Tensor]] = {}  # catch_up's velocities, for the next step
        self._table: tuple[tuple[int, int, float], Tensor, Tensor] | None = None  # see _short_table

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    self._sparse_step(p, _coalesced(p.grad), group)
                else:
                    self._dense_step(p, p.grad, lr, mu, wd)
        return loss

    @torch.no_grad()
    def catch_up(self, param: Tensor, rows: Tensor | None = None) -> None:
        """Apply the steps the ``rows`` of ``param`` (all rows: ``None``) skipped since their last update (module
        docstring), so that a forward pass reads them as dense SGD would have left them. Idempotent; a no-op
        without momentum, with ``catch_up=False`` or for a parameter that has had no sparse step yet.

        The rows' caught-up velocities are kept for the next :meth:`step` (which would read them back from the
        momentum buffer) and written to the buffer only if something else comes first (another catch-up,
        :meth:`state_dict`): one gather and one scatter of ``|rows|·d`` numbers fewer a step."""
        self._flush(param)
        fresh = self._fresh(param, rows)
        if fresh is not None:
            self._deferred[param] = fresh

    @torch.no_grad()
    def dense_view(self, param: Tensor) -> Tensor:
        """A copy of ``param`` with every row caught up (what dense SGD has now); ``param`` and the optimizer's
        state are left as they are. Training saves and evaluates this while its checkpoint keeps ``param``, so a
        resumed run takes the same steps as one never stopped."""
        out = param.detach().clone()
        mu = self._catch_up_momentum(param)
        stale = None if mu is None else self._stale(param, _distinct_rows(param, None), mu)
        if stale is not None:  # (rows caught up for the next step are not stale: no kept-back velocity here)
            coef, _ = stale
            out -= self.state[param]["momentum_buffer"] * coef
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's, with any velocities kept back by :meth:`catch_up` written to the momentum buffers first."""
        for param in list(self._deferred):
            self._flush(param)
        return super().state_dict()

    def _catch_up_momentum(self, param: Tensor) -> float | None:
        """μ where the catch-up applies to ``param`` (momentum, ``catch_up=True``, a sparse step behind it), else
        ``None``."""
        group = self._group_of(param)
        if not (group["catch_up"] and group["momentum"]) or "last_step" not in self.state[param]:
            return None
        return group["momentum"]

    def _stale(self, param: Tensor, rows: Tensor, mu: float) -> tuple[Tensor, Tensor] | None:
        """For ``rows`` of ``param`` (sorted, distinct): their displacement coefficients and velocity decays
        (shaped to broadcast over a row; 0 and 1 for a row with nothing skipped, so every row takes the same
        arithmetic); ``None`` if no row skipped a step."""
        state = self.state[param]
        now = int(state["step"])  # the step about to be taken: rows are brought up to date through now − 1
        last = state["last_step"].index_select(0, rows)
        skipped = (now - 1) - last
        if len(rows) == 0 or (longest := int(skipped.max())) <= 0:
            return None
        width = min(horizon(mu), now)
        coef = self._short_table(state, now, width, mu)[skipped.clamp(0, width)]
        if longest > width:  # rows skipped for more than the horizon: the whole coefficient, recorded in phi
            coef = torch.where(skipped > width, state["phi"][last.clamp_min(0)], coef)  # last −1: zero velocity
        decay = torch.pow(mu, skipped.double())
        shape = (-1,) + (1,) * (param.dim() - 1)
        return coef.to(param.dtype).view(shape), decay.to(param.dtype).view(shape)

    def _short_table(self, state: dict[str, Any], now: int, width: int, mu: float) -> Tensor:
        """``T[j] = Σ_{i=1}^{j} η_{now−1−j+i}·μ^i`` for ``j = 0 … width`` (float64): the displacement coefficient of a
        row that skipped the last ``j ≤ width`` steps. Computed as ``μ^j·Σ_{i<j} η_{now−1−i}·μ^(−i)``, a cumulative
        sum over the last ``width`` rates (positive terms: no cancellation; ``μ^(−i) ≤ 2⁵³``). The table of the last
        call is kept and reused by the next parameter whose last ``width`` rates are the same (a head's weight and
        bias, stepped together): one comparison instead of the table."""
        recent = state["lr_history"][now - width:now]
        cached = self._table
        if cached is not None and cached[0] == (now, width, mu) and torch.equal(cached[1], recent):
            return cached[2]
        powers = _powers(mu, width, recent.device)  # μ^1 … μ^width
        inverse = torch.cat([recent.new_ones(1), powers[:-1]])  # μ^0 … μ^(width−1), divided by below
        table = torch.cat([recent.new_zeros(1), powers * torch.cumsum(recent.flip(0) / inverse, 0)])
        self._table = ((now, width, mu), recent.clone(), table)
        return table

    def _fresh(self, param: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Bring ``rows`` up to date: the parameter's rows moved, ``last_step`` set; returns the rows (sorted,
        distinct) and their caught-up velocities, not yet written to the buffer. ``None`` where no catch-up
        applies (lazy rule, no momentum, no sparse step yet)."""
        mu = self._catch_up_momentum(param)
        if mu is None:
            return None
        state = self.state[param]
        rows = _distinct_rows(param, rows)
        velocity = state["momentum_buffer"].index_select(0, rows)
        stale = self._stale(param, rows, mu)
        if stale is not None:
            coef, decay = stale
            param.index_add_(0, rows, velocity * coef, alpha=-1)
            velocity.mul_(decay)
            state["last_step"].index_fill_(0, rows, int(state["step"]) - 1)
        return rows, velocity

    def _flush(self, param: Tensor) -> None:
        """Write a velocity kept back by :meth:`catch_up` to the momentum buffer."""
        deferred = self._deferred.pop(param, None)
        if deferred is not None:
            self.state[param]["momentum_buffer"].index_copy_(0, *deferred)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that the step counters and the rate history keep their dtypes (int64, float64; torch
        would cast them to the parameter's)."""
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params, strict=False))
        kept = {pid: {key: value for key, value in st.items() if key in _KEEP_DTYPE}
                for pid, st in state_dict["state"].items()}
        self._deferred.clear()  # velocities kept back for the state being replaced
        super().load_state_dict(state_dict)
        for pid, values in kept.items():
            if pid in id_map:
                state = self.state[id_map[pid]]
                for key, value in values.items():
                    device = id_map[pid].device if key != "step" else value.device
                    state[key] = value.to(device=device).clone()
                if "momentum_buffer" in state:  # large ones back in huge pages (core.hugepages), as first made
                    state["momentum_buffer"] = hugepages.moved(state["momentum_buffer"])

    def _group_of(self, param: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("RowSparseSGD: the tensor is not one of this optimizer's parameters")

    def _dense_step(self, p: Tensor, g: Tensor, lr: float, mu: float, wd: float) -> None:
        state = self.state[p]
        if "last_step" in state:  # a parameter with sparse steps behind it: every row is brought up to date first
            self.catch_up(p)
            self._flush(p)
        if wd:
            g = g.add(p, alpha=wd)
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = buf = g.detach().clone()
            else:
                buf.mul_(mu).add_(g)
            g = buf
        p.add_(g, alpha=-lr)
        if "last_step" in state:
            _record(state, lr, mu)
            state["last_step"].fill_(int(state["step"]) - 1)

    def _sparse_step(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        if g.sparse_dim() != 1:
            raise ValueError(f"RowSparseSGD: a sparse gradient must be sparse in its rows only (sparse_dim 1), "
                             f"got sparse_dim {g.sparse_dim()}")
        rows, values = g._indices()[0], g._values()  # sorted, distinct (_coalesced)
        state = self.state[p]
        if mu and "momentum_buffer" not in state:  # dense SGD starts at the first gradient: μ·0 + g is the same
            state["momentum_buffer"] = hugepages.zeros_like(p)  # random rows: see core.hugepages
        if mu and group["catch_up"]:
            if "last_step" not in state:  # rows at the state they have now: nothing skipped yet
                state["step"] = torch.tensor(0, dtype=torch.int64)
                state["last_step"] = torch.full((p.shape[0],), -1, dtype=torch.int64, device=p.device)
                state["lr_history"] = torch.zeros(64, dtype=torch.float64, device=p.device)
                state["phi"] = torch.zeros(64, dtype=torch.float64, device=p.device)
            deferred = self._deferred.get(p)
            if deferred is None or not torch.equal(deferred[0], rows):  # not caught up by the caller: now
                self.catch_up(p, rows)
            previous = self._deferred.pop(p)[1]  # these rows' caught-up velocities (written below)
        elif mu:
            previous = state["momentum_buffer"].index_select(0, rows)
        if wd:
            values = values + wd * p.index_select(0, rows)
        if mu:
            values = previous.mul_(mu).add_(values)
            state["momentum_buffer"].index_copy_(0, rows, values)
        p.index_add_(0, rows, values, alpha=-lr)
        if "last_step" in state:
            state["last_step"].index_fill_(0, rows, int(state["step"]))
            _record(state, lr, mu)


def _coalesced(grad: Tensor) -> Tensor:
    """``grad`` (sparse COO) coalesced. A gradient from :func:`logitsep.core.rows.gather_rows` has sorted, distinct
    rows but reaches ``.grad`` unmarked; checking that (``O(rows)``) spares the sort and the summing copy of its values
    that ``coalesce`` would make."""
    if grad.is_coalesced() or grad.sparse_dim() != 1:
        return grad.coalesce()
    rows = grad._indices()[0]
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        return grad.coalesce()
    return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True,
                                   check_invariants=False)


def _distinct_rows(param: Tensor, rows: Tensor | None) -> Tensor:
    """``rows`` sorted and distinct (all of ``param``'s for ``None``); rows already so are taken as they are."""
    if rows is None:
        return torch.arange(param.shape[0], device=param.device)
    rows = rows.to(param.device)
    if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
        rows = torch.unique(rows)
    return rows


def horizon(mu: float) -> int:
    """The number of skipped steps after which ``μ^i`` falls below ``2⁻⁵³``: later terms do not change a float64
    sum of the earlier ones."""
    return max(1, math.ceil(-53 * math.log(2) / math.log(mu)))


@functools.lru_cache(maxsize=16)
def _powers(mu: float, n: int, device: torch.device) -> Tensor:
    """``μ^1 … μ^n`` in float64 (cached: the same few ``n`` every step; callers do not modify it)."""
    return torch.exp(torch.arange(1, n + 1, dtype=torch.float64, device=device) * math.log(mu))


def _record(state: dict[str, Any], lr: float, mu: float) -> None:
    """Count the step: append its rate to ``lr_history`` and, ``L = horizon(μ)`` steps after a step ``a``, the
    whole displacement coefficient of a row last updated at ``a``, ``phi[a] = Σ_{i=1}^{L} η_{a+i}·μ^i``."""
    step = int(state["step"])
    if step >= len(state["lr_history"]):  # capacity doubled: O(1) per step on average
        for key in ("lr_history", "phi"):
            state[key] = torch.cat([state[key], torch.zeros_like(state[key])])
    history = state["lr_history"]
    history[step] = lr
    width = horizon(mu)
    if step >= width:
        a = step - width
        state["phi"][a] = history[a + 1:step + 1] @ _powers(mu, width, history.device)
    state["step"] = torch.tensor(step + 1, dtype=torch.int64)
