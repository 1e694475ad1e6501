"""The paper's networks (Keren, Sabato & Schuller, ICDM 2018, Section VI-A), and torchvision's by name.

Each model is ``features`` (input → embedding ``h``) followed by ``head`` (``h`` → logits, or cosines for the
cosine-margin losses), so a single logit can be computed from ``h`` without the other classes.
``"mlp"`` and ``"cnn"`` are the paper's networks: batch normalization then ReLU after every layer but the head.
``"torchvision:NAME"`` (or a plain torchvision name) is a torchvision classification model whose final
``nn.Linear`` is replaced by our head; it needs torchvision, which the paper's models do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .core.extras import MissingDependencyError


class SLCModel(nn.Module):
    """``head(features(x))``; ``embed(x)`` returns the embedding the head scores."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

    @torch.no_grad()
    def embed_in_batches(self, x: Tensor, batch_size: int = 1024, device: str | torch.device = "cpu") -> Tensor:
        """Embeddings of ``x`` in evaluation mode, ``batch_size`` rows at a time moved to ``device`` (in the head's
        dtype): the embeddings every single-logit score, calibration and index is computed from."""
        self.eval()
        param = next(self.head.parameters())
        parts = [self.embed(x[i:i + batch_size].to(device, param.dtype)) for i in range(0, x.shape[0], batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, param.shape[1], dtype=param.dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def mlp_features(in_features: int, hidden: Sequence[int] = (500, 500)) -> nn.Sequential:
    """Fully connected layers, each followed by batch norm and ReLU (the paper's MNIST MLP: 2 × 500)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for units in hidden:
        layers += [nn.Linear(width, units), nn.BatchNorm1d(units), nn.ReLU(inplace=True)]
        width = units
    return nn.Sequential(*layers)


def paper_cnn_features(in_channels: int = 3, dense: int = 1024) -> nn.Sequential:
    """The paper's SVHN/CIFAR CNN: six convolutions (5×5, 1×1, 5×5, 1×1, 5×5, 1×1 kernels; 128, 128, 256, 256,
    512, 512 maps), 3×3/stride-2 max-pooling after convolutions 2, 4 and 6, one dense layer of 1024 units;
    batch norm then ReLU after every layer. ``LazyLinear`` sizes the dense layer from the first input."""
    layers: list[nn.Module] = []
    channels = in_channels
    for i, (kernel, maps) in enumerate([(5, 128), (1, 128), (5, 256), (1, 256), (5, 512), (1, 512)]):
        layers += [nn.Conv2d(channels, maps, kernel, padding=kernel // 2), nn.BatchNorm2d(maps), nn.ReLU(inplace=True)]
        channels = maps
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    layers += [nn.Flatten(), nn.LazyLinear(dense), nn.BatchNorm1d(dense), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _make_head(kind: str, width: int, num_classes: int, scale: float) -> nn.Module:
    """``"linear"``: a :class:`~logitsep.heads.LinearHead` (an ``nn.Linear`` with single-logit scoring);
    ``"cosine"``: a :class:`~logitsep.heads.CosineHead` of ``scale``."""
    from .heads import CosineHead, LinearHead

    if kind == "linear":
        return LinearHead(width, num_classes)
    if kind == "cosine":
        return CosineHead(width, num_classes, scale=scale)
    raise ValueError(f"unknown head {kind!r}; valid heads: linear, cosine")


def build_mlp(input_shape: Sequence[int], num_classes: int, head: str = "linear", scale: float = 1.0,
              hidden: Sequence[int] = (500, 500)) -> SLCModel:
    in_features = int(torch.tensor(input_shape).prod())
    return SLCModel(mlp_features(in_features, hidden), _make_head(head, hidden[-1], num_classes, scale))


def build_cnn(input_shape: Sequence[int], num_classes: int, head: str = "linear", scale: float = 1.0) -> SLCModel:
    if len(input_shape) != 3:
        raise ValueError(f"the paper's CNN takes images [channels, height, width], got input shape {input_shape}")
    features = paper_cnn_features(input_shape[0])
    features(torch.zeros(2, *input_shape))  # materialise the lazy dense layer
    return SLCModel(features, _make_head(head, 1024, num_classes, scale))


MODELS: dict[str, Callable[..., SLCModel]] = {"mlp": build_mlp, "cnn": build_cnn}
TORCHVISION_PREFIX = "torchvision:"


def _torchvision() -> Any:
    """The torchvision module, or a clear error saying it is missing (the paper's models never need it)."""
    try:
        import torchvision
    except ImportError as err:
        raise MissingDependencyError(
            "torchvision is not installed here, so torchvision models (e.g. 'torchvision:resnet18') cannot be "
            "built; install the torchvision that matches your torch. The paper's 'mlp' and 'cnn' work without it."
        ) from err
    except Exception as err:  # installed but broken, e.g. built for another torch
        raise MissingDependencyError(
            f"torchvision is installed but cannot be imported here ({type(err).__name__}: {err}); "
            "the paper's 'mlp' and 'cnn' work without it."
        ) from err
    return torchvision


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (``list_models(module=torchvision.models)``)."""
    tv = _torchvision()
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


def build_torchvision(name: str, input_shape: Sequence[int], num_classes: int, head: str = "linear",
                      scale: float = 1.0) -> SLCModel:
    """A torchvision classification model, randomly initialised (``get_model(name, weights=None)``), as an
    :class:`SLCModel`: its final classification ``nn.Linear`` (:func:`final_linear`) becomes ``nn.Identity`` so
    ``features`` returns the embedding that layer took, and our head (linear or cosine) maps it to
    ``num_classes`` scores. Auxiliary classifiers (Inception-v3, GoogLeNet) are removed. One forward pass of two
    zero images checks at build time that the model takes ``input_shape`` = [channels, height, width]."""
    tv = _torchvision()
    available = tv.models.list_models(module=tv.models)
    if name not in available:
        raise ValueError(f"unknown torchvision classification model {name!r}; "
                         f"valid names: {', '.join(sorted(available))}")
    if len(input_shape) != 3:
        raise ValueError(f"torchvision models take images [channels, height, width], got input shape {input_shape}")
    backbone = tv.models.get_model(name, weights=None)
    if getattr(backbone, "aux_logits", False):  # as torchvision does when it loads weights without aux heads
        backbone.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(backbone, aux):
                setattr(backbone, aux, None)
    path, linear = final_linear(backbone)
    parent, _, child = path.rpartition(".")
    setattr(backbone.get_submodule(parent) if parent else backbone, child, nn.Identity())
    backbone.eval()
    try:
        with torch.no_grad():
            h = backbone(torch.zeros(2, *input_shape))
    except (RuntimeError, ValueError, AssertionError) as err:  # ViT checks the image size with an assert
        raise ValueError(f"torchvision model {name!r} cannot take inputs of shape {tuple(input_shape)}: {err}") from err
    finally:
        backbone.train()
    if not isinstance(h, Tensor) or h.shape != (2, linear.in_features):
        got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise ValueError(f"torchvision model {name!r}: removing {path} should leave [n, {linear.in_features}] "
                         f"embeddings, got {got}")
    return SLCModel(backbone, _make_head(head, linear.in_features, num_classes, scale))


def _torchvision_name(name: str) -> str:
    """The torchvision model that ``name`` (not one of ours) asks for, or an error listing the valid names."""
    prefixed = name.startswith(TORCHVISION_PREFIX)
    tv_name = name[len(TORCHVISION_PREFIX):] if prefixed else name
    ours = ", ".join(sorted(MODELS))
    try:
        available = torchvision_models()
    except MissingDependencyError as err:
        if prefixed:
            raise
        raise ValueError(f"unknown model {name!r}; valid names: {ours}, or 'torchvision:NAME' for a torchvision "
                         f"classification model ({err})") from err
    if tv_name not in available:
        raise ValueError(f"unknown model {name!r}; valid names: {ours}, or a torchvision classification model "
                         f"as 'torchvision:NAME' or NAME, one of: {', '.join(available)}")
    return tv_name


def check_model_name(name: str) -> str:
    """``name`` if :func:`build_model` knows it; otherwise the error it would raise (nothing is built)."""
    if name not in MODELS:
        _torchvision_name(name)
    return name


def build_model(name: str, input_shape: Sequence[int], num_classes: int, head: str = "linear",
                scale: float = 1.0) -> SLCModel:
    """Build a model for inputs of ``input_shape`` and ``num_classes`` outputs: ``"mlp"`` / ``"cnn"`` (``MODELS``,
    the paper's networks), or any torchvision classification model as ``"torchvision:NAME"`` or plain ``NAME``
    when torchvision can be imported (:func:`build_torchvision`)."""
    if name in MODELS:
        return MODELS[name](input_shape, num_classes, head=head, scale=scale)
    return build_torchvision(_torchvision_name(name), input_shape, num_classes, head=head, scale=scale)
