"""Class search over stored embeddings: "which items of a collection belong to class c?"

Single Logit Classification (Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of
Logit Separation", ICDM 2018) applied to a whole collection: the logit of every stored item for class ``c`` is an
inner product of its item vector ``[h, 1]`` with the class vector ``[W_c, b_c]``, so "all items of class c" is an
inner-product range query and "the best items of class c" a top-k query.

* :mod:`.storage`: :class:`EmbeddingIndex`, the on-disk index (memory-mapped, durable appends, exact search);
* :mod:`.select`: :class:`SearchResult` and the one selection rule every path ends in (threshold / top-k, ties
  by id), and the checks of a search's arguments;
* :mod:`.exact`: what every exact path ends in (candidates within proven error bounds, canonical scores), so all
  paths return the same answer; :mod:`.paths`: which path is fastest on this machine, measured and cached;
* :mod:`.scan`: the exact float32 scan (numpy, torch or FAISS kernels); :mod:`.screen`: the exact float16 screen
  (half the bytes read);
* :mod:`.approximate`: :class:`ApproximateIndex`, FAISS IVF (the ``[search]`` extra);
* :mod:`.classes`: :class:`ClassSearch` (by class index or name, refusing an index of another head), and the
  item / class vectors of a head;
* :mod:`.build`: :func:`build_index`, ``logitsep index RUN``.
"""

from .approximate import ApproximateIndex
from .build import build_index
from .classes import ClassSearch, class_vectors, head_fingerprint, item_vectors
from .select import SearchResult
from .storage import DATA, HEADER, EmbeddingIndex

__all__ = ["DATA", "HEADER", "ApproximateIndex", "ClassSearch", "EmbeddingIndex", "SearchResult", "build_index",
           "class_vectors", "head_fingerprint", "item_vectors"]
