"""Sampled forms of the PoLS-aligned losses: a training step that computes only the logits it needs.

The exact losses take all ``[m, k]`` logits, ``O(m·k·d)`` per step. The forms here take the features ``h [m, d]``,
the head's ``weight [k, d]`` and ``bias [k]`` and the class indices ``y [m]``, and compute the logits of a
**candidate set** ``C`` only, ``O(m·|C|·d)``:

* ``C = T ∪ S``: ``T`` the batch's true classes (always in) and ``S`` a sample of the other classes. Uniform (as in
  Partial FC): ``C`` has ``num_sampled`` classes, ``S`` being ``s = num_sampled − |T|`` (at least 1) classes drawn
  uniformly without replacement from the ``k − |T|`` others (a simple random sample: ``π_j = s/(k − |T|)``), so a
  step scores the same number of classes whatever k. For ``nce`` with a given noise distribution ``q``: ``S`` is the
  distinct classes of ``num_sampled`` draws with replacement from ``q`` (``π_j = 1 − (1 − q_j)^num_sampled``).
* Every sum over classes ``Σ_j f(z_ij)`` becomes the Horvitz–Thompson estimate ``Σ_{j∈C} f(z_ij)/π_j`` (``π_j = 1``
  on ``T``): **unbiased** for the sum, whatever ``f``. As ``log w_j = −log π_j`` added to a logit inside a
  log-sum-exp it is the "log-probability correction" of sampled softmax (Jean et al. 2015), with the inclusion
  probability in place of the expected count.
* ``num_sampled >= k`` (or the sample covering every class by chance is *not* enough: ``π_j < 1`` there) takes
  ``C`` = all classes with ``π = 1``: the value **is** the exact loss (tested, values and gradients).

Per loss (class-index targets; multi-label targets are refused, they have no sampled form here):

* :func:`sampled_bce`: ``softplus(−z_y) + Σ_{j∈C, j≠y} softplus(z_j)/π_j``. Unbiased for ``bce``.
* :func:`sampled_nce`: ``softplus(log(t·q_y) − z_y) + t·Σ_{j∈C} (q_j/π_j)·softplus(z_j − log(t·q_j))``, the
  proposal ``p = q``. Unbiased for exact ``nce`` (the expectation over the noise taken over all k classes; not
  the per-example draws of ``nce(sampled=True)``, which is another unbiased estimate of the same value).
* :func:`sampled_batch_ce`: the batch's log-partition ``log Σ_i Σ_j e^{z_ij}`` replaced by
  ``log Σ_i Σ_{j∈C} e^{z_ij − log π_j}``, the log of an unbiased estimate; by Jensen's inequality it is biased
  **low** (the loss is too small on average), the bias shrinking as the sample grows (it is zero at full
  coverage). ``batch_ce`` is itself a batch estimate, so this is a second, smaller one.

The gradients reach only the rows of ``C`` (:func:`logitsep.core.rows.gather_rows`: a sparse gradient), which
:class:`logitsep.optim.RowSparseSGD` applies row by row: a step costs ``O(m·|C|·d)`` whatever ``k``. Sampling is
``O(num_sampled·log num_sampled)`` for the uniform proposal; a custom ``nce`` noise vector is sampled with
``torch.multinomial``, ``O(k)`` per step (still far below the ``O(m·k·d)`` of the exact loss). Draws use
``generator`` or torch's global generator (whose state the training checkpoint saves, so a resumed run draws the
same candidates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_positive, check_positive_int, check_reduction, check_target
from ..core.rows import gather_rows
from .binary import check_noise
from .common import reduce
from .registry import SAMPLED_FORMS, loss_spec, register_sampled

__all__ = ["Candidates", "SampledLoss", "sample_candidates", "sampled_batch_ce", "sampled_bce",
           "sampled_logits", "sampled_nce"]


@dataclass(frozen=True)
class Candidates:
    """The classes a sampled step scores: ``classes [s]`` (sorted, distinct), ``log_weight [s]`` (``−log π_j``,
    0 for the batch's true classes) and ``target_pos [m]`` (the column of each example's class in ``classes``)."""

    classes: Tensor
    log_weight: Tensor
    target_pos: Tensor


def _distinct_uniform(k: int, s: int, exclude: Tensor, generator: torch.Generator | None,
                      device: torch.device) -> Tensor:
    """``s`` distinct classes of ``k`` outside ``exclude`` (a sorted tensor of distinct classes), every such
    ``s``-subset equally likely; returned in no particular order. The others are numbered ``0 … k−|exclude|−1`` in
    order and a uniform ``s``-subset of the numbers is drawn, then mapped to classes (:func:`_skip_excluded`).
    Without a ``k``-sized permutation when ``s ≪ k``: given their number ``m``, the distinct values of a batch of
    uniform draws are a uniform ``m``-subset (the law of the draws is symmetric under relabelling), so a uniform
    ``s``-subset of them (``m ≥ s``) is a uniform ``s``-subset of all; a batch with ``m < s`` is drawn again,
    larger."""
    others = k - len(exclude)
    if 2 * (s + len(exclude)) > k:  # a permutation is cheap next to the step then
        picked = torch.randperm(others, generator=generator, device=device)[:s]
    else:
        n = s + s // 4 + 16
        while True:
            picked = torch.unique(torch.randint(others, (n,), generator=generator, device=device))
            if len(picked) >= s:
                break
            n *= 2
        if len(picked) > s:
            picked = picked[torch.randperm(len(picked), generator=generator, device=device)[:s]]
    return _skip_excluded(picked, exclude.to(device))


def _skip_excluded(picked: Tensor, exclude: Tensor) -> Tensor:
    """The ``picked``-th classes outside ``exclude`` (sorted, distinct). The ``j``-th such class is ``j`` plus the
    number of excluded classes below it, and ``exclude[i]`` is below it exactly when ``exclude[i] − i ≤ j`` (``i``
    classes of ``exclude`` and ``exclude[i] − i`` others lie below ``exclude[i]``): one ``searchsorted``."""
    below = exclude - torch.arange(len(exclude), device=exclude.device)  # non-decreasing
    return picked + torch.searchsorted(below, picked, right=True)


def _log_inclusion(p: Tensor, draws: int) -> Tensor:
    """``log(1 − (1 − p)^draws)``, computed as ``log(−expm1(draws·log1p(−p)))`` (no cancellation for small p)."""
    return torch.log(-torch.expm1(draws * torch.log1p(-p.double()))).to(p.dtype)


def sample_candidates(target: Tensor, k: int, num_sampled: int, *, noise: Tensor | None = None,
                      generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Candidates:
    """Draw the candidate set of a sampled step (module docstring): the true classes of ``target`` plus sampled ones,
    ``num_sampled`` classes in all (uniform), or the distinct classes of ``num_sampled`` draws from ``noise`` (a
    probability vector of length ``k``)."""
    num_sampled = check_positive_int(num_sampled, "num_sampled", "sampled loss")
    device = target.device
    if num_sampled >= k:  # full coverage: the exact loss
        classes = torch.arange(k, device=device)
        return Candidates(classes, torch.zeros(k, dtype=dtype, device=device), target)
    gen_device = generator.device if generator is not None else device
    true = torch.unique(target)
    if noise is None:  # a simple random sample of the other classes: each is in it with probability s / others
        others = k - len(true)
        s = min(max(num_sampled - len(true), 1), others)
        draws = _distinct_uniform(k, s, true, generator, gen_device).to(device)
        classes = torch.sort(torch.cat([true, draws])).values  # distinct: the draws avoid the true classes
        log_weight = torch.full((len(classes),), math.log(others / s), dtype=torch.float64, device=device)
    else:
        draws = torch.multinomial(noise.float().to(gen_device), num_sampled, replacement=True, generator=generator)
        classes = torch.unique(torch.cat([true, draws.to(device)]))
        log_weight = -_log_inclusion(noise.to(device=device, dtype=torch.float64)[classes], num_sampled)
    log_weight[torch.searchsorted(classes, true)] = 0.0  # the batch's classes are in C with probability 1
    return Candidates(classes, log_weight.to(dtype), torch.searchsorted(classes, target))


def sampled_logits(h: Tensor, weight: Tensor, bias: Tensor | None, classes: Tensor) -> Tensor:
    """``h @ weight[classes].T + bias[classes]``, ``[m, len(classes)]``; the head's gradient is sparse (its rows
    ``classes`` only)."""
    z = h @ gather_rows(weight, classes).T
    return z if bias is None else z + gather_rows(bias, classes)


def _check_inputs(h: object, weight: object, bias: object, target: object, where: str) -> tuple[Tensor, Tensor]:
    for name, value in (("h", h), ("weight", weight)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point torch.Tensor, got {type(value).__name__}")
    assert isinstance(h, Tensor) and isinstance(weight, Tensor)
    if weight.dim() != 2 or h.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: h must be [batch, d] and weight [k, d] with the same d, got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"{where}: bias must be None or a [{weight.shape[0]}] tensor")
    if not isinstance(target, Tensor):
        raise TypeError(f"{where}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dim() != 1:
        raise ValueError(f"{where}: target must be [batch] class indices (sampled losses take no multi-label "
                         f"targets), got shape {tuple(target.shape)}")
    shape = h.new_empty(()).expand(h.shape[0], weight.shape[0])  # [m, k] for the check, nothing allocated
    return h, check_target(target, shape, where)


@register_sampled("bce")
def sampled_bce(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, num_sampled: int,
                generator: torch.Generator | None = None, reduction: str = "mean",
                candidates: Candidates | None = None) -> Tensor:
    """Sampled binary cross-entropy (module docstring): unbiased for :func:`~logitsep.losses.binary_cross_entropy`
    on the logits ``h @ weight.T + bias``, exact when ``num_sampled >= k``."""
    check_reduction(reduction, "sampled bce")
    h, y = _check_inputs(h, weight, bias, target, "sampled bce")
    c = candidates or sample_candidates(y, weight.shape[0], num_sampled, generator=generator, dtype=h.dtype)
    z = sampled_logits(h, weight, bias, c.classes)
    true = z.gather(1, c.target_pos[:, None])
    w = c.log_weight.exp().expand_as(z).scatter(1, c.target_pos[:, None], 0.0)  # the true class is no negative
    return reduce(F.softplus(-true).squeeze(1) + (F.softplus(z) * w).sum(dim=1), reduction)


@register_sampled("nce")
def sampled_nce(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, num_sampled: int,
                num_noise: float = 25, noise: Tensor | None = None, generator: torch.Generator | None = None,
                reduction: str = "mean", candidates: Candidates | None = None) -> Tensor:
    """Sampled NCE (module docstring): unbiased for exact :func:`~logitsep.losses.nce` (``sampled=False``) on the
    logits ``h @ weight.T + bias``, with the ``log(t·q)`` correction of Mnih & Teh; exact when ``num_sampled >= k``.
    Candidates are drawn from the noise distribution ``q`` itself."""
    t = check_positive(num_noise, "num_noise", "sampled nce")
    check_reduction(reduction, "sampled nce")
    h, y = _check_inputs(h, weight, bias, target, "sampled nce")
    k = weight.shape[0]
    q = None if noise is None else check_noise(noise, k, h.device, h.dtype)
    c = candidates or sample_candidates(y, k, num_sampled, noise=q, generator=generator, dtype=h.dtype)
    z = sampled_logits(h, weight, bias, c.classes)
    # log(t·q_j) on the candidates (q_j = 0 clamped as in exact nce: such a class is never noise, its weight is 0)
    q_c = h.new_full((len(c.classes),), 1.0 / k) if q is None else q[c.classes]
    log_tq = math.log(t) + torch.log(q_c.clamp_min(torch.finfo(h.dtype).tiny))
    data = F.softplus(log_tq[c.target_pos] - z.gather(1, c.target_pos[:, None]).squeeze(1))
    noise_term = t * (F.softplus(z - log_tq) @ (q_c * c.log_weight.exp()))
    return reduce(data + noise_term, reduction)


@register_sampled("batch_ce")
def sampled_batch_ce(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, num_sampled: int,
                     generator: torch.Generator | None = None, reduction: str = "mean",
                     candidates: Candidates | None = None) -> Tensor:
    """Sampled batch cross-entropy (module docstring): the batch's log-partition from the candidates with the
    ``−log π`` correction; consistent for :func:`~logitsep.losses.batch_cross_entropy`, biased low for a finite
    sample, exact when ``num_sampled >= k``. ``reduction`` as in ``batch_ce``."""
    check_reduction(reduction, "sampled batch_ce")
    h, y = _check_inputs(h, weight, bias, target, "sampled batch_ce")
    m = h.shape[0]
    if m < 2:
        raise ValueError(f"sampled batch_ce: a batch loss needs at least 2 examples, got {m}")
    c = candidates or sample_candidates(y, weight.shape[0], num_sampled, generator=generator, dtype=h.dtype)
    z = sampled_logits(h, weight, bias, c.classes)
    log_partition = torch.logsumexp((z + c.log_weight).reshape(-1), dim=0)
    per_row = log_partition - z.gather(1, c.target_pos[:, None]).squeeze(1) - math.log(m)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / m if reduction == "mean" else total


class SampledLoss(nn.Module):
    """The sampled form of the registered loss ``name`` (``bce``, ``nce``, ``batch_ce``), ``num_sampled`` draws
    per step: ``SampledLoss("nce", 1024, num_noise=25)(h, head.weight, head.bias, y)``. ``loss_kwargs`` are the
    exact loss's (``nce``: ``num_noise``, ``noise``; ``sampled=True`` is refused: the candidates are the sample)."""

    def __init__(self, name: str, num_sampled: int, generator: torch.Generator | None = None,
                 reduction: str = "mean", **loss_kwargs: object) -> None:
        super().__init__()
        spec = loss_spec(name)
        if spec.sampled is None:
            raise ValueError(f"loss {name!r} has no sampled form; sampled forms exist for "
                             f"{', '.join(sorted(SAMPLED_FORMS))}")
        if spec.inputs != "logits":
            raise ValueError(f"loss {name!r} takes cosines; sampled forms take a linear head")
        if loss_kwargs.pop("sampled", False):
            raise ValueError("nce: sampled=True draws noise per example from all k logits; with num_sampled the "
                             "candidate set is the sample (leave sampled out)")
        loss_kwargs.pop("reduction", None)
        self.name, self.num_sampled = name, check_positive_int(num_sampled, "num_sampled", "sampled loss")
        self.reduction = check_reduction(reduction, f"sampled {name}")
        self.generator, self.loss_kwargs = generator, loss_kwargs
        self.pols_aligned = spec.pols_aligned

    def candidates(self, target: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Candidates:
        """The candidate set of a step on ``target`` (``nce``: drawn from its ``noise``), for :meth:`forward`'s
        ``candidates`` (training draws it first, to bring those head rows up to date before the forward pass:
        :meth:`logitsep.optim.RowSparseSGD.catch_up`)."""
        noise = self.loss_kwargs.get("noise") if self.name == "nce" else None
        q = None if noise is None else check_noise(noise, k, target.device, dtype)
        return sample_candidates(target, k, self.num_sampled, noise=q, generator=self.generator, dtype=dtype)

    def forward(self, h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                candidates: Candidates | None = None) -> Tensor:
        return SAMPLED_FORMS[self.name](h, weight, bias, target, self.num_sampled, generator=self.generator,
                                        reduction=self.reduction, candidates=candidates, **self.loss_kwargs)

    def extra_repr(self) -> str:
        return f"{self.name}, num_sampled={self.num_sampled}"
