"""Single Logit Classification of a trained run: "is this example of class c?" from the logit of c alone.

Keren, Sabato & Schuller, "Fast Single-Class Classification and the Principle of Logit Separation" (ICDM 2018):
when training follows the Principle of Logit Separation, one logit ``z_c(x)`` compared with a threshold answers
the question at the cost of one dot product per example, ``O(d)``, whatever the number of classes.

* :class:`SingleLogitClassifier` wraps a model (backbone ``features`` + a head with ``logit(h, c)``);
  ``score``/``predict`` compute the embedding and the one logit asked for, never the other classes.
* :class:`Thresholds`: decision thresholds calibrated on held-out data, one per class and one global, with
  what they target; saved as ``RUN/thresholds.json`` next to the checkpoint and tied to it by its SHA-256.
* :func:`calibrate_scores` (the rule), :func:`calibrate_run` (``logitsep calibrate``), :func:`query`
  (``logitsep query``), :func:`read_images` / :func:`inputs_from_images` (image files to model inputs).

Calibration rule (scores ``s``, prediction "positive" when ``s ≥ T``, ``T`` running over the distinct scores so
tied examples enter together; precision and recall as in :mod:`logitsep.metrics`):

* target precision ``p``: the **lowest** ``T`` whose precision is ``≥ p`` (the most recall at that precision;
  precision is not monotone in ``T``, so higher thresholds may fall below ``p``). When no threshold reaches
  ``p`` the threshold is the next float above the largest score: nothing seen in calibration is accepted.
* target recall ``r``: the **highest** ``T`` whose recall is ``≥ r`` (the ``⌈r·P⌉``-th largest positive score,
  the threshold of ``precision@r`` in :mod:`logitsep.metrics`; comparisons in float64).
* per class ``c``: the ``n`` scores ``s_c(x_i)``, positives the examples of class ``c``. A class without
  positives in the calibration data gets the global threshold.
* global: one ranking of all ``n·k`` (example, class) pairs, positives the pairs ``(i, y_i)``; one threshold
  for every class is meaningful only for a model whose logits follow the PoLS.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._io import write_json
from .metrics import check_scores

__all__ = [
    "SingleLogitClassifier",
    "Thresholds",
    "calibrate_run",
    "calibrate_scores",
    "format_query",
    "format_thresholds",
    "inputs_from_images",
    "query",
    "read_images",
]

THRESHOLDS_FILE = "thresholds.json"
_FORMAT = "logitsep-thresholds"
_VERSION = 1


# ------------------------------------------------------------------------------------------------ thresholds


@dataclass
class Thresholds:
    """Calibrated decision thresholds: ``predict = logit ≥ threshold``.

    ``global_threshold``: one threshold for every class; ``per_class[c]``: the threshold of class ``c``;
    ``target``: what they were calibrated for, ``{"metric": "precision" | "recall", "value": v, ...}`` (plus
    ``split`` and ``examples`` when known); ``global_stats`` / ``class_stats``: what each threshold reached on the
    calibration data (``threshold``, ``positives``, ``precision``, ``recall``, ``source``: ``"class"``,
    ``"pooled"``, ``"global"`` for a class without positives, ``"unreachable"`` when no threshold met a
    precision target); ``model``: ``{"sha256", "step"}`` of the checkpoint they belong to (None if unknown).
    """

    global_threshold: float
    per_class: list[float]
    target: dict[str, Any]
    global_stats: dict[str, Any] = field(default_factory=dict)
    class_stats: list[dict[str, Any]] = field(default_factory=list)
    model: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        classes = [{"class": c, **(self.class_stats[c] if c < len(self.class_stats) else {}), "threshold": t}
                   for c, t in enumerate(self.per_class)]
        return {"format": _FORMAT, "version": _VERSION, "model": self.model, "target": self.target,
                "global": {**self.global_stats, "threshold": self.global_threshold}, "classes": classes}

    @classmethod
    def from_dict(cls, obj: object, where: str = "thresholds") -> Thresholds:
        """Parse :meth:`to_dict`'s layout; ``ValueError`` naming ``where`` and the problem when it is not."""
        def bad(problem: str) -> ValueError:
            return ValueError(f"{where}: not a valid thresholds file ({problem})")

        if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
            raise bad(f"expected a JSON object with \"format\": \"{_FORMAT}\"")
        if obj.get("version") != _VERSION:
            raise bad(f"unsupported version {obj.get('version')!r}, expected {_VERSION}")
        target, glob, classes, model = obj.get("target"), obj.get("global"), obj.get("classes"), obj.get("model")
        if not isinstance(target, dict) or target.get("metric") not in ("precision", "recall"):
            raise bad("target must be an object with metric 'precision' or 'recall'")
        if not isinstance(glob, dict) or not _is_finite(glob.get("threshold")):
            raise bad("global.threshold must be a finite number")
        if not isinstance(classes, list) or not classes:
            raise bad("classes must be a non-empty list")
        for c, entry in enumerate(classes):
            if not isinstance(entry, dict) or entry.get("class") != c or not _is_finite(entry.get("threshold")):
                raise bad(f"classes[{c}] must be an object with class {c} and a finite threshold")
        if model is not None and not (isinstance(model, dict) and isinstance(model.get("sha256"), str)):
            raise bad("model must be null or an object with a sha256 string")
        stats = [{k: v for k, v in e.items() if k not in ("class", "threshold")} for e in classes]
        return cls(float(glob["threshold"]), [float(e["threshold"]) for e in classes], dict(target),
                   {k: v for k, v in glob.items() if k != "threshold"}, stats, model)

    def save(self, path: str | Path) -> Path:
        """Write the thresholds as JSON, atomically (a temporary file renamed over ``path``)."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no thresholds file {path}")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a valid thresholds file (corrupt JSON: {err})") from err
        return cls.from_dict(obj, where=str(path))


def _is_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_target(precision: object, recall: object) -> tuple[str, float]:
    """Exactly one of precision / recall, a number in (0, 1]; neither means precision 0.99."""
    if precision is not None and recall is not None:
        raise ValueError("give a target precision or a target recall, not both")
    metric, value = ("recall", recall) if recall is not None else ("precision", 0.99 if precision is None
                                                                    else precision)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"target {metric} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"target {metric} must be in (0, 1], got {value}")
    return metric, float(value)


def _calibrate_one(scores: np.ndarray, positive: np.ndarray, metric: str, value: float) -> dict[str, Any]:
    """Threshold of one ranking (see the module docstring), with the precision and recall it reaches."""
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order]
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last position of each distinct score
    tp = np.cumsum(pos, dtype=np.int64)[last]
    taken = last + 1
    p_total = int(tp[-1])
    prec, rec = tp / taken, tp / p_total
    if metric == "precision":
        ok = np.flatnonzero(prec >= value)
        if ok.size == 0:
            above = np.nextafter(s[0], np.asarray(np.inf, dtype=s.dtype))
            return {"threshold": float(above), "positives": p_total, "precision": None, "recall": 0.0,
                    "source": "unreachable"}
        j = int(ok[-1])
    else:
        j = int(np.flatnonzero(rec >= value)[0])  # exists: the recall of the lowest threshold is 1
    return {"threshold": float(s[last[j]]), "positives": p_total, "precision": float(prec[j]),
            "recall": float(rec[j])}


def calibrate_scores(scores: Tensor | np.ndarray, y: Tensor | np.ndarray | Sequence[int],
                     precision: float | None = None, recall: float | None = None,
                     class_names: Sequence[str] | None = None) -> Thresholds:
    """Per-class and global thresholds for scores ``[n, k]`` of examples with classes ``y [n]`` (module docstring).

    Exactly one target: ``precision`` or ``recall`` in (0, 1]; neither means ``precision=0.99``.
    """
    metric, value = _check_target(precision, recall)
    s = check_scores(scores)
    n, k = s.shape
    t = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"y must be [{n}] class indices (one per row of scores), got shape {tuple(t.shape)}")
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"y must be integer class indices, got dtype {t.dtype}")
    if t.min() < 0 or t.max() >= k:
        raise ValueError(f"y must be class indices in [0, {k}), got range [{t.min()}, {t.max()}]")
    onehot = np.zeros((n, k), dtype=bool)
    onehot[np.arange(n), t] = True
    pooled = _calibrate_one(s.ravel(), onehot.ravel(), metric, value)
    pooled.setdefault("source", "pooled")
    stats = []
    for c in range(k):
        if onehot[:, c].any():
            entry = _calibrate_one(np.ascontiguousarray(s[:, c]), onehot[:, c], metric, value)
            entry.setdefault("source", "class")
        else:
            entry = {"threshold": pooled["threshold"], "positives": 0, "precision": None, "recall": None,
                     "source": "global"}
        if class_names is not None:
            entry = {"name": str(class_names[c]), **entry}
        stats.append(entry)
    return Thresholds(global_threshold=pooled.pop("threshold"), per_class=[e.pop("threshold") for e in stats],
                      target={"metric": metric, "value": value, "examples": n}, global_stats=pooled,
                      class_stats=stats)


# ------------------------------------------------------------------------------------------------- images


def read_images(path: str | Path) -> np.ndarray:
    """Images from a file: a ``.npy`` array (read with ``allow_pickle=False``; any batch ``[n, ...]``) or one
    ``.png`` (Pillow; returned as ``[1, H, W]`` uint8 for grayscale, ``[1, H, W, 3]`` for colour; an alpha
    channel is dropped). Missing file: ``FileNotFoundError``; unreadable or unsupported: ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no input file {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path}: not a readable .npy array of images ({err})") from err
    if suffix == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise ValueError(f"{path}: not a PNG image (Pillow reads it as {img.format})")
                if img.mode in ("1", "L", "LA"):
                    return np.asarray(img.convert("L"))[None]
                if img.mode in ("P", "PA", "RGB", "RGBA"):
                    return np.asarray(img.convert("RGB"))[None]
                raise ValueError(f"{path}: PNG mode {img.mode!r} is not supported; save it as 8-bit gray or RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"{path}: not a readable PNG image ({err})") from err
    raise ValueError(f"{path}: unsupported input file type {suffix or '(none)'!r}; give a .npy or a .png file")


def _image_layout(input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(channels, H, W)`` of the images a model of ``input_shape`` takes, None when it takes no images."""
    if len(input_shape) == 3:
        return input_shape
    if len(input_shape) == 2:
        return (1, *input_shape)
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        return (1, side, side) if side * side == input_shape[0] else None
    return None


def inputs_from_images(images: np.ndarray, input_shape: Sequence[int]) -> Tensor:
    """Model inputs ``[n, *input_shape]`` (float32) from images.

    ``images``: uint8 pixels (scaled ``pixel/256``, the datasets' convention) or floats taken as already scaled
    inputs. Layouts: ``[n, *input_shape]`` as is (e.g. rows of a dataset saved with ``np.save``), or images
    ``[n, H, W]`` / ``[n, H, W, C]`` (C = 1, 3 or 4; alpha dropped) of the model's H×W; a flat input shape
    ``[F]`` means square grayscale images ``√F×√F``. Colour is turned into gray by ITU-R 601 luma
    (``0.299R + 0.587G + 0.114B``, as Pillow's ``convert("L")`` but without rounding); gray is repeated for
    3-channel models. Wrong size: ``ValueError`` naming the expected ``H×W``.
    """
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    shape = tuple(int(s) for s in input_shape)
    if images.dtype == np.uint8:
        a = images.astype(np.float32) / 256.0
    elif np.issubdtype(images.dtype, np.floating):
        a = images.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("images contain NaN or infinite values")
    else:
        raise TypeError(f"images must be uint8 pixels or floating-point inputs, got dtype {images.dtype}")
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"no images: got an array of shape {images.shape}")
    n = a.shape[0]
    if a.shape[1:] == shape:
        return torch.from_numpy(np.ascontiguousarray(a))
    layout = _image_layout(shape)
    if layout is None:
        raise ValueError(f"inputs must have shape [n, {', '.join(map(str, shape))}], got {images.shape}")
    channels, height, width = layout
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3, 4)):
        raise ValueError(f"images must be [n, {height}, {width}] or [n, {height}, {width}, C] with C in 1, 3, 4 "
                         f"(or inputs [n, {', '.join(map(str, shape))}]), got shape {images.shape}")
    if a.shape[1:3] != (height, width):
        raise ValueError(f"images must be {height}×{width} pixels (H×W) for this model, "
                         f"got {a.shape[1]}×{a.shape[2]}")
    if a.ndim == 4 and a.shape[3] == 4:
        a = a[..., :3]
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if channels == 1 and a.ndim == 4:
        a = np.float32(0.299) * a[..., 0] + np.float32(0.587) * a[..., 1] + np.float32(0.114) * a[..., 2]
    if a.ndim == 3:
        a = a[:, None] if channels == 1 else np.repeat(a[:, None], channels, axis=1)
    else:
        if channels != 3:
            raise ValueError(f"cannot turn colour images into {channels}-channel inputs")
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(n, *shape), dtype=np.float32))


# --------------------------------------------------------------------------------------------- the classifier


def _fingerprint(blob: bytes, step: int) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(blob).hexdigest(), "step": step}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class SingleLogitClassifier:
    """A model (``model.embed`` = backbone, ``model.head`` with ``logit(h, c)``) that answers "is x of class c?"
    from the logit of ``c`` alone: ``predict(x, c) = z_c(x) ≥ threshold``.

    Attributes: ``model``, ``config`` (the run's ``TrainConfig`` or None), ``num_classes``, ``class_names``,
    ``input_shape``, ``thresholds`` (:class:`Thresholds` or None), ``device``, ``fingerprint`` (of the
    checkpoint, ``{"sha256", "step"}``, or None), ``run_dir``.
    """

    def __init__(self, model: torch.nn.Module, input_shape: Sequence[int], class_names: Sequence[str] | None = None,
                 thresholds: Thresholds | None = None, config: Any = None, device: str | torch.device = "cpu",
                 fingerprint: dict[str, Any] | None = None, run_dir: str | Path | None = None,
                 batch_size: int = 1024) -> None:
        if not callable(getattr(model.head, "logit", None)):
            raise TypeError(f"the model's head ({type(model.head).__name__}) has no logit(h, c) method")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(model.head.weight.shape[0])
        self.class_names = [str(c) for c in class_names] if class_names is not None else \
            [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model of {self.num_classes} classes")
        self.config, self.fingerprint, self.batch_size = config, fingerprint, batch_size
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.thresholds: Thresholds | None = None
        if thresholds is not None:
            self.set_thresholds(thresholds)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", data: Any = None,
                 load_thresholds: bool = True) -> SingleLogitClassifier:
        """Load a run folder written by ``logitsep train`` (``state.json`` + ``model.safetensors``) and its
        ``thresholds.json`` when present (``load_thresholds``). ``data``: the run's :class:`~logitsep.data.Splits`
        if already loaded (else :func:`~logitsep.data.load_dataset` of the run's dataset).

        Errors: ``FileNotFoundError`` for a missing folder or checkpoint; ``ValueError`` for a corrupt state or
        checkpoint, a checkpoint that does not fit the model its config describes (naming the run and the
        mismatch), and a corrupt ``thresholds.json`` or one calibrated for another checkpoint.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        from .data import load_dataset
        from .models import build_model
        from .train import TrainConfig, head_kind

        run = Path(run_dir)
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist")
        state_path, weights_path = run / "state.json", run / "model.safetensors"
        if not state_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(f"{run} holds no complete checkpoint (needs state.json and model.safetensors); "
                                    f"train one with `logitsep train ... --out {run}`")
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            config, step = TrainConfig(**state["config"]), int(state["step"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{state_path}: not a valid run state ({err!r})") from err
        blob = weights_path.read_bytes()
        try:
            weights = load_safetensors(blob)
        except SafetensorError as err:
            raise ValueError(f"{weights_path}: not a readable safetensors checkpoint ({err})") from err
        if data is None:
            data = load_dataset(config.dataset)
        elif getattr(data, "name", config.dataset) != config.dataset:
            raise ValueError(f"run {run} was trained on {config.dataset!r}, but data for {data.name!r} was given")
        kind = head_kind(config.loss)
        model = build_model(config.model, data.input_shape, data.num_classes, head=kind, scale=config.head_scale)
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(f"run {run}: model.safetensors does not match the model state.json describes "
                             f"({config.model}, {kind} head, {data.num_classes} classes of {config.dataset}): "
                             f"{_one_line(str(err))}") from err
        names = getattr(data, "class_names", None) or [str(i) for i in range(data.num_classes)]
        clf = cls(model, data.input_shape, names, config=config, device=device,
                  fingerprint=_fingerprint(blob, step), run_dir=run)
        if load_thresholds and (run / THRESHOLDS_FILE).is_file():
            clf.set_thresholds(Thresholds.load(run / THRESHOLDS_FILE))
        return clf

    def set_thresholds(self, thresholds: Thresholds) -> None:
        """Attach thresholds, refusing those of another model (class count, or checkpoint SHA-256 when both
        are known)."""
        where = f"{self.run_dir / THRESHOLDS_FILE}" if self.run_dir is not None else "thresholds"
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
        name is also a number), or a ``[n]`` integer tensor (one class per example, left to the head to check)."""
        if isinstance(c, Tensor) and c.dim() == 0 and not (c.is_floating_point() or c.dtype == torch.bool):
            c = int(c)
        if isinstance(c, Tensor):
            if c.dtype == torch.bool or c.is_floating_point() or c.is_complex() or c.dim() != 1:
                raise TypeError(f"per-example classes must be a 1-D integer tensor, got dtype {c.dtype} and shape "
                                f"{tuple(c.shape)}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
                raise ValueError(f"unknown class in [{int(c.min())}, {int(c.max())}]: class indices are in "
                                 f"[0, {self.num_classes})")
            return c.long()
        if isinstance(c, str):
            if c in self.class_names:
                return self.class_names.index(c)
            if re.fullmatch(r"[+-]?\d+", c.strip()):
                c = int(c)
            else:
                shown = ", ".join(self.class_names[:20]) + (", …" if self.num_classes > 20 else "")
                raise ValueError(f"unknown class {c!r}: give an index in [0, {self.num_classes}) or one of the "
                                 f"class names ({shown})")
        if isinstance(c, bool) or not isinstance(c, numbers.Integral):
            raise TypeError(f"a class must be an int index or a class name, got {type(c).__name__}")
        if not 0 <= int(c) < self.num_classes:
            raise ValueError(f"unknown class {int(c)}: class indices are in [0, {self.num_classes})")
        return int(c)

    def _check_inputs(self, x: object) -> Tensor:
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
        x = self._check_inputs(x)
        self.model.eval()
        param = next(self.model.head.parameters())
        parts = [self.model.embed(x[i:i + self.batch_size].to(self.device, param.dtype))
                 for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, param.shape[1], dtype=param.dtype, device=self.device)

    @torch.no_grad()
    def score_embeddings(self, h: Tensor, c: int | str | Tensor) -> Tensor:
        """The logit of class ``c`` for each embedding, ``[n]``: ``head.logit(h, c)``, one dot product per row."""
        c = self.resolve_class(c)
        if isinstance(h, Tensor):
            h = h.to(self.device)
        return self.model.head.logit(h, c)

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
        threshold = self.threshold_for(c) if threshold is None else _check_threshold(threshold)
        s = self.score(x, c)
        return s >= (threshold.to(s.dtype) if isinstance(threshold, Tensor) else float(threshold))

    # --------------------------------------------------------------------------------------- calibration

    @torch.no_grad()
    def all_scores(self, h: Tensor) -> Tensor:
        """Every class's logit for embeddings ``h``, ``[n, k]``, for calibration: ``head.logit(h, c)`` class by
        class, the very computation :meth:`score` makes. A matrix product gives the same values up to rounding
        but not bit for bit (different summation order), and a calibration example sitting exactly at a
        threshold must be decided the same way by :meth:`predict`. ``O(n·k·d)``, about 10x slower than one
        matrix product; calibration runs once."""
        h = h.to(self.device)
        return torch.stack([self.model.head.logit(h, c) for c in range(self.num_classes)], dim=1)

    def calibrate(self, x: Tensor, y: Tensor, precision: float | None = None,
                  recall: float | None = None) -> Thresholds:
        """Calibrate thresholds on held-out ``(x, y)`` (:func:`calibrate_scores`), attach and return them."""
        metric, value = _check_target(precision, recall)
        x = self._check_inputs(x)
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be a [{x.shape[0]}] tensor of class indices, one per input")
        scores = self.all_scores(self.embed(x)).float().cpu()
        th = calibrate_scores(scores, y.cpu(), **{metric: value}, class_names=self.class_names)
        th.model = dict(self.fingerprint) if self.fingerprint is not None else None
        self.set_thresholds(th)
        return th


# ------------------------------------------------------------------------------------------ run-level helpers


def calibrate_run(run_dir: str | Path, data: Any = None, precision: float | None = None, recall: float | None = None,
                  split: str = "valid", device: str | torch.device = "cpu") -> Thresholds:
    """Calibrate a run's thresholds on its ``split`` (the validation split by default) and write
    ``run_dir/thresholds.json`` atomically. Target: ``precision`` (default 0.99) or ``recall``.

    An existing (even corrupt) ``thresholds.json`` is replaced only when calibration succeeds.
    """
    metric, value = _check_target(precision, recall)
    clf = SingleLogitClassifier.from_run(run_dir, device=device, data=data, load_thresholds=False)
    if data is None:
        from .data import load_dataset

        data = load_dataset(clf.config.dataset)
    x, y = data.split(split)
    th = clf.calibrate(x, y, **{metric: value})
    th.target.update(split=split, trained_on=clf.config.train_split)
    th.save(Path(run_dir) / THRESHOLDS_FILE)
    return th


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return float(threshold)


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
        threshold, source = _check_threshold(threshold), "given"
    x = inputs_from_images(read_images(input_path), clf.input_shape)
    scores = clf.score(x, idx)
    match = (scores >= threshold).cpu().tolist()  # what predict(x, idx, threshold) computes
    scores = scores.double().cpu().tolist()
    return {"run": str(run_dir), "input": str(input_path), "class": idx, "class_name": clf.class_names[idx],
            "threshold": float(threshold), "threshold_source": source,
            "results": [{"index": i, "score": s, "match": m} for i, (s, m) in enumerate(zip(scores, match,
                                                                                              strict=True))]}


def _num(value: object) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_thresholds(th: Thresholds) -> str:
    """A readable table of :class:`Thresholds` (``logitsep calibrate``)."""
    from .report import text_table

    stats = th.class_stats or [{} for _ in th.per_class]
    rows = [[c, st.get("name", c), st.get("positives", "-"), f"{t:.6g}", _num(st.get("precision")),
             _num(st.get("recall")), st.get("source", "-")]
            for c, (t, st) in enumerate(zip(th.per_class, stats, strict=True))]
    g = th.global_stats
    rows.append(["all", "(global)", g.get("positives", "-"), f"{th.global_threshold:.6g}", _num(g.get("precision")),
                 _num(g.get("recall")), g.get("source", "-")])
    t = th.target
    head = (f"thresholds for {t['metric']} >= {t['value']:g} on {t.get('examples', '?')} examples of the "
            f"{t.get('split', 'calibration')} split (accept when logit >= threshold)")
    lines = [head, text_table(rows, ["class", "name", "positives", "threshold", "precision", "recall", "source"])]
    if t.get("trained_on") == "train_full" and t.get("split") == "valid":
        lines.append("note: this run was trained on train+valid, so the validation scores are optimistic")
    return "\n".join(lines)


def format_query(result: dict[str, Any]) -> str:
    """A readable table of :func:`query`'s result (``logitsep query``)."""
    from .report import text_table

    rows = [[r["index"], f"{r['score']:.6g}", f"{result['threshold']:.6g}", "yes" if r["match"] else "no"]
            for r in result["results"]]
    head = (f"class {result['class']} ({result['class_name']}) of {result['run']}, {result['threshold_source']} "
            f"threshold {result['threshold']:.6g}")
    return head + "\n" + text_table(rows, ["image", "score", "threshold", "match"])
