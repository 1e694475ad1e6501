"""Backbones from torchvision and timm, by name, as embedding networks (their classification layer removed).

torchvision 0.28 (the release built for torch 2.13) ships only CUDA builds. On a CPU-only torch its C++ extension
cannot load, and ``import torchvision`` then fails in ``torchvision._meta_registrations`` with "operator
torchvision::nms does not exist": the fake kernels it registers need the operator schemas the extension would have
defined. :func:`import_torchvision` first tries to load that extension itself; only when it cannot be loaded does it
define the two schemas (``nms`` and ``qnms``, as torchvision's C++ defines them) with
``torch.library.Library("torchvision", "DEF")``, then imports torchvision. Every model without custom C++ ops
(all the classification models: ResNet, VGG, AlexNet, Inception, ViT, ...) works; calling ``nms`` itself would
raise (no kernel), which no classifier does. timm imports torchvision, so :func:`import_timm` goes through the same
door. Neither is needed by the paper's MLP and CNN.

No pretrained weights are downloaded: every backbone is randomly initialised.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .core.extras import MissingDependencyError

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
#: The operator schemas torchvision's C++ extension defines and its fake-kernel registrations require.
TORCHVISION_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_SHIM: list[torch.library.Library] = []  # kept alive: dropping the Library object would undefine the schemas


def _operator_exists(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def _extension_loads() -> bool:
    """Whether torchvision's own C++ extension loads here (found without importing torchvision)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("_C*.so")):
            try:
                torch.ops.load_library(str(path))
            except (OSError, RuntimeError):
                continue
            return True
    return False


def define_missing_schemas() -> list[str]:
    """Define the torchvision operator schemas that are missing (when its extension cannot load); return the
    names defined (empty when the extension loaded or they exist already)."""
    if _extension_loads():
        return []
    missing = [s for s in TORCHVISION_SCHEMAS if not _operator_exists(s.partition("(")[0])]
    if missing:
        lib = torch.library.Library("torchvision", "DEF")
        for schema in missing:
            lib.define(schema)
        _SHIM.append(lib)
    return [s.partition("(")[0] for s in missing]


def import_torchvision() -> ModuleType:
    """torchvision, importable on a CPU-only torch (see the module docstring), or a clear error."""
    try:
        if "torchvision" not in sys.modules:
            define_missing_schemas()
        return importlib.import_module("torchvision")
    except ImportError as err:
        raise MissingDependencyError(
            "torchvision is not installed here, so torchvision and timm models (e.g. 'torchvision:resnet18') cannot "
            "be built; install the torchvision that matches your torch (make setup does). The paper's 'mlp' and "
            "'cnn' work without it.") from err
    except Exception as err:  # installed but broken, e.g. built for another torch
        raise MissingDependencyError(
            f"torchvision is installed but cannot be imported here ({type(err).__name__}: {err}); "
            "the paper's 'mlp' and 'cnn' work without it.") from err


def import_timm() -> ModuleType:
    """timm (which imports torchvision: :func:`import_torchvision` first), or a clear error."""
    import_torchvision()
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise MissingDependencyError("timm is not installed here: pip install timm (make setup does)") from err


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (``list_models(module=torchvision.models)``)."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The qualified name and module of a torchvision classifier's final classification ``nn.Linear``: ``fc``
    (ResNet, Inception, RegNet, ...), ``classifier`` or its last layer (VGG, DenseNet, MobileNet, EfficientNet,
    ConvNeXt, MaxViT, ...), ``heads.head`` (ViT), ``head`` (Swin); otherwise the last ``nn.Linear`` registered."""
    for name in ("fc", "classifier", "heads.head", "head", "heads"):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.Sequential) and len(module):
            child, module = list(module.named_children())[-1]
            name = f"{name}.{child}"
        if isinstance(module, nn.Linear):
            return name, module
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classification layer to replace "
                         "(models that classify with a convolution, such as SqueezeNet, are not supported)")
    return linears[-1]


class ToRGB(nn.Module):
    """Grayscale images ``[n, 1, H, W]`` repeated into three channels, for backbones built for RGB."""

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)


def _check_embedding(backbone: nn.Module, shape: tuple[int, ...], width: int, what: str) -> None:
    """One forward pass of two zero inputs: the backbone takes ``shape`` and gives ``[n, width]`` embeddings."""
    backbone.eval()
    try:
        with torch.no_grad():
            h = backbone(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, AssertionError) as err:  # ViT checks the image size with an assert
        raise ValueError(f"{what} cannot take inputs of shape {tuple(shape)}: {err}") from err
    finally:
        backbone.train()
    if not isinstance(h, Tensor) or h.shape != (2, width):
        got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"{what}: its embeddings should be [n, {width}], got {got}")


def torchvision_backbone(name: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """A torchvision classification model, randomly initialised (``get_model(name, weights=None)``), without its
    final classification ``nn.Linear`` (:func:`final_linear` becomes ``nn.Identity``): ``(features, width)``.
    Auxiliary classifiers (Inception-v3, GoogLeNet) are removed; grayscale inputs are repeated into RGB."""
    tv = import_torchvision()
    available = tv.models.list_models(module=tv.models)
    if name not in available:
        raise ValueError(f"unknown torchvision classification model {name!r}; "
                         f"valid names: {', '.join(sorted(available))}")
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ValueError(f"torchvision models take images [1 or 3 channels, height, width], got input shape "
                         f"{tuple(input_shape)}")
    backbone = tv.models.get_model(name, weights=None)
    if getattr(backbone, "aux_logits", False):  # as torchvision does when it loads weights without aux heads
        backbone.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(backbone, aux):
                setattr(backbone, aux, None)
    path, linear = final_linear(backbone)
    parent, _, child = path.rpartition(".")
    setattr(backbone.get_submodule(parent) if parent else backbone, child, nn.Identity())
    if input_shape[0] == 1:
        backbone = nn.Sequential(ToRGB(), backbone)
    _check_embedding(backbone, tuple(input_shape), linear.in_features, f"torchvision model {name!r}")
    return backbone, linear.in_features


def timm_backbone(name: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """A timm model, randomly initialised (``create_model(name, pretrained=False, num_classes=0,
    in_chans=C)``: timm's own way to drop the classifier and take ``C`` channels): ``(features, width)``."""
    timm = import_timm()
    if not timm.list_models(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models())")
    if len(input_shape) != 3:
        raise ValueError(f"timm models take images [channels, height, width], got input shape {tuple(input_shape)}")
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "in_chans": int(input_shape[0])}
    try:
        backbone = timm.create_model(name, img_size=tuple(input_shape[1:]), **kwargs)
    except TypeError:  # models without an img_size argument (convolutional ones)
        backbone = timm.create_model(name, **kwargs)
    width = int(backbone.num_features)
    _check_embedding(backbone, tuple(input_shape), width, f"timm model {name!r}")
    return backbone, width


def external_backbone(name: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """``torchvision:NAME`` or ``timm:NAME``."""
    if name.startswith(TIMM_PREFIX):
        return timm_backbone(name[len(TIMM_PREFIX):], input_shape)
    return torchvision_backbone(name.removeprefix(TORCHVISION_PREFIX), input_shape)
