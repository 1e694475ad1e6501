"""Search by class with a model's head: the query of class ``c`` is its class vector, so the scores are the
logits ``z_c`` of the stored items.

With a linear head the logit of class ``c`` is ``z_c(h) = W_c·h + b_c = [W_c, b_c]·[h, 1]``: folding the bias in
as an extra dimension makes the logit of every stored item an inner product with one class vector, so "all items
of class c" is an inner-product range query (``score ≥ threshold``) and "the best items of class c" a top-k
query (:meth:`~logitsep.heads.Head.class_vectors`, :meth:`~logitsep.heads.Head.item_vectors`). One threshold per
class works only if logits are comparable across examples, which is what PoLS-aligned losses train for.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.checks import parse_class
from ..heads import Head, as_head
from ..runs import load_run
from .select import SearchResult
from .storage import EmbeddingIndex


@torch.no_grad()
def item_vectors(head: nn.Module, h: Tensor) -> Tensor:
    """The stored vector of each embedding, ``[n, d+1]`` float32 on ``h``'s device (:meth:`Head.item_vectors`)."""
    return as_head(head).item_vectors(h)


@torch.no_grad()
def class_vectors(head: nn.Module, classes: object = None) -> Tensor:
    """The query vector of each class, ``[q, d+1]`` float32 on CPU (:meth:`Head.class_vectors`); ``classes``: an
    int, a sequence of ints, a 1-D integer tensor, or None for every class."""
    return as_head(head).class_vectors(classes)


def head_fingerprint(head: nn.Module) -> str:
    """SHA-256 of the head (:meth:`Head.fingerprint`): an index stores the fingerprint of the head that built it,
    and :class:`ClassSearch` refuses to search it with any other head."""
    return as_head(head).fingerprint()


def _head_rows(meta: dict, k: int) -> int:
    """The rows of the head an index was built with (its trained classes): ``head_rows`` in its header, else the
    number of its class names, else ``k``."""
    rows = meta.get("head_rows")
    if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1:
        return rows
    names = meta.get("class_names")
    return len(names) if isinstance(names, list) and names else k


class ClassSearch:
    """Search an :class:`~.storage.EmbeddingIndex` by class with a model's head.

    The index must hold vectors of the head's dimension ``d + 1``, and, when its header records the fingerprint
    of the head that built it (``logitsep index`` does), that fingerprint must be this head's: scores of one
    model's class vectors against another model's embeddings mean nothing.
    """

    def __init__(self, index: EmbeddingIndex, head: nn.Module, class_names: Sequence[str] | None = None) -> None:
        self.index, self.head = index, as_head(head)
        self.num_classes, d = self.head.k, self.head.d
        if index.dim != d + 1:
            raise ValueError(f"{index.path} holds {index.dim}-dimensional vectors but this head's class vectors have "
                             f"{d + 1} (embedding dimension {d} + the bias): built with another model")
        expected, rows = index.meta.get("head_sha256"), _head_rows(index.meta, self.head.k)
        ours = self.head.fingerprint(rows) if rows <= self.head.k else "(fewer rows)"
        if expected is not None and expected != ours:
            raise ValueError(f"{index.path} was built with a different model head (fingerprint {expected[:12]}…, "
                             f"this head's is {ours[:12]}…); rebuild it with `logitsep index`")
        names = class_names if class_names is not None else index.meta.get("class_names")
        if class_names is None and names and len(names) < self.num_classes:  # built before classes were enrolled
            names = None
        self.class_names = list(names) if names else [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a head of {self.num_classes} classes")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, index_dir: str | os.PathLike, device: str = "cpu") -> ClassSearch:
        """The head and class names of the run in ``run_dir`` (``logitsep train``) over the index in ``index_dir``."""
        run = load_run(run_dir, device)
        return cls(EmbeddingIndex.open(index_dir), run.model.head, run.class_names)

    def class_index(self, c: object) -> int:
        """The index of class ``c`` (an int in ``[0, k)``, one of ``class_names``, or a string of an index)."""
        return parse_class(c, self.class_names)

    def search(self, classes: object, threshold: object = None,
               top_k: int | None = None) -> SearchResult | list[SearchResult]:
        """Items of class ``classes`` (one class: int or name → one result) or of each of several classes (a
        list → a list of results, answered in one scan): scores ``z_c`` of the stored items, ``≥ threshold``
        and/or the ``top_k`` best. ``threshold``: one number, or one per class."""
        if isinstance(classes, bool):
            raise TypeError("a class is an int or a class name, got a bool")
        if isinstance(classes, Tensor) and classes.dim() == 0:
            classes = classes.item()
        single = isinstance(classes, (str, numbers.Integral, np.integer))
        items = [classes] if single else list(classes)  # type: ignore[call-overload]
        queries = self.head.class_vectors([self.class_index(c) for c in items])
        results = self.index.search(queries, threshold=threshold, top_k=top_k)
        return results[0] if single else results


__all__ = ["ClassSearch", "Head", "class_vectors", "head_fingerprint", "item_vectors"]
