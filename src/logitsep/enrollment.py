"""Classes added after training ("enrollment"): a new row of the head written from a few examples, and the file
that holds such rows in a run folder.

A PoLS-aligned model puts every true logit above every false logit, across the data, so one global threshold
decides "is x of class c?" for every class. A class added later is useful only if its single logit lives on the
same scale: its positives above that global threshold, everything else below. Two rules write the new row from the
embeddings ``h`` of its examples and the stored embeddings of known-class examples (the negatives,
:data:`NEGATIVES`):

* ``"imprint"`` (weight imprinting, Qi, Brown & Lowe, CVPR 2018): the direction is the mean of the normalised
  embeddings. A cosine head uses it as is (no bias: the scale is the head's). A linear head scores ``w·h``, not a
  cosine, so the embeddings are first centred by the negatives' mean (uncentred, on ReLU features, the direction
  mostly measures ``‖h‖``: measured, 1−AUPRC ~0.86 on digits); the row is that direction times the median norm of
  the trained rows, and the bias puts the global threshold halfway between the mean positive logit and the 99.9%
  quantile of the negatives' logits.
* ``"fit"``: start from the imprinted row and fit it (and the bias) by logistic regression of ``z − T`` (``T`` the
  global threshold) on the few positives against the stored negatives, positives and negatives weighted equally,
  with an L2 pull towards the imprinted row; float64 L-BFGS. The decision boundary is then the global threshold
  itself.

Which rule is the default was decided by measurement (``results/enroll/``, see :data:`DEFAULT_RULE`).

Thresholds: an enrolled class's threshold **is the run's global threshold** (whatever ``thresholds.json`` says now,
so a recalibration carries over). A per-class threshold for a precision of 0.99 needs on the order of a hundred
positives to resolve 1%, which a few examples do not give; the global threshold was calibrated on every known
class's held-out data and it is the point of PoLS that it holds for a new row placed on its scale. The global
threshold itself is kept, not re-derived: it belongs to the known classes' data.

File ``RUN/enrolled.safetensors`` (written atomically: temporary file, fsync, rename, fsync of the folder; a crash
leaves the old file or the new one): tensors ``weight [m, d]`` (and ``bias [m]`` for a linear head with a bias),
metadata ``format = logitsep-enrolled``, ``version = 1``, ``base_sha256`` (the ``model.safetensors`` the rows
extend: another checkpoint refuses them) and ``classes`` (JSON: one ``{"name", "rule", "examples"}`` per row).
Class ids: the trained classes keep ``0 … k−1``; enrolled class ``i`` is ``k + i`` in enrollment order (removing
one renumbers those after it).

File ``RUN/negatives.safetensors``: embeddings ``h [N, d]`` and labels ``y [N]`` of up to :data:`MAX_NEGATIVES`
validation examples (a seeded sample), metadata ``base_sha256``, ``dataset`` and ``split``; built once, on the first
enrollment, from the run's dataset.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .core.files import atomic_write, fsync_dir, invalid
from .heads import CosineHead, Head, LinearHead, as_head

__all__ = ["DEFAULT_RULE", "ENROLLED", "MAX_EXAMPLES", "MAX_NEGATIVES", "NEGATIVES", "RULES", "Enrolled",
           "check_name", "extend_head", "new_row", "read_enrolled", "read_negatives", "row_logit", "truncate_head",
           "write_enrolled", "write_negatives"]

ENROLLED = "enrolled.safetensors"
NEGATIVES = "negatives.safetensors"
RULES = ("imprint", "fit")
DEFAULT_RULE = "fit"
MAX_EXAMPLES = 1024  # examples of one enrollment
MAX_NEGATIVES = 4096
MAX_NAME = 200  # characters of a class name
_FORMAT, _NEG_FORMAT, _VERSION = "logitsep-enrolled", "logitsep-negatives", "1"


@dataclass
class Enrolled:
    """The enrolled rows of a run: ``names``, ``weight [m, d]``, ``bias [m]`` (None for a head without one),
    ``info`` (one ``{"rule", "examples"}`` per class) and the ``base_sha256`` of the checkpoint they extend."""

    base_sha256: str
    names: list[str] = field(default_factory=list)
    weight: Tensor | None = None
    bias: Tensor | None = None
    info: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str, w: Tensor, b: Tensor | None, info: dict[str, Any]) -> Enrolled:
        """A new :class:`Enrolled` with one more class (this one unchanged)."""
        w = w.detach().float().cpu().reshape(1, -1)
        weight = w if self.weight is None else torch.cat([self.weight, w])
        bias = None if b is None else (b.detach().float().cpu().reshape(1) if self.bias is None
                                       else torch.cat([self.bias, b.detach().float().cpu().reshape(1)]))
        return Enrolled(self.base_sha256, [*self.names, name], weight, bias, [*self.info, dict(info)])

    def without(self, i: int) -> Enrolled:
        """A new :class:`Enrolled` without the ``i``-th enrolled class."""
        keep = [j for j in range(len(self)) if j != i]
        def pick(t):
            return (None if t is None or not keep else t[keep].clone())
        return Enrolled(self.base_sha256, [self.names[j] for j in keep], pick(self.weight), pick(self.bias),
                        [self.info[j] for j in keep])


def check_name(name: object, existing: Sequence[str]) -> str:
    """A new class name: a non-empty string of at most :data:`MAX_NAME` characters, without control characters, not
    already a class name (nor a string of an index, which would make ``"3"`` ambiguous)."""
    if not isinstance(name, str):
        raise TypeError(f"a class name must be a string, got {type(name).__name__}")
    if not name.strip():
        raise ValueError("a class name must not be empty")
    if len(name) > MAX_NAME:
        raise ValueError(f"a class name has at most {MAX_NAME} characters, got {len(name)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise ValueError(f"a class name must not contain control characters: {name!r}")
    if name in existing:
        raise ValueError(f"class {name!r} exists already (class {list(existing).index(name)})")
    if name.strip().isdigit():
        raise ValueError(f"a class name must not be a number ({name!r} would read as a class index)")
    return name


# --------------------------------------------------------------------------------------------------- the rules


@torch.no_grad()
def _imprint(head: Head, h: Tensor, neg: Tensor, threshold: float) -> tuple[Tensor, Tensor | None]:
    if isinstance(head, CosineHead):
        return F.normalize(F.normalize(h.double(), dim=1).mean(0), dim=0), None
    # A linear head scores w·h, not a cosine: with non-negative (ReLU) features every direction of uncentred means
    # correlates with ‖h‖. Centred by the negatives' mean, the normalised mean is the direction that separates.
    centre = neg.double().mean(0) if len(neg) else torch.zeros(h.shape[1], dtype=torch.float64)
    direction = F.normalize(F.normalize(h.double() - centre, dim=1).mean(0), dim=0)
    w = direction * head.weight.detach().double().norm(dim=1).median()
    if head.bias is None:
        return w, None
    pos, negs = h.double() @ w, neg.double() @ w
    top = torch.quantile(negs, 0.999) if len(negs) else pos.mean() - 1.0
    return w, threshold - 0.5 * (pos.mean() + top)


def row_logit(head: Head, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The logit of a candidate row ``(w, b)`` of ``head``'s kind for embeddings ``h`` (what the row scores once
    appended: ``w·h + b``, or ``scale·cos(h, w)`` for a cosine head)."""
    if isinstance(head, CosineHead):
        return head.scale * (F.normalize(h, dim=1) @ F.normalize(w, dim=0))
    return h @ w + (b if b is not None else 0.0)


def _fit(head: Head, h: Tensor, neg: Tensor, threshold: float, l2: float = 1e-2,
         iterations: int = 100) -> tuple[Tensor, Tensor | None]:
    w0, b0 = _imprint(head, h, neg, threshold)
    if not len(neg):
        return w0, b0
    scale = float(w0.norm()) or 1.0
    h64, neg64 = h.double(), neg.double()
    w = w0.clone().requires_grad_(True)
    b = None if b0 is None else b0.clone().reshape(()).requires_grad_(True)
    params = [w] if b is None else [w, b]
    opt = torch.optim.LBFGS(params, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = 0.5 * (F.softplus(threshold - row_logit(head, h64, w, b)).mean()
                      + F.softplus(row_logit(head, neg64, w, b) - threshold).mean())
        loss = loss + 0.5 * l2 * (w - w0).square().sum() / scale ** 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), None if b is None else b.detach()


def new_row(rule: str, head: Head, h: Tensor, negatives: Tensor, threshold: float) -> tuple[Tensor, Tensor | None]:
    """The row ``(w [d], b or None)`` of a new class from its examples' embeddings ``h [n, d]`` and the
    negatives' ``[N, d]``, placed against the global ``threshold`` by ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown enrollment rule {rule!r}; valid rules: {', '.join(RULES)}")
    head = as_head(head)
    if h.dim() != 2 or h.shape[1] != head.d or not len(h):
        raise ValueError(f"embeddings of the new class must be [n >= 1, {head.d}], got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError("the new class's embeddings are not all finite")
    w, b = (_imprint if rule == "imprint" else _fit)(head, h.detach().cpu(), negatives.detach().cpu(),
                                                      float(threshold))
    if not torch.isfinite(w).all() or (b is not None and not math.isfinite(float(b))):
        raise ValueError(f"the {rule!r} rule gave a non-finite row (examples all zero?)")
    return w.float(), None if b is None else b.float().reshape(())


# ------------------------------------------------------------------------------------------------------ the head


@torch.no_grad()
def extend_head(base: Head, enrolled: Enrolled) -> Head:
    """A new head: ``base``'s rows followed by the enrolled ones (``base`` unchanged); ``base`` when none."""
    base = as_head(base)
    if not len(enrolled):
        return base
    weight = enrolled.weight.to(base.weight.device, base.weight.dtype)
    if weight.shape[1] != base.d:
        raise ValueError(f"enrolled rows have dimension {weight.shape[1]}, the head {base.d}")
    k = base.k + len(enrolled)
    if isinstance(base, CosineHead):
        head: Head = CosineHead(base.d, k, scale=base.scale)
    else:
        head = LinearHead(base.d, k, bias=base.bias is not None)
    head = head.to(base.weight.device, base.weight.dtype)
    head.weight.copy_(torch.cat([base.weight.detach(), weight]))
    if getattr(base, "bias", None) is not None:
        if enrolled.bias is None:
            raise ValueError("enrolled rows have no bias but the head has one")
        head.bias.copy_(torch.cat([base.bias.detach(), enrolled.bias.to(base.bias.device, base.bias.dtype)]))
    return head.eval()


# ------------------------------------------------------------------------------------------------------- files


def _save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                             metadata=metadata))
    fsync_dir(path.parent)  # the rename itself is durable
    return path


def _load(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise invalid(str(path), what, str(err)) from err


def write_enrolled(run: str | os.PathLike, enrolled: Enrolled) -> Path:
    """Write ``run/enrolled.safetensors`` atomically; with no class left, remove it (and fsync the folder)."""
    path = Path(run) / ENROLLED
    if not len(enrolled):
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
        return path
    tensors = {"weight": enrolled.weight.float()}
    if enrolled.bias is not None:
        tensors["bias"] = enrolled.bias.float()
    classes = [{"name": n, **i} for n, i in zip(enrolled.names, enrolled.info, strict=True)]
    return _save(path, tensors, {"format": _FORMAT, "version": _VERSION, "base_sha256": enrolled.base_sha256,
                                 "classes": json.dumps(classes, ensure_ascii=False)})


def read_enrolled(run: str | os.PathLike, base_sha256: str, d: int, has_bias: bool) -> Enrolled:
    """The enrolled rows of ``run`` (empty when it has none). ``ValueError`` naming the file when it is not a valid
    enrollment file, or extends another checkpoint than ``base_sha256``, or rows of another dimension than ``d``."""
    path = Path(run) / ENROLLED
    if not path.is_file():
        return Enrolled(base_sha256)
    tensors, meta = _load(path, "enrollment file")

    def bad(problem: str) -> ValueError:
        return invalid(str(path), "enrollment file", problem)

    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise bad(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {_FORMAT} {_VERSION}")
    if meta.get("base_sha256") != base_sha256:
        raise bad(f"its rows extend another checkpoint (sha256 {str(meta.get('base_sha256'))[:12]}…, this run's "
                  f"model.safetensors is {base_sha256[:12]}…); enroll the classes again")
    try:
        classes = json.loads(meta.get("classes", ""))
        names = [str(c["name"]) for c in classes]
        info = [{k: v for k, v in c.items() if k != "name"} for c in classes]
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise bad(f"classes metadata: {err}") from err
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or weight.dim() != 2 or weight.shape != (len(names), d) or not torch.isfinite(weight).all():
        raise bad(f"weight must be a finite [{len(names)}, {d}] tensor")
    if has_bias != (bias is not None) or (bias is not None and (bias.shape != (len(names),)
                                                                or not torch.isfinite(bias).all())):
        raise bad(f"bias must be {'a finite [' + str(len(names)) + '] tensor' if has_bias else 'absent'}")
    if len(set(names)) != len(names):
        raise bad("repeated class names")
    return Enrolled(base_sha256, names, weight, bias, info)


def write_negatives(run: str | os.PathLike, h: Tensor, y: Tensor, base_sha256: str, dataset: str,
                    split: str) -> Path:
    """Write ``run/negatives.safetensors`` atomically (see the module docstring)."""
    return _save(Path(run) / NEGATIVES, {"h": h.detach().float().cpu(), "y": y.detach().long().cpu()},
                 {"format": _NEG_FORMAT, "version": _VERSION, "base_sha256": base_sha256, "dataset": dataset,
                  "split": split})


def read_negatives(run: str | os.PathLike, base_sha256: str, d: int) -> tuple[Tensor, Tensor] | None:
    """``(h, y)`` of ``run/negatives.safetensors``, None when absent or built for another checkpoint."""
    path = Path(run) / NEGATIVES
    if not path.is_file():
        return None
    tensors, meta = _load(path, "negatives file")
    if meta.get("format") != _NEG_FORMAT or meta.get("base_sha256") != base_sha256:
        return None
    h, y = tensors.get("h"), tensors.get("y")
    if h is None or y is None or h.dim() != 2 or h.shape[1] != d or y.shape != (h.shape[0],):
        raise invalid(str(path), "negatives file", f"expected h [N, {d}] and y [N]")
    return h, y


@torch.no_grad()
def truncate_head(head: Head, k: int) -> Head:
    """A new head of the first ``k`` rows of ``head`` (the trained classes of a head with enrolled rows)."""
    head = as_head(head)
    if k == head.k:
        return head
    base = CosineHead(head.d, k, scale=head.scale) if isinstance(head, CosineHead) else \
        LinearHead(head.d, k, bias=head.bias is not None)
    base = base.to(head.weight.device, head.weight.dtype)
    base.weight.copy_(head.weight.detach()[:k])
    if getattr(head, "bias", None) is not None:
        base.bias.copy_(head.bias.detach()[:k])
    return base.eval()
