"""Single Logit Classification of a trained run: "is this example of class c?" from the logit of c alone.

Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of Logit Separation" (ICDM 2018):
when training follows the Principle of Logit Separation, one logit ``z_c(x)`` compared with a threshold answers
the question at the cost of one dot product per example, ``O(d)``, whatever the number of classes.

* :class:`SingleLogitClassifier` wraps a model (backbone ``features`` + a :class:`~logitsep.heads.Head`);
  ``score``/``predict`` compute the embedding and the one logit asked for, never the other classes. It loads a
  run folder through :func:`logitsep.runs.load_run` (no dataset needed: the run's ``model.json`` describes it).
* :func:`calibrate_run` (``logitsep calibrate``) and :func:`query` (``logitsep query``) on a run folder
  (``logitsep evaluate`` at large ``n·k`` is :func:`logitsep.train.evaluate_blocked`: the SLC metrics of a model
  computed a block of classes at a time from the embeddings, never holding the ``[n, k]`` scores).

Large ``n·k`` (above :data:`logitsep.core.blocks.BLOCKS_ABOVE` scores, or whenever a block size is given):
calibration reads the scores a block of classes at a time (:func:`logitsep.thresholds.calibrate_blocked`), each
block ``head.logit_columns(h, range(a, b))``, the very values ``score`` computes, so the thresholds are those of
the in-memory path to the bit; evaluation scores the blocks with ``head.outputs(h, range(a, b))`` (a matrix
product: the values of ``model(x)`` up to float rounding, see :func:`logitsep.train.evaluate_blocked`).

The thresholds themselves, their rule and their file are :mod:`logitsep.thresholds`; images are decoded by
:mod:`logitsep.core.images`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .core.blocks import use_blocks
from .core.checks import check_threshold, class_indices, parse_class
from .core.images import inputs_from_images, read_images
from .data import Rows, load_dataset
from .enrollment import (
    DEFAULT_RULE,
    MAX_EXAMPLES,
    MAX_NEGATIVES,
    Enrolled,
    check_name,
    extend_head,
    new_row,
    read_negatives,
    truncate_head,
    write_enrolled,
    write_negatives,
)
from .heads import Head, as_head
from .runs import MODEL, THRESHOLDS, ModelSpec, check_fits, load_run, write_spec
from .thresholds import Thresholds, calibrate_blocked, calibrate_scores, check_target

__all__ = ["SingleLogitClassifier", "calibrate_run", "class_list", "enroll_run", "query", "read_examples"]


class SingleLogitClassifier:
    """A model (``model.embed`` = backbone, ``model.head`` a :class:`~logitsep.heads.Head`) that answers "is x of
    class c?" from the logit of ``c`` alone: ``predict(x, c) = z_c(x) ≥ threshold``.

    Attributes: ``model``, ``head``, ``config`` (the run's ``TrainConfig`` or None), ``spec`` (its
    :class:`~logitsep.runs.ModelSpec` or None), ``num_classes``, ``class_names``, ``input_shape``, ``thresholds``
    (:class:`~logitsep.thresholds.Thresholds` or None), ``device``, ``fingerprint`` (of the checkpoint,
    ``{"sha256", "step"}``, or None), ``run_dir``, ``enrolled`` (classes added after training,
    :mod:`logitsep.enrollment`: :meth:`enroll`, :meth:`remove`) and ``base_classes`` (the trained classes, ids
    ``0 … base_classes − 1``; enrolled ones follow).
    """

    def __init__(self, model: torch.nn.Module, input_shape: Sequence[int], class_names: Sequence[str] | None = None,
                 thresholds: Thresholds | None = None, config: Any = None, device: str | torch.device = "cpu",
                 fingerprint: dict[str, Any] | None = None, run_dir: str | Path | None = None,
                 batch_size: int = 1024, spec: ModelSpec | None = None, enrolled: Enrolled | None = None) -> None:
        self.head: Head = as_head(model.head)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(self.head.k)
        self.class_names = [str(c) for c in class_names] if class_names is not None else \
            [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model of {self.num_classes} classes")
        self.config, self.spec, self.fingerprint, self.batch_size = config, spec, fingerprint, batch_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.enrolled = enrolled if enrolled is not None else Enrolled((fingerprint or {}).get("sha256", ""))
        self.base_classes = self.num_classes - len(self.enrolled)  # the trained classes: ids 0 .. base_classes-1
        if self.base_classes < 1:
            raise ValueError(f"{len(self.enrolled)} enrolled classes for a head of {self.num_classes} rows")
        self.thresholds: Thresholds | None = None
        if thresholds is not None:
            self.set_thresholds(thresholds)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", data: Any = None,
                 load_thresholds: bool = True, enrolled: bool = True) -> SingleLogitClassifier:
        """Load a run folder written by ``logitsep train`` (:func:`logitsep.runs.load_run`: no dataset needed)
        and its ``thresholds.json`` when present (``load_thresholds``). ``data``: the run's dataset if already
        loaded; only runs without ``model.json`` need it, and it must be the run's. ``enrolled``: with the classes
        enrolled after training (False: the trained classes only).

        Errors: ``FileNotFoundError`` for a missing folder or checkpoint; ``ValueError`` for a corrupt state,
        spec or checkpoint, a checkpoint that does not fit the model its spec describes (naming the run and the
        mismatch), data of another dataset, and a corrupt ``thresholds.json`` or one calibrated for another
        checkpoint.
        """
        run = load_run(run_dir, device=device, data=data, enrolled=enrolled)
        if data is not None and getattr(data, "name", run.spec.dataset) != run.spec.dataset:
            raise ValueError(f"run {run_dir} was trained on {run.spec.dataset!r}, but data for {data.name!r} was "
                             "given")
        clf = cls(run.model, run.spec.input_shape, run.class_names, config=run.config, device=device,
                  fingerprint=run.fingerprint, run_dir=run.path, spec=run.spec, enrolled=run.enrolled)
        if load_thresholds and (run.path / THRESHOLDS).is_file():
            clf.set_thresholds(Thresholds.load(run.path / THRESHOLDS))
        return clf

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """Attach thresholds, refusing those of another model (class count, or checkpoint SHA-256 when both
        are known)."""
        where = f"{self.run_dir / THRESHOLDS}" if self.run_dir is not None else "thresholds"
        if len(thresholds.per_class) == self.base_classes < self.num_classes:  # enrolled: the global threshold
            thresholds = thresholds.with_classes(self.enrolled.names)
        if len(thresholds.per_class) != self.num_classes:
            raise ValueError(f"{where} has {len(thresholds.per_class)} classes but the model has {self.num_classes}")
        theirs, ours = (thresholds.model or {}).get("sha256"), (self.fingerprint or {}).get("sha256")
        if theirs and ours and theirs != ours:
            raise ValueError(f"{where} was calibrated for another checkpoint (model.safetensors sha256 "
                             f"{theirs[:12]}…, step {thresholds.model.get('step')}; this one is {ours[:12]}…, "
                             f"step {self.fingerprint.get('step')}): recalibrate with `logitsep calibrate "
                             f"{self.run_dir or 'RUN'}`")
        self.thresholds = thresholds

    # ------------------------------------------------------------------------------------------- scoring

    def resolve_class(self, c: object) -> int | Tensor:
        """A class as an index: an int in ``[0, k)``, a class name, a string of an index (names win when a
        name is also a number: :func:`logitsep.core.checks.parse_class`), or a ``[n]`` integer tensor (one class
        per example)."""
        if isinstance(c, Tensor) and c.dim() >= 1:
            if c.dtype == torch.bool or c.is_floating_point() or c.is_complex() or c.dim() != 1:
                raise TypeError(f"per-example classes must be a 1-D integer tensor, got dtype {c.dtype} and shape "
                                f"{tuple(c.shape)}")
            return class_indices(c, self.num_classes).to(c.device)
        return parse_class(c, self.class_names)

    def _check_inputs(self, x: object) -> Tensor | Rows:
        if isinstance(x, Rows):  # inputs read from disk a batch at a time
            if x.row_shape != self.input_shape:
                raise ValueError(f"x must be rows of shape {list(self.input_shape)} (the model's input shape), got "
                                 f"{list(x.row_shape)}")
            return x
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of inputs, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self.input_shape))}] (the model's input shape), "
                             f"got {tuple(x.shape)}")
        return x

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """Embeddings ``h = features(x)``, ``[n, d]``, in evaluation mode, by batches of ``batch_size``."""
        return self.model.embed_in_batches(self._check_inputs(x), self.batch_size, self.device)

    @torch.no_grad()
    def score_embeddings(self, h: Tensor, c: int | str | Tensor) -> Tensor:
        """The logit of class ``c`` for each embedding, ``[n]``: ``head.logit(h, c)``, one dot product per row."""
        c = self.resolve_class(c)
        if isinstance(h, Tensor):
            h = h.to(self.device)
        return self.head.logit(h, c)

    def score(self, x: Tensor, c: int | str | Tensor) -> Tensor:
        """The logit of class ``c`` (an index, a name, or a ``[n]`` index tensor) for each input, ``[n]``."""
        c = self.resolve_class(c)
        return self.score_embeddings(self.embed(x), c)

    def threshold_for(self, c: int | str | Tensor) -> float | Tensor:
        """The calibrated threshold of class ``c`` (a ``[n]`` tensor of them for per-example classes)."""
        if self.thresholds is None:
            where = f" in {self.run_dir}" if self.run_dir is not None else ""
            raise ValueError(f"no calibrated thresholds{where}: calibrate first (`logitsep calibrate RUN` or "
                             f".calibrate(x, y)) or pass a threshold")
        c = self.resolve_class(c)
        if isinstance(c, int):
            return self.thresholds.per_class[c]
        return torch.tensor(self.thresholds.per_class, device=self.device)[c.to(self.device).long()]

    def predict(self, x: Tensor, c: int | str | Tensor, threshold: float | None = None) -> Tensor:
        """``score(x, c) ≥ threshold``, bool ``[n]``; ``threshold`` None: the calibrated threshold of ``c``."""
        c = self.resolve_class(c)
        threshold = self.threshold_for(c) if threshold is None else check_threshold(threshold)
        s = self.score(x, c)
        return s >= (threshold.to(s.dtype) if isinstance(threshold, Tensor) else float(threshold))

    # --------------------------------------------------------------------------------------- calibration

    @torch.no_grad()
    def all_scores(self, h: Tensor) -> Tensor:
        """Every class's logit for embeddings ``h``, ``[n, k]``, for calibration: ``head.logit(h, c)`` class by
        class (:meth:`~logitsep.heads.Head.logit_columns`), the very computation :meth:`score` makes."""
        return self.head.logit_columns(h.to(self.device))

    def score_blocks(self, h: Tensor) -> Callable[[int, int], Tensor]:
        """``score_block(a, b)``: the columns ``a .. b - 1`` of ``all_scores(h).float().cpu()``, bit for bit, one
        block of classes at a time (:func:`~logitsep.thresholds.calibrate_blocked`).

        ``head.logit_columns`` (``logit(h, c)`` class by class), not the ~10x faster matrix product
        ``head.logits(h, range(a, b))``: the two differ in the last bits (another summation order; measured up to
        ~1e-6 on float32 logits of order 1), and a calibration example whose logit sits exactly at its class's
        threshold would then be decided the other way by :meth:`predict`, which computes ``logit``. The price:
        ``O(k)`` small products per pass, two or three passes."""
        h = h.to(self.device)
        return lambda start, stop: self.head.logit_columns(h, range(start, stop)).float().cpu()

    def _check_base_only(self, what: str) -> None:
        if len(self.enrolled):
            raise ValueError(f"{what} needs the trained classes only; this classifier has {len(self.enrolled)} "
                             "enrolled ones (load it with enrolled=False)")

    def calibrate(self, x: Tensor, y: Tensor, precision: float | None = None, recall: float | None = None, *,
                  block_size: int | None = None, progress: bool | None = None) -> Thresholds:
        """Calibrate thresholds on held-out ``(x, y)`` (:func:`~logitsep.thresholds.calibrate_scores`), attach and
        return them. Above :data:`~logitsep.core.blocks.BLOCKS_ABOVE` scores (``n·k``), or with a ``block_size``,
        the scores are read ``block_size`` classes at a time (:func:`~logitsep.thresholds.calibrate_blocked`, the
        same thresholds; ``progress``: its progress bars, None: only on a terminal)."""
        metric, value = check_target(precision, recall)
        self._check_base_only("calibrate")
        x = self._check_inputs(x)
        if not isinstance(y, (Tensor, Rows)) or len(y.shape) not in (1, 2) or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be a [{x.shape[0]}] tensor of class indices, one per input (or an "
                             f"[{x.shape[0]}, {self.num_classes}] 0/1 matrix)")
        h = self.embed(x)
        if use_blocks(h.shape[0], self.num_classes, block_size):
            th = calibrate_blocked(self.score_blocks(h), self.num_classes, y, **{metric: value},
                                   class_names=self.class_names, block_size=block_size, progress=progress)
        else:
            th = calibrate_scores(self.all_scores(h).float().cpu(), y, **{metric: value},
                                  class_names=self.class_names)
        th.model = dict(self.fingerprint) if self.fingerprint is not None else None
        self.set_thresholds(th)
        return th

    # ----------------------------------------------------------------------------------------- enrollment

    def _embeddings_of(self, examples: object) -> Tensor:
        """``examples`` as embeddings: model inputs ``[n, *input_shape]`` are embedded; ``[n, d]`` features
        (when that is not also the input shape) are taken as embeddings."""
        if not isinstance(examples, Tensor):
            raise TypeError(f"examples must be a torch.Tensor of inputs or embeddings, got {type(examples).__name__}")
        if not examples.is_floating_point():
            raise TypeError(f"examples must be a floating-point tensor, got dtype {examples.dtype}")
        if examples.dim() < 2 or not 1 <= examples.shape[0] <= MAX_EXAMPLES:
            raise ValueError(f"enroll takes 1 to {MAX_EXAMPLES} examples [n, ...], got shape {tuple(examples.shape)}")
        if tuple(examples.shape[1:]) == self.input_shape:
            h = self.embed(examples)
        elif examples.dim() == 2 and examples.shape[1] == self.head.d:
            h = examples.to(self.device)
        else:
            raise ValueError(f"examples must be inputs [n, {', '.join(map(str, self.input_shape))}] or embeddings "
                             f"[n, {self.head.d}], got {tuple(examples.shape)}")
        if not torch.isfinite(h).all():
            raise ValueError("examples give non-finite embeddings")
        return h.float()

    @torch.no_grad()
    def negatives(self, split: str = "valid", progress: bool | None = None) -> tuple[Tensor, Tensor]:
        """Embeddings and labels of up to ``MAX_NEGATIVES`` examples of the trained classes (a seeded sample of
        the run's ``split``), what an enrolled row is placed against: ``RUN/negatives.safetensors``, built from
        the run's dataset the first time and stored."""
        sha = (self.fingerprint or {}).get("sha256", "")
        if self.run_dir is not None:
            stored = read_negatives(self.run_dir, sha, self.head.d)
            if stored is not None:
                return stored
        if self.config is None:
            raise ValueError("no stored negatives and no run config to load the dataset from: pass negatives=")
        try:
            data = load_dataset(self.config.dataset)
        except (OSError, ValueError) as err:
            raise ValueError(f"enrolling needs embeddings of known-class examples: {self.run_dir}/negatives."
                             f"safetensors is missing and the run's dataset {self.config.dataset!r} cannot be loaded "
                             f"here ({err}); enroll once where it loads, or pass negatives=") from err
        x, y = data.split(split)
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:MAX_NEGATIVES].sort().values
        h, labels = self.embed(x[pick]).float().cpu(), torch.as_tensor(y[pick]).long()
        if self.run_dir is not None:
            write_negatives(self.run_dir, h, labels, sha, self.config.dataset, split)
        return h, labels

    def _set_enrolled(self, enrolled: Enrolled, base: Head | None = None) -> None:
        """Write ``enrolled`` (when the classifier has a run folder), then use it: the head (``base``: the trained
        rows, when the caller has them), names, thresholds."""
        if self.run_dir is not None:
            write_enrolled(self.run_dir, enrolled)  # first: a failed write changes nothing
        base = base if base is not None else truncate_head(self.head, self.base_classes)
        self.model.head = extend_head(base, enrolled)
        self.head = as_head(self.model.head)
        self.enrolled, self.num_classes = enrolled, self.base_classes + len(enrolled)
        self.class_names = [*self.class_names[:self.base_classes], *enrolled.names]
        if self.thresholds is not None:
            self.set_thresholds(self.thresholds.with_classes(enrolled.names, keep=self.base_classes))

    def enroll(self, name: str, examples: Tensor, rule: str = DEFAULT_RULE,
               negatives: Tensor | None = None) -> int:
        """Add class ``name`` from a few ``examples`` (inputs or embeddings, 1 to ``MAX_EXAMPLES``); returns its
        id. The trained classes are untouched; the new row is placed against the global threshold by ``rule``
        (:mod:`logitsep.enrollment`) and the class's threshold is the global one. Persisted atomically in the run
        folder (``enrolled.safetensors``) before it is used. ``negatives``: embeddings of known-class examples
        (default: :meth:`negatives`). Needs calibrated thresholds (the global threshold is the target)."""
        name = check_name(name, self.class_names)
        if self.thresholds is None:
            raise ValueError("enroll needs calibrated thresholds (the new row is placed against the global "
                             f"threshold): run `logitsep calibrate {self.run_dir or 'RUN'}` first")
        h = self._embeddings_of(examples)
        neg = negatives if negatives is not None else self.negatives()[0]
        base = truncate_head(self.head, self.base_classes)
        w, b = new_row(rule, base, h, neg, self.thresholds.global_threshold)
        self._set_enrolled(self.enrolled.add(name, w, b, {"rule": rule, "examples": int(h.shape[0])}), base)
        return self.num_classes - 1

    def remove(self, name: str | int) -> None:
        """Remove an enrolled class (by name or id); the enrolled classes after it move down one id. Trained
        classes cannot be removed (``ValueError``)."""
        c = self.resolve_class(name)
        if c < self.base_classes:
            raise ValueError(f"class {self.class_names[c]!r} (id {c}) was trained, not enrolled: only enrolled "
                             f"classes can be removed ({', '.join(self.enrolled.names) or 'none enrolled'})")
        self._set_enrolled(self.enrolled.without(c - self.base_classes))


# ------------------------------------------------------------------------------------------ run-level helpers


def calibrate_run(run_dir: str | Path, data: Any = None, precision: float | None = None, recall: float | None = None,
                  split: str = "valid", device: str | torch.device = "cpu", block_size: int | None = None,
                  progress: bool | None = None) -> Thresholds:
    """Calibrate a run's thresholds on its ``split`` (the validation split by default) and write
    ``run_dir/thresholds.json`` atomically. Target: ``precision`` (default 0.99) or ``recall``. A run written
    before runs described themselves also gets its ``model.json`` here. ``block_size``, ``progress``: as in
    :meth:`SingleLogitClassifier.calibrate` (blocks are used anyway above ``BLOCKS_ABOVE`` scores).

    An existing (even corrupt) ``thresholds.json`` is replaced only when calibration succeeds.
    """
    metric, value = check_target(precision, recall)
    described = (Path(run_dir) / MODEL).is_file()  # else the run's own data must describe it
    clf = SingleLogitClassifier.from_run(run_dir, device=device, data=None if described else data,
                                         load_thresholds=False, enrolled=False)
    data = data if data is not None else load_dataset(clf.config.dataset)
    check_fits(clf.spec, data)
    x, y = data.split(split)
    th = clf.calibrate(x, y, **{metric: value}, block_size=block_size, progress=progress)
    th.target.update(split=split, trained_on=clf.config.train_split)
    th.save(Path(run_dir) / THRESHOLDS)
    if not (Path(run_dir) / MODEL).is_file():
        write_spec(run_dir, clf.spec)
    return th


def query(run_dir: str | Path, c: int | str, input_path: str | Path, threshold: float | None = None,
          device: str | torch.device = "cpu") -> dict[str, Any]:
    """``logitsep query``: the logit of class ``c`` for each image of ``input_path`` and the decision.

    Returns ``{"run", "input", "class", "class_name", "threshold", "threshold_source", "results": [{"index",
    "score", "match"}]}``; ``threshold_source`` is ``"given"`` or ``"calibrated"`` (the class's threshold of
    ``thresholds.json``). Reads nothing but the run and the input file, writes nothing.
    """
    clf = SingleLogitClassifier.from_run(run_dir, device=device)
    idx = clf.resolve_class(c)
    if threshold is None:
        threshold, source = clf.threshold_for(idx), "calibrated"
    else:
        threshold, source = check_threshold(threshold), "given"
    x = inputs_from_images(read_images(input_path), clf.input_shape)
    scores = clf.score(x, idx)
    match = (scores >= threshold).cpu().tolist()  # what predict(x, idx, threshold) computes
    scores = scores.double().cpu().tolist()
    return {"run": str(run_dir), "input": str(input_path), "class": idx, "class_name": clf.class_names[idx],
            "threshold": float(threshold), "threshold_source": source,
            "results": [{"index": i, "score": s, "match": m} for i, (s, m) in enumerate(zip(scores, match,
                                                                                              strict=True))]}


def read_examples(path: str | Path, input_shape: Sequence[int]) -> Tensor:
    """Model inputs from a ``.npy`` / ``.png`` file or a folder of them (its ``*.png`` and ``*.npy`` files in name
    order, concatenated); ``ValueError`` for an empty folder, ``FileNotFoundError`` for a missing path."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".npy") and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no .png or .npy file")
        return torch.cat([inputs_from_images(read_images(f), input_shape) for f in files])
    return inputs_from_images(read_images(path), input_shape)


def enroll_run(run_dir: str | Path, name: str, input_path: str | Path, rule: str = DEFAULT_RULE,
               device: str | torch.device = "cpu") -> dict[str, Any]:
    """``logitsep enroll``: add class ``name`` to a run from the images of ``input_path``
    (:meth:`SingleLogitClassifier.enroll`); returns ``{"run", "class", "name", "examples", "rule", "threshold"}``."""
    clf = SingleLogitClassifier.from_run(run_dir, device=device)
    x = read_examples(input_path, clf.input_shape)
    c = clf.enroll(name, x, rule=rule)
    return {"run": str(run_dir), "class": c, "name": name, "examples": int(x.shape[0]), "rule": rule,
            "threshold": float(clf.threshold_for(c))}


def class_list(run_dir: str | Path, remove: str | None = None) -> dict[str, Any]:
    """``logitsep classes``: every class of a run, ``{"run", "classes": [{"id", "name", "enrolled", "threshold",
    "rule", "examples"}]}``; ``remove``: first remove that enrolled class (name or id)."""
    clf = SingleLogitClassifier.from_run(run_dir)
    if remove is not None:
        clf.remove(remove)
    th = clf.thresholds.per_class if clf.thresholds is not None else [None] * clf.num_classes
    out = []
    for c, name in enumerate(clf.class_names):
        info = clf.enrolled.info[c - clf.base_classes] if c >= clf.base_classes else {}
        out.append({"id": c, "name": name, "enrolled": c >= clf.base_classes, "threshold": th[c],
                    "rule": info.get("rule"), "examples": info.get("examples")})
    return {"run": str(run_dir), "classes": out}
