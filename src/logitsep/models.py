"""The paper's networks (Keren, Sabato & Schuller, ICDM 2018, Section VI-A).

Each model is ``features`` (input → embedding ``h``) followed by ``head`` (``h`` → logits, or cosines for the
cosine-margin losses), so a single logit can be computed from ``h`` without the other classes.
Batch normalization then ReLU after every hidden layer, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class SLCModel(nn.Module):
    """``head(features(x))``; ``embed(x)`` returns the embedding the head scores."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def embed(self, x: Tensor) -> Tensor:
        return self.features(x)

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
    if kind == "linear":
        return nn.Linear(width, num_classes)
    if kind == "cosine":
        from .heads import CosineHead

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


def build_model(name: str, input_shape: Sequence[int], num_classes: int, head: str = "linear",
                scale: float = 1.0) -> SLCModel:
    """Build a model by name (``MODELS`` lists them) for inputs of ``input_shape`` and ``num_classes`` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape, num_classes, head=head, scale=scale)
