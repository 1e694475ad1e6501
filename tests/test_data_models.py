"""Dataset loaders and the paper's architectures."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn

from logitsep.data import DATASETS, DatasetNotFoundError, _read_idx, load_dataset, load_fashion_mnist
from logitsep.models import build_model


def test_mnist_is_the_classic_split():
    data = load_dataset("mnist")
    assert data.train_x.shape == (50000, 784) and data.valid_x.shape == (10000, 784)
    assert data.test_x.shape == (10000, 784) and data.num_classes == 10
    x, y = data.split("train_full")
    assert x.shape == (60000, 784) and y.dtype == torch.long
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert sorted(torch.bincount(data.test_y).tolist()) == sorted(np.bincount(data.test_y.numpy()).tolist())
    assert set(data.test_y.tolist()) == set(range(10))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: digits, fashion_mnist, mnist"):
        load_dataset("cifar1000")
    with pytest.raises(ValueError, match="valid splits"):
        load_dataset("digits").split("validation")
    with pytest.raises(ValueError, match="valid names: cnn, mlp"):
        build_model("resnet", (784,), 10)
    assert set(DATASETS) >= {"mnist", "fashion_mnist", "digits"}


def test_fashion_mnist_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def _write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_synthetic_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (60000, 28, 28))
    test = rng.integers(0, 256, (100, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(60000) % 10)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(100) % 10)
    data = load_fashion_mnist(tmp_path)
    assert data.train_x.shape == (50000, 784) and data.valid_x.shape == (10000, 784)
    assert torch.equal(data.test_x[3], torch.tensor(test[3].reshape(-1) / 256.0, dtype=torch.float32))
    assert data.valid_y[0].item() == 50000 % 10
    np.testing.assert_array_equal(_read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.arange(100) % 10)


def test_mlp_is_two_layers_of_500_with_batch_norm_then_relu():
    model = build_model("mlp", (784,), 10)
    kinds = [type(m) for m in model.features if not isinstance(m, nn.Flatten)]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 500), (500, 500), (500, 10)]
    assert model(torch.randn(4, 784)).shape == (4, 10)
    assert model.embed(torch.randn(4, 784)).shape == (4, 500)


def test_paper_cnn_layout():
    model = build_model("cnn", (3, 32, 32), 100)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size[0] for m in convs] == [5, 1, 5, 1, 5, 1]
    assert [m.out_channels for m in convs] == [128, 128, 256, 256, 512, 512]
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3
    assert model.head.in_features == 1024 and model.head.out_features == 100
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("cnn", (784,), 10)
