"""SGD whose step touches only the rows a sparse gradient names: the optimizer of sampled training.

:class:`RowSparseSGD` is ``torch.optim.SGD`` (heavy-ball momentum μ, weight decay λ, no dampening, no Nesterov)
with one difference: a parameter whose gradient is a sparse COO tensor (a head's ``weight`` / ``bias`` gathered
by :func:`logitsep.core.rows.gather_rows`) is updated on the gradient's rows ``R`` only, with **per-row momentum**
(as Partial FC does):

    ``v[R] ← μ·v[R] + g[R] + λ·θ[R]``,   ``θ[R] ← θ[R] − η·v[R]``;   rows outside ``R``: unchanged.

A dense gradient gets torch's rule exactly (``v ← μ·v + g + λ·θ``, ``v = g + λ·θ`` at the first step). The two
agree when every row is in ``R`` at every step (tested); otherwise the sparse rule is "lazy": dense SGD would keep
moving an untouched row by its decaying momentum (and shrink it by weight decay), here it waits until the row is
sampled again. A step costs ``O(|R|·d)`` for a sparse parameter, whatever its number of rows. The state
(``momentum_buffer``, dense, the parameter's shape) and ``state_dict`` have torch SGD's layout, so the training
checkpoints store and restore it unchanged (resume is exact).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["RowSparseSGD"]


class RowSparseSGD(torch.optim.Optimizer):
    """See the module docstring. ``params`` as for any torch optimizer."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"RowSparseSGD: lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"RowSparseSGD: momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"RowSparseSGD: weight_decay must be non-negative, got {weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

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
                    self._sparse_step(p, p.grad.coalesce(), lr, mu, wd)
                else:
                    self._dense_step(p, p.grad, lr, mu, wd)
        return loss

    def _dense_step(self, p: Tensor, g: Tensor, lr: float, mu: float, wd: float) -> None:
        if wd:
            g = g.add(p, alpha=wd)
        if mu:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = buf = g.detach().clone()
            else:
                buf.mul_(mu).add_(g)
            g = buf
        p.add_(g, alpha=-lr)

    def _sparse_step(self, p: Tensor, g: Tensor, lr: float, mu: float, wd: float) -> None:
        if g.sparse_dim() != 1:
            raise ValueError(f"RowSparseSGD: a sparse gradient must be sparse in its rows only (sparse_dim 1), "
                             f"got sparse_dim {g.sparse_dim()}")
        rows, values = g.indices()[0], g.values()
        if wd:
            values = values + wd * p.index_select(0, rows)
        if mu:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:  # dense SGD starts its buffer at the first gradient; zeros then μ·0 + g is the same
                state["momentum_buffer"] = buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
            values = buf.index_select(0, rows).mul_(mu).add_(values)
            buf.index_copy_(0, rows, values)
        p.index_add_(0, rows, values, alpha=-lr)
