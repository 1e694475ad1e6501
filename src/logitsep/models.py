"""The models: the paper's networks (Keren, Sabato & Schuller, ICDM 2018, Section VI-A), a small ResNet, a head on
feature vectors, and torchvision / timm backbones by name.

Each model is ``features`` (input → embedding ``h``) followed by ``head`` (``h`` → logits, or cosines for the
cosine-margin losses), so a single logit can be computed from ``h`` without the other classes.

* ``"mlp"`` and ``"cnn"``: the paper's networks, batch normalization then ReLU after every layer but the head;
* ``"resnet_small"``: a small ResNet for small images (the printed characters of ``glyphs``);
* ``"linear"``: the head alone on (flattened) inputs, for feature vectors such as a foundation model's embeddings;
* ``"torchvision:NAME"`` (or a plain torchvision name) and ``"timm:NAME"``: a backbone of those libraries whose
  classifier is replaced by our head (:mod:`logitsep.backbones`; the ``[vision]`` extra).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .backbones import TIMM_PREFIX, TORCHVISION_PREFIX, external_backbone, import_timm, torchvision_models
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


class BasicBlock(nn.Module):
    """He et al.'s basic residual block: two 3×3 convolutions with batch norm, ReLU after the first and after the
    sum; the shortcut is a strided 1×1 convolution with batch norm when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet_small_features(in_channels: int = 1, widths: Sequence[int] = (16, 32, 64, 128),
                          embedding: int = 256) -> nn.Sequential:
    """A small ResNet for small images (such as 32×32 printed characters): a 3×3 stem of ``widths[0]`` maps, one
    basic block per further width, each halving the resolution, global average pooling, then a dense layer of
    ``embedding`` units with batch norm and ReLU (about 11 M multiply-adds per 32×32 image with the defaults)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(inplace=True)]
    for cin, cout in zip(widths, widths[1:], strict=False):
        layers.append(BasicBlock(cin, cout, 2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], embedding), nn.BatchNorm1d(embedding),
               nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def build_resnet_small(input_shape: Sequence[int], num_classes: int, head: str = "linear",
                       scale: float = 1.0) -> SLCModel:
    if len(input_shape) != 3:
        raise ValueError(f"the small ResNet takes images [channels, height, width], got input shape {input_shape}")
    return SLCModel(resnet_small_features(input_shape[0]), _make_head(head, 256, num_classes, scale))


def build_linear(input_shape: Sequence[int], num_classes: int, head: str = "linear", scale: float = 1.0) -> SLCModel:
    """A head directly on the (flattened) inputs: a linear (or cosine) classifier over feature vectors, such as
    embeddings a foundation model computed."""
    return SLCModel(nn.Flatten(), _make_head(head, int(torch.tensor(input_shape).prod()), num_classes, scale))


MODELS: dict[str, Callable[..., SLCModel]] = {"mlp": build_mlp, "cnn": build_cnn, "resnet_small": build_resnet_small,
                                              "linear": build_linear}


def _external_name(name: str) -> str:
    """The torchvision/timm model ``name`` asks for (``torchvision:NAME``, ``timm:NAME`` or a plain torchvision
    name), or an error listing the valid names (nothing is built)."""
    ours = ", ".join(sorted(MODELS))
    if name.startswith(TIMM_PREFIX):
        timm = import_timm()
        if not timm.list_models(name[len(TIMM_PREFIX):]):
            raise ValueError(f"unknown model {name!r}: timm has no model {name[len(TIMM_PREFIX):]!r}")
        return name
    prefixed = name.startswith(TORCHVISION_PREFIX)
    tv_name = name[len(TORCHVISION_PREFIX):] if prefixed else name
    try:
        available = torchvision_models()
    except MissingDependencyError as err:
        if prefixed:
            raise
        raise ValueError(f"unknown model {name!r}; valid names: {ours}, 'torchvision:NAME' or 'timm:NAME' "
                         f"({err})") from err
    if tv_name not in available:
        raise ValueError(f"unknown model {name!r}; valid names: {ours}, 'timm:NAME' for a timm model, or a "
                         f"torchvision classification model as 'torchvision:NAME' or NAME, one of: "
                         f"{', '.join(available)}")
    return TORCHVISION_PREFIX + tv_name


def check_model_name(name: str) -> str:
    """``name`` if :func:`build_model` knows it; otherwise the error it would raise (nothing is built)."""
    if name not in MODELS:
        _external_name(name)
    return name


def build_model(name: str, input_shape: Sequence[int], num_classes: int, head: str = "linear",
                scale: float = 1.0) -> SLCModel:
    """Build a model for inputs of ``input_shape`` and ``num_classes`` outputs: ``"mlp"`` / ``"cnn"`` (the paper's
    networks), ``"linear"`` (a head on the inputs), or a torchvision or timm backbone as ``"torchvision:NAME"``
    (or plain ``NAME``) / ``"timm:NAME"`` (:mod:`logitsep.backbones`) with our head on its embedding."""
    if name in MODELS:
        return MODELS[name](input_shape, num_classes, head=head, scale=scale)
    features, width = external_backbone(_external_name(name), tuple(int(s) for s in input_shape))
    return SLCModel(features, _make_head(head, width, num_classes, scale))
