"""The run folder: what ``logitsep train`` writes, what defines a run, and the one loader every command uses.

A run folder holds (all written atomically; nothing is ever unpickled):

- ``model.json``: the **model spec** (:class:`ModelSpec`): architecture, input shape and kind (images with their
  ``pixel/256`` scaling, or feature vectors), the number and names of the classes, the head (linear or cosine,
  its scale and embedding dimension), the loss and the dataset it was trained on. With it a run is loaded,
  queried, calibrated, indexed and served **without its dataset**. Written when training starts;
- ``checkpoint.safetensors``: everything a resume needs (weights, momentum, RNG state; see ``logitsep.train``);
- ``model.safetensors``: the weights and batch-norm statistics (metadata ``step``);
- ``state.json``: the :class:`TrainConfig` and the step reached (written last: it marks a complete checkpoint);
- ``log.csv``, ``metrics.json``, ``thresholds.json`` (``logitsep.thresholds``);
- ``enrolled.safetensors``, ``negatives.safetensors``: classes added after training and the stored embeddings
  their rows are fitted against (:mod:`logitsep.enrollment`; ``logitsep enroll``).

:func:`load_run` reads a run into a :class:`Run` (the model with its weights, spec, config, step and the
fingerprint of its checkpoint). Runs written before ``model.json`` existed load where their dataset loads (the
spec is derived from it); elsewhere the error says how to upgrade them (``logitsep calibrate RUN`` once, where
the dataset is installed, writes ``model.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core.checks import check_positive_int
from .core.files import check_versioned, invalid, read_json, write_json
from .core.images import image_layout
from .enrollment import Enrolled, extend_head, read_enrolled
from .losses import LOSSES, SAMPLED_FORMS, loss_spec
from .losses.distill import check_objective
from .models import SLCModel, build_model, check_model_name

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
STATE = "state.json"
MODEL = "model.json"
LOG = "log.csv"
METRICS = "metrics.json"
THRESHOLDS = "thresholds.json"

_FORMAT = "logitsep-model"
_VERSION = 1
PIXEL_SCALE = 1.0 / 256.0  # model input = pixel · PIXEL_SCALE for every image dataset here


@dataclass
class TrainConfig:
    """Everything that defines a run. ``train_split`` is ``"train"`` (model selection on ``"valid"``) or
    ``"train_full"`` (train + valid, as the demo does). ``batch_size`` is the global batch (all processes)."""

    dataset: str = "mnist"
    model: str = "mlp"
    loss: str = "ce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    lr: float = 0.1
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: int = 0  # steps of linear warm-up: the rate is multiplied by (step + 1)/warmup before step ``warmup``
    seed: int = 0
    train_split: str = "train"
    head_scale: float = 1.0
    device: str = "cpu"
    sampled: int = 0  # >0: the loss's sampled form with this many candidate draws per step (losses.sampled)
    shard_head: bool = False  # under torchrun: the head's rows split over the processes (logitsep.sharded)
    # distillation (logitsep distill; losses.distill): teacher run folders, the objective ("" = none), the weight
    # of the hard-label loss, kd's temperature, and head_only: the first teacher's features frozen, only the head
    teachers: list[str] = field(default_factory=list)
    objective: str = ""
    alpha: float = 1.0
    temperature: float = 4.0
    head_only: bool = False

    def validate(self) -> TrainConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid names: {', '.join(sorted(LOSSES))}")
        check_model_name(self.model)  # mlp, cnn, or a torchvision classifier (ValueError naming the valid ones)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.train_split not in ("train", "train_full"):
            raise ValueError(f"train_split must be 'train' or 'train_full', got {self.train_split!r}")
        for name in ("steps", "batch_size"):
            check_positive_int(getattr(self, name), name)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay}")
        check_positive_int(self.sampled, "sampled", minimum=0)
        check_positive_int(self.warmup, "warmup", minimum=0)
        if self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup} steps) is longer than the run ({self.steps} steps)")
        if not isinstance(self.shard_head, bool):
            raise TypeError(f"shard_head must be a bool, got {type(self.shard_head).__name__}")
        if self.shard_head and self.sampled:
            raise ValueError("shard_head and sampled do not combine (yet): choose one")
        if self.sampled and loss_spec(self.loss).sampled is None:
            with_form = ", ".join(sorted(SAMPLED_FORMS))
            raise ValueError(f"sampled={self.sampled}: loss {self.loss!r} has no sampled form (those with one: "
                             f"{with_form})")
        self._validate_distill()
        return self

    def _validate_distill(self) -> None:
        if not isinstance(self.teachers, list) or not all(isinstance(t, str) and t for t in self.teachers):
            raise TypeError(f"teachers must be a list of run folders, got {self.teachers!r}")
        if self.objective:
            check_objective(self.objective, self.temperature)
        if not isinstance(self.head_only, bool):
            raise TypeError(f"head_only must be a bool, got {type(self.head_only).__name__}")
        if (self.objective or self.head_only) and not self.teachers:
            raise ValueError("distillation (an objective or head_only) needs at least one teacher run")
        if self.teachers and not (self.objective or self.head_only):
            raise ValueError("teachers given without an objective or head_only: nothing would use them")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"alpha must be a non-negative number, got {self.alpha!r}")
        if self.teachers and self.alpha == 0 and not self.objective:
            raise ValueError("alpha=0 and no objective: the student would have no loss")
        if self.teachers and (self.sampled or self.shard_head):
            raise ValueError("distillation does not combine with sampled or shard_head training")


@dataclass(frozen=True)
class ModelSpec:
    """What a run's model is, saved as ``model.json``: enough to rebuild it and feed it inputs.

    ``input_kind`` is ``"image"`` (inputs are ``pixel · pixel_scale``; the image layout follows from
    ``input_shape``: ``[C, H, W]``, ``[H, W]`` or a flat square ``[H·W]``) or ``"features"`` (vectors used as
    they are; ``pixel_scale`` None)."""

    architecture: str
    input_shape: tuple[int, ...]
    input_kind: str
    num_classes: int
    class_names: tuple[str, ...]
    head: str
    head_scale: float
    embedding_dim: int
    loss: str
    dataset: str | None = None
    pixel_scale: float | None = PIXEL_SCALE

    def build(self) -> SLCModel:
        """A freshly initialised model of this spec (load the run's weights into it)."""
        return build_model(self.architecture, self.input_shape, self.num_classes, head=self.head,
                           scale=self.head_scale)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"], d["class_names"] = list(self.input_shape), list(self.class_names)
        layout = image_layout(self.input_shape) if self.input_kind == "image" else None
        d["image"] = None if layout is None else dict(zip(("channels", "height", "width"), layout, strict=True))
        return {"format": _FORMAT, "version": _VERSION, **d}

    @classmethod
    def from_dict(cls, obj: object, where: str) -> ModelSpec:
        """Parse :meth:`to_dict`'s layout; ``ValueError`` naming ``where`` and the problem when it is not."""
        def bad(problem: str) -> ValueError:
            return invalid(where, "model spec", problem)

        obj = check_versioned(obj, _FORMAT, _VERSION, where, "model spec")
        try:
            shape = tuple(int(s) for s in obj["input_shape"])
            names = tuple(str(n) for n in obj["class_names"])
            spec = cls(architecture=str(obj["architecture"]), input_shape=shape, input_kind=str(obj["input_kind"]),
                       num_classes=int(obj["num_classes"]), class_names=names, head=str(obj["head"]),
                       head_scale=float(obj["head_scale"]), embedding_dim=int(obj["embedding_dim"]),
                       loss=str(obj["loss"]), dataset=obj.get("dataset"),
                       pixel_scale=None if obj.get("pixel_scale") is None else float(obj["pixel_scale"]))
        except (KeyError, TypeError, ValueError) as err:
            raise bad(f"{type(err).__name__}: {err}") from None
        if spec.input_kind not in ("image", "features") or spec.head not in ("linear", "cosine"):
            raise bad(f"input_kind must be image or features and head linear or cosine, got {spec.input_kind!r}, "
                      f"{spec.head!r}")
        if len(spec.class_names) != spec.num_classes or not spec.input_shape or min(spec.input_shape) < 1:
            raise bad(f"{len(spec.class_names)} class names for {spec.num_classes} classes, input shape "
                      f"{list(spec.input_shape)}")
        return spec


def model_spec(config: TrainConfig, data: Any, model: SLCModel | None = None) -> ModelSpec:
    """The spec of a run of ``config`` on ``data`` (a :class:`~logitsep.data.Splits`); ``model`` (built from them)
    gives the embedding dimension, else one is built to read it."""
    model = model if model is not None else build_model(config.model, data.input_shape, data.num_classes,
                                                        head=loss_spec(config.loss).head, scale=config.head_scale)
    kind = data.input_kind
    return ModelSpec(architecture=config.model, input_shape=tuple(int(s) for s in data.input_shape), input_kind=kind,
                     num_classes=int(data.num_classes), class_names=tuple(data.class_names),
                     head=loss_spec(config.loss).head, head_scale=float(config.head_scale),
                     embedding_dim=int(model.head.d), loss=config.loss, dataset=data.name,
                     pixel_scale=PIXEL_SCALE if kind == "image" else None)


def check_fits(spec: ModelSpec, data: Any) -> None:
    """Data a run is evaluated, calibrated or indexed on must have the run's inputs and classes."""
    if tuple(data.input_shape) != spec.input_shape or data.num_classes != spec.num_classes:
        raise ValueError(f"{data.name} has inputs of shape {list(data.input_shape)} and {data.num_classes} classes, "
                         f"but the run was trained on inputs of shape {list(spec.input_shape)} and "
                         f"{spec.num_classes} classes ({spec.dataset})")


def write_spec(run: str | Path, spec: ModelSpec) -> Path:
    """Write ``run/model.json`` atomically."""
    return write_json(Path(run) / MODEL, spec.to_dict())


def read_spec(run: str | Path) -> ModelSpec | None:
    """``run/model.json`` as a :class:`ModelSpec`, None when the run has none (written before it existed)."""
    path = Path(run) / MODEL
    if not path.is_file():
        return None
    return ModelSpec.from_dict(read_json(path, "model spec"), str(path))


@dataclass
class Run:
    """A loaded run: ``model`` (its weights loaded, evaluation mode, on ``device``), ``spec``, ``config``, ``step``,
    ``fingerprint`` (``{"sha256", "step"}`` of ``model.safetensors``), ``path`` and ``enrolled`` (the classes added
    after training, :class:`~logitsep.enrollment.Enrolled`; their rows follow the trained ones in ``model.head``).
    ``spec`` describes the checkpoint (the trained classes); ``class_names`` lists every class."""

    path: Path
    spec: ModelSpec
    config: TrainConfig
    step: int
    model: SLCModel
    fingerprint: dict[str, Any]
    enrolled: Enrolled | None = None

    @property
    def class_names(self) -> list[str]:
        return [*self.spec.class_names, *(self.enrolled.names if self.enrolled is not None else [])]


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def read_state(run: str | Path) -> tuple[TrainConfig, int]:
    """The config and step of ``run/state.json``; ``FileNotFoundError`` / ``ValueError`` naming the problem."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    state_path, weights_path = run / STATE, run / WEIGHTS
    if not state_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{run} holds no complete checkpoint (needs {STATE} and {WEIGHTS}); "
                                f"train one with `logitsep train ... --out {run}`")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        return TrainConfig(**state["config"]), int(state["step"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{state_path}: not a valid run state ({err!r})") from err


def spec_of_run(run: str | Path, config: TrainConfig, data: Any = None) -> ModelSpec:
    """``run/model.json``, or for a run written before it existed the spec derived from its dataset (``data``
    if given, else loaded); ``ValueError`` saying how to upgrade the run when the dataset cannot be loaded."""
    spec = read_spec(run)
    if spec is not None:
        return spec
    if data is None:
        from .data import load_dataset

        try:
            data = load_dataset(config.dataset)
        except (OSError, ValueError) as err:
            raise ValueError(f"{run} was written before runs described themselves (it has no {MODEL}), and its "
                             f"dataset {config.dataset!r} cannot be loaded here to learn its inputs and classes "
                             f"({_one_line(str(err))}). Run `logitsep calibrate {run}` once on a machine where "
                             f"{config.dataset!r} loads: it writes {MODEL}, and the run then loads anywhere."
                             ) from err
    return model_spec(config, data)


def load_run(run: str | Path, device: str | torch.device = "cpu", data: Any = None, enrolled: bool = True) -> Run:
    """Load a run folder (see the module docstring): the one loader of ``evaluate``, ``calibrate``, ``query``,
    ``index`` and ``serve``. ``data``: the run's dataset when already loaded (used only by runs without
    ``model.json``). ``enrolled``: extend the head with the run's enrolled classes (False: the trained classes
    only, as ``calibrate`` and ``evaluate`` use it).

    Errors: ``FileNotFoundError`` for a missing folder or checkpoint; ``ValueError`` for a corrupt state, spec or
    checkpoint, and for a checkpoint that does not fit the model its spec describes (naming the run and the
    mismatch).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    run = Path(run)
    config, step = read_state(run)
    spec = spec_of_run(run, config, data)
    described = {"loss": spec.loss, "model": spec.architecture, "head_scale": spec.head_scale}
    disagree = [f"{key} {getattr(config, key)!r} in {STATE}, {value!r} in {MODEL}"
                for key, value in described.items() if getattr(config, key) != value]
    if disagree:
        raise ValueError(f"run {run}: {STATE} and {MODEL} describe different models ({'; '.join(disagree)})")
    weights_path = run / WEIGHTS
    blob = weights_path.read_bytes()
    try:
        weights = load_safetensors(blob)
    except SafetensorError as err:
        raise ValueError(f"{weights_path}: not a readable safetensors checkpoint ({err})") from err
    model = spec.build()
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"run {run}: {WEIGHTS} does not match the model its spec describes ({spec.architecture}, "
                         f"{spec.head} head, {spec.num_classes} classes of {spec.dataset}): "
                         f"{_one_line(str(err))}") from err
    sha = hashlib.sha256(blob).hexdigest()
    added = None
    if enrolled:
        head = model.head
        added = read_enrolled(run, sha, int(head.weight.shape[1]), getattr(head, "bias", None) is not None)
        model.head = extend_head(head, added)
    model = model.to(device).eval()
    return Run(run, spec, config, step, model, {"sha256": sha, "step": step}, added)
