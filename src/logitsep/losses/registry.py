"""The loss registry: ``LOSSES[name]`` is a ``torch.nn.Module`` class, ``get_loss(name, **kwargs)`` builds one.

Registry names are part of the public contract (see DESIGN.md). Each class carries ``name`` and
``pols_aligned`` (True / False / None = not established) as class attributes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

LOSSES: dict[str, type[nn.Module]] = {}


def register(name: str, *, pols_aligned: bool | None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: add a loss module to ``LOSSES`` under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__name__}, {cls.__name__})")
        cls.name = name
        cls.pols_aligned = pols_aligned
        LOSSES[name] = cls
        return cls

    return add


def get_loss(name: str, **kwargs: object) -> nn.Module:
    """Build the loss registered as ``name`` with its keyword arguments (e.g. ``get_loss("nce", num_noise=5)``)."""
    if not isinstance(name, str):
        raise TypeError(f"loss name must be a string, got {type(name).__name__}")
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None
    return cls(**kwargs)
