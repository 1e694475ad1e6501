"""The loss registry: one :class:`LossSpec` per loss, recorded where the loss is defined.

``LOSSES[name]`` is the loss's ``torch.nn.Module`` class and ``get_loss(name, **kwargs)`` builds one (registry
names are part of the public contract, see DESIGN.md); ``LOSS_SPECS[name]`` / :func:`loss_spec` hold what the
rest of logitsep needs to know about a loss, in one place:

* ``pols_aligned``: True / False / None (not established); also a class attribute of the module, as ``name``;
* ``functional``: the functional form (``functional(logits, target, **kwargs)`` equals the module's value);
* ``inputs``: ``"logits"``, or ``"cosines"`` for the cosine-margin losses (a model trained with one ends with a
  ``CosineHead``: :attr:`LossSpec.head`);
* ``multilabel``: whether it also takes ``[m, k]`` 0/1 targets;
* ``sampled``: the sampled form (features, head rows and targets in; only the logits of a candidate set computed;
  :mod:`.sampled`), or None for losses without one;
* ``global_batch``: whether a built loss must see the whole batch of a data-parallel step
  (:meth:`LossSpec.needs_global_batch`): it couples the examples of a batch (``batch_ce``, ElasticFace+), or it
  draws random numbers per example (sampled ``nce``, ElasticFace with ``std > 0``), which on the global batch are
  the draws one process would make. A bool, or a function of the built module for losses where it depends on
  the arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

INPUTS = ("logits", "cosines")


@dataclass(frozen=True)
class LossSpec:
    """What logitsep knows about one registered loss (see the module docstring)."""

    name: str
    module: type[nn.Module]
    functional: Callable[..., object]
    pols_aligned: bool | None
    inputs: str = "logits"
    multilabel: bool = False
    global_batch: bool | Callable[[nn.Module], bool] = False

    @property
    def sampled(self) -> Callable[..., object] | None:
        """The sampled form of this loss (see :mod:`logitsep.losses.sampled`), or None."""
        return SAMPLED_FORMS.get(self.name)

    @property
    def head(self) -> str:
        """The head a model trained with this loss ends with: ``"cosine"`` for cosine inputs, else ``"linear"``."""
        return "cosine" if self.inputs == "cosines" else "linear"

    def needs_global_batch(self, loss: nn.Module) -> bool:
        """Whether the built ``loss`` must be computed on the global batch of a data-parallel step."""
        return bool(self.global_batch(loss) if callable(self.global_batch) else self.global_batch)


LOSSES: dict[str, type[nn.Module]] = {}
LOSS_SPECS: dict[str, LossSpec] = {}
SAMPLED_FORMS: dict[str, Callable[..., object]] = {}


def register(name: str, *, pols_aligned: bool | None, functional: Callable[..., object], inputs: str = "logits",
             multilabel: bool = False,
             global_batch: bool | Callable[[nn.Module], bool] = False) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: record the loss module's :class:`LossSpec` under ``name`` (and the class in ``LOSSES``)."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__name__}, {cls.__name__})")
        cls.name = name
        cls.pols_aligned = pols_aligned
        LOSSES[name] = cls
        LOSS_SPECS[name] = LossSpec(name, cls, functional, pols_aligned, inputs, multilabel, global_batch)
        return cls

    return add


def register_sampled(name: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Function decorator: record the sampled form of the registered loss ``name``."""

    def add(fn: Callable[..., object]) -> Callable[..., object]:
        if name not in LOSSES:
            raise ValueError(f"register_sampled: no loss {name!r} is registered")
        if name in SAMPLED_FORMS:
            raise ValueError(f"the sampled form of {name!r} is registered twice")
        SAMPLED_FORMS[name] = fn
        return fn

    return add


def loss_spec(loss: str | nn.Module) -> LossSpec:
    """The spec of a registered loss, by name or from a built loss module."""
    name = loss if isinstance(loss, str) else getattr(type(loss), "name", None)
    if not isinstance(name, str) or name not in LOSS_SPECS:
        shown = loss if isinstance(loss, str) else type(loss).__name__
        raise ValueError(f"unknown loss {shown!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSS_SPECS[name]


def get_loss(name: str, **kwargs: object) -> nn.Module:
    """Build the loss registered as ``name`` with its keyword arguments (e.g. ``get_loss("nce", num_noise=5)``)."""
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string, got {type(name).__name__}")
    return loss_spec(name).module(**kwargs)
