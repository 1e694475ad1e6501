"""Optional parts of logitsep and the package extra that brings each.

``pip install logitsep`` gives the losses, metrics, heads, training and single-logit inference. The service
(``[serve]``: FastAPI, uvicorn), approximate search (``[search]``: FAISS), the plots of reports and
benchmarks (``[plots]``: matplotlib), torchvision and timm backbones (``[vision]``) and the printed-characters
dataset (``[glyphs]``: fontTools) come with extras; ``make setup`` installs them all. :func:`require` imports
one of them or raises :class:`MissingExtra`, whose message is one line naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: module → (the extra that installs it, what needs it)
EXTRAS = {
    "fastapi": ("serve", "the web service (logitsep serve)"),
    "uvicorn": ("serve", "the web service (logitsep serve)"),
    "starlette": ("serve", "the web service (logitsep serve)"),
    "faiss": ("search", "approximate (IVF) class search"),
    "matplotlib": ("plots", "the plots of reports and benchmarks"),
    "fontTools": ("glyphs", "the printed-characters dataset (glyphs)"),
}


class MissingExtra(ImportError, ValueError):
    """A package of an optional part is not installed; the message says which extra brings it."""


class MissingDependencyError(ImportError, ValueError):
    """An optional package that no extra brings (scipy, torchvision) is missing or broken; the message names it
    and says what to do."""


def require(module: str) -> ModuleType:
    """Import ``module`` (a key of :data:`EXTRAS`, or one of its submodules), or raise :class:`MissingExtra`."""
    top = module.partition(".")[0]
    extra, purpose = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{purpose} needs {top}, which is not installed: pip install 'logitsep[{extra}]' "
                           f"({err})") from None
