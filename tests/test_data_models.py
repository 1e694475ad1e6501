"""Dataset loaders (real MNIST, and fake files in the exact on-disk formats of the others) and the architectures."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from logitsep.backbones import final_linear, import_torchvision
from logitsep.cli import build_parser
from logitsep.core.extras import MissingDependencyError
from logitsep.data import (
    DATASETS,
    DatasetNotFoundError,
    Splits,
    carve_validation,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    load_synthetic,
    safe_unpickle,
)
from logitsep.data.builtin import _read_idx
from logitsep.models import build_model, check_model_name

# --------------------------------------------------------------------------------------------------- helpers


def _expected_split(n: int, valid_size: int, seed: int) -> tuple[list[int], list[int]]:
    """The documented rule, written out: valid = the first valid_size of a seeded permutation; both sorted."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[valid_size:]), sorted(order[:valid_size])


def _pixels(images_chw: np.ndarray) -> torch.Tensor:
    return torch.tensor(images_chw.astype(np.float64) / 256.0, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------ MNIST


def test_mnist_is_the_classic_split():
    data = load_dataset("mnist")
    assert data.train_x.shape == (50000, 784) and data.valid_x.shape == (10000, 784)
    assert data.test_x.shape == (10000, 784) and data.num_classes == 10
    assert data.class_names == [str(i) for i in range(10)]
    x, y = data.split("train_full")
    assert x.shape == (60000, 784) and y.dtype == torch.long
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert set(data.test_y.tolist()) == set(range(10))
    assert sorted(torch.bincount(data.train_y).tolist())[0] > 4000  # every digit well represented


class _RunsCode:
    """Pickles to ``os.system(command)``: the classic code-execution payload."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4])
def test_mnist_unpickler_refuses_anything_but_numpy_arrays(tmp_path, protocol):
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(((np.zeros((2, 784), np.float32), _RunsCode(f"touch {marker}")),), protocol=protocol)
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        f.write(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        load_mnist(path)
    assert not marker.exists()
    with gzip.open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        safe_unpickle(f)
    for name in ("builtins.eval", "subprocess.Popen", "numpy.load"):  # a hand-written GLOBAL opcode for each
        module, attr = name.split(".")
        raw = b"c" + module.encode() + b"\n" + attr.encode() + b"\n" + b"."
        with pytest.raises(pickle.UnpicklingError, match=name.replace(".", r"\.")):
            safe_unpickle(io.BytesIO(raw))
    codecs_call = b"c_codecs\nencode\n(X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13tR."  # not latin-1
    assert pickle.loads(codecs_call.replace(b"rot13", b"utf_8")) == b"abc"  # a well-formed pickle
    with pytest.raises(pickle.UnpicklingError, match="refusing _codecs.encode"):
        safe_unpickle(io.BytesIO(codecs_call))


@pytest.mark.parametrize("protocol", [2, 4])
def test_mnist_loader_reads_a_numpy_pickle_and_checks_its_layout(tmp_path, protocol):
    rng = np.random.default_rng(0)
    parts = [(rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)) for n in (30, 10, 20)]
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(parts), f, protocol=protocol)
    data = load_mnist(path)
    for (x, y), split in zip(parts, ("train", "valid", "test"), strict=True):
        got_x, got_y = data.split(split)
        np.testing.assert_array_equal(got_x.numpy(), x)
        np.testing.assert_array_equal(got_y.numpy(), y)
    with gzip.open(path, "wb") as f:
        pickle.dump((parts[0], parts[1]), f, protocol=protocol)
    with pytest.raises(ValueError, match=f"{path.name} is not an MNIST pickle"):
        load_mnist(path)
    path.write_bytes(gzip.compress(pickle.dumps(tuple(parts), protocol=protocol))[:-200])
    with pytest.raises(ValueError, match=f"{path.name} is corrupt or truncated"):
        load_mnist(path)


# ------------------------------------------------------------------------------------------ registry, splits


def test_unknown_names_list_the_valid_ones():
    names = "cifar10, cifar100, digits, fashion_mnist, glyphs, mnist, svhn, synthetic"
    with pytest.raises(ValueError, match=f"valid names: {names}"):
        load_dataset("cifar1000")
    with pytest.raises(ValueError, match="valid splits"):
        load_dataset("digits").split("validation")
    with pytest.raises(ValueError, match="valid names: cnn, linear, mlp"):
        build_model("resnet", (784,), 10)
    assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "digits", "synthetic", "glyphs"}
    small = load_dataset("synthetic", num_classes=3, dim=2, per_class_train=4)  # keyword arguments reach the loader
    assert small.train_x.shape == (12, 2)
    with pytest.raises(TypeError, match="valid_size"):
        load_dataset("digits", valid_size=10)


def test_carve_validation_is_a_seeded_partition():
    train, valid = carve_validation(50, 7, seed=3)
    assert (train.tolist(), valid.tolist()) == _expected_split(50, 7, 3)
    assert sorted(train.tolist() + valid.tolist()) == list(range(50))
    assert np.array_equal(carve_validation(50, 7, seed=3)[1], valid)  # the same seed, the same split
    assert not np.array_equal(carve_validation(50, 7, seed=4)[1], valid)
    for bad in (0, 50, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"valid_size must be an integer in \[1, 49\]"):
            carve_validation(50, bad)


def test_splits_class_names_default_and_check():
    t = torch.zeros(1, 2)
    y = torch.zeros(1, dtype=torch.long)
    assert Splits("x", t, y, t, y, t, y, 3).class_names == ["0", "1", "2"]
    assert Splits("x", t, y, t, y, t, y, 2, ["a", "b"]).class_names == ["a", "b"]
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        Splits("x", t, y, t, y, t, y, 3, ["a", "b"])


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion_files(folder, n_train=600, n_test=50):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 256, (n_test, 28, 28))
    _write_idx(folder / "train-images-idx3-ubyte.gz", train)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)
    return train, test


def test_fashion_mnist_missing_files_say_what_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    _fashion_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"missing t10k-labels-idx1-ubyte.gz in {tmp_path} ") as err:
        load_fashion_mnist(tmp_path)
    assert "train-images" not in str(err.value)


def test_fashion_mnist_reader_on_idx_files_with_a_seeded_validation_split(tmp_path):
    train, test = _fashion_files(tmp_path)
    data = load_fashion_mnist(tmp_path, valid_size=100, seed=5)
    assert data.train_x.shape == (500, 784) and data.valid_x.shape == (100, 784) and data.test_x.shape == (50, 784)
    tr, va = _expected_split(600, 100, 5)
    for i, idx in enumerate(va[:5] + va[-2:]):
        j = va.index(idx)
        assert torch.equal(data.valid_x[j], _pixels(train[idx].reshape(-1))), i
    assert data.valid_y.tolist() == [i % 10 for i in va]
    assert data.train_y.tolist() == [i % 10 for i in tr]
    assert torch.equal(data.test_x[3], _pixels(test[3].reshape(-1)))
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    again = load_dataset("fashion-mnist", root=tmp_path, valid_size=100, seed=5)  # the other spelling
    assert again.name == "fashion_mnist" and torch.equal(again.valid_x, data.valid_x)
    assert not torch.equal(load_fashion_mnist(tmp_path, valid_size=100, seed=6).valid_y, data.valid_y)
    np.testing.assert_array_equal(_read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.arange(50) % 10)


def test_fashion_mnist_subfolder_and_truncated_files(tmp_path):
    _fashion_files(tmp_path / "fashion-mnist", n_train=30, n_test=5)
    assert load_fashion_mnist(tmp_path, valid_size=10).train_x.shape == (20, 784)
    path = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(ValueError, match=f"{path.name} is corrupt or truncated"):
        load_fashion_mnist(tmp_path, valid_size=10)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{path.name} is corrupt or truncated"):
        load_fashion_mnist(tmp_path, valid_size=10)


# --------------------------------------------------------------------------------------------------- CIFAR


def _cifar_record(labels: list[int], image_hwc: np.ndarray) -> bytes:
    """One record the way the CIFAR page describes it: label byte(s), then the red, green and blue planes."""
    planes = b"".join(bytes(image_hwc[:, :, c].reshape(-1).tolist()) for c in range(3))
    return bytes(labels) + planes


def _fake_cifar10(folder, per_batch=6, n_test=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5 * per_batch + n_test, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images)).tolist()
    for b in range(5):
        rows = range(b * per_batch, (b + 1) * per_batch)
        (folder / f"data_batch_{b + 1}.bin").write_bytes(b"".join(_cifar_record([labels[i]], images[i]) for i in rows))
    rows = range(5 * per_batch, len(images))
    (folder / "test_batch.bin").write_bytes(b"".join(_cifar_record([labels[i]], images[i]) for i in rows))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return images, labels, names


def test_cifar10_binary_files(tmp_path):
    images, labels, names = _fake_cifar10(tmp_path / "cifar-10-batches-bin")
    data = load_dataset("cifar10", root=tmp_path, valid_size=4, seed=2)
    assert data.input_shape == (3, 32, 32) and data.train_x.dtype == torch.float32
    assert (len(data.train_y), len(data.valid_y), len(data.test_y)) == (26, 4, 8)
    assert data.class_names == names and data.num_classes == 10
    tr, va = _expected_split(30, 4, 2)
    for split, rows in (("train", tr), ("valid", va), ("test", list(range(30, 38)))):
        x, y = data.split(split)
        assert y.tolist() == [labels[i] for i in rows]
        for j, i in enumerate(rows):
            assert torch.equal(x[j], _pixels(images[i].transpose(2, 0, 1))), (split, i)
    assert torch.equal(load_dataset("cifar10", root=tmp_path / "cifar-10-batches-bin", valid_size=4, seed=2).valid_x,
                       data.valid_x)  # root may also be the unpacked folder itself


def test_cifar10_missing_and_corrupt_files(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-bin"
    _fake_cifar10(folder)
    monkeypatch.setenv("LOGITSEP_DATA", str(tmp_path))
    assert len(load_dataset("cifar10", valid_size=3).valid_y) == 3  # the default root comes from LOGITSEP_DATA
    (folder / "data_batch_3.bin").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10")
    message = str(err.value)
    assert f"missing data_batch_3.bin in {folder} " in message and "data_batch_2" not in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and str(tmp_path) in message
    (tmp_path / "elsewhere.bin").rename(folder / "data_batch_3.bin")
    raw = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="data_batch_3.bin is corrupt or truncated"):
        load_dataset("cifar10", valid_size=3)
    (folder / "data_batch_3.bin").write_bytes(bytes([10]) + raw[1:])
    with pytest.raises(ValueError, match="data_batch_3.bin is corrupt: label 10"):
        load_dataset("cifar10", valid_size=3)
    (folder / "data_batch_3.bin").write_bytes(raw)
    (folder / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="batches.meta.txt is corrupt: expected 10 class names"):
        load_dataset("cifar10", valid_size=3)
    monkeypatch.setenv("LOGITSEP_DATA", str(tmp_path / "nothing-here"))
    with pytest.raises(DatasetNotFoundError, match="nothing-here"):
        load_dataset("cifar10")


def test_cifar100_binary_files_use_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (25, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, 25).tolist()
    coarse = [f // 5 for f in fine]
    (folder / "train.bin").write_bytes(b"".join(_cifar_record([coarse[i], fine[i]], images[i]) for i in range(20)))
    (folder / "test.bin").write_bytes(b"".join(_cifar_record([coarse[i], fine[i]], images[i]) for i in range(20, 25)))
    names = [f"class_{i}" for i in range(100)]
    (folder / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    data = load_dataset("cifar100", root=tmp_path, valid_size=5)
    assert data.num_classes == 100 and data.class_names == names
    tr, va = _expected_split(20, 5, 0)
    assert data.valid_y.tolist() == [fine[i] for i in va] and data.train_y.tolist() == [fine[i] for i in tr]
    assert data.test_y.tolist() == fine[20:]
    assert torch.equal(data.test_x[4], _pixels(images[24].transpose(2, 0, 1)))
    truncated = (folder / "test.bin").read_bytes()[: 2 * 3074 - 1]  # one byte short of two records
    (folder / "test.bin").write_bytes(truncated)
    with pytest.raises(ValueError, match="test.bin is corrupt or truncated"):
        load_dataset("cifar100", root=tmp_path, valid_size=5)
    (folder / "train.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"missing train.bin in {folder} "):
        load_dataset("cifar100", root=tmp_path)


# ---------------------------------------------------------------------------------------------------- SVHN


def _fake_svhn(folder, n_train=12, n_test=5):
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, as SVHN stores them
        savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
        out[name] = (x, y)
    return out


def test_svhn_mat_files(tmp_path):
    arrays = _fake_svhn(tmp_path / "svhn")
    data = load_dataset("svhn", root=tmp_path, valid_size=2, seed=1)
    assert (len(data.train_y), len(data.valid_y), len(data.test_y)) == (10, 2, 5)
    assert data.class_names == [str(d) for d in range(10)]
    assert data.test_y.tolist() == [1, 2, 3, 4, 5]
    x, y = arrays["train"]
    tr, va = _expected_split(12, 2, 1)
    assert data.train_y.tolist() == [int(y[i, 0]) % 10 for i in tr]  # label 10 is the digit 0
    assert 0 in data.split("train_full")[1].tolist()
    j, i = 1, va[1]
    expected = torch.empty(3, 32, 32)
    for c in range(3):  # element by element: X[row, col, channel, example]
        for r in range(32):
            for q in range(32):
                expected[c, r, q] = float(x[r, q, c, i]) / 256.0
    assert torch.equal(data.valid_x[j], expected)


def test_svhn_missing_corrupt_and_without_scipy(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="http://ufldl.stanford.edu/housenumbers/") as err:
        load_dataset("svhn", root=tmp_path)
    assert "train_32x32.mat, test_32x32.mat" in str(err.value)
    _fake_svhn(tmp_path)
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="test_32x32.mat is corrupt or truncated"):
        load_dataset("svhn", root=tmp_path, valid_size=2)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(MissingDependencyError, match="pip install scipy"):
        load_dataset("svhn", root=tmp_path, valid_size=2)


# ------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_sizes_determinism_and_learnability():
    data = load_synthetic(num_classes=200, dim=32, per_class_train=20, per_class_valid=2, per_class_test=5, seed=7)
    assert data.train_x.shape == (4000, 32) and data.valid_x.shape == (400, 32) and data.test_x.shape == (1000, 32)
    assert data.train_x.dtype == torch.float32 and data.num_classes == 200
    assert torch.bincount(data.train_y, minlength=200).tolist() == [20] * 200
    assert torch.bincount(data.test_y, minlength=200).tolist() == [5] * 200
    again = load_synthetic(num_classes=200, dim=32, per_class_train=20, per_class_valid=2, per_class_test=5, seed=7)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)
    other = load_synthetic(num_classes=200, dim=32, per_class_train=20, per_class_valid=2, per_class_test=5, seed=8)
    assert not torch.equal(other.train_x, data.train_x)
    # a linear rule (nearest class mean, estimated from the training set) classifies the test set well
    x, y = data.train_x.double(), data.train_y
    means = torch.zeros(200, 32, dtype=torch.float64).index_add_(0, y, x) / 20
    pred = torch.cdist(data.test_x.double(), means).argmin(1)
    assert (pred == data.test_y).double().mean() > 0.8  # chance is 0.005


def test_synthetic_many_classes_and_defaults():
    big = load_synthetic(num_classes=100_000, dim=8, per_class_train=1, per_class_valid=1, per_class_test=1)
    assert big.train_x.shape == (100_000, 8) and len(big.class_names) == 100_000
    assert sorted(big.test_y.tolist()) == list(range(100_000))
    default = load_dataset("synthetic")
    assert default.train_x.shape == (50_000, 64) and default.valid_x.shape == (10_000, 64)
    assert default.num_classes == 1000
    for kwargs, name in (({"num_classes": 1}, "num_classes"), ({"dim": 0}, "dim"), ({"per_class_test": 2.0},
                         "per_class_test"), ({"noise": float("nan")}, "noise"), ({"separation": -1}, "separation")):
        with pytest.raises(ValueError, match=name):
            load_synthetic(**kwargs)


# --------------------------------------------------------------------------------------------------- models


def test_mlp_is_two_layers_of_500_with_batch_norm_then_relu():
    model = build_model("mlp", (784,), 10)
    kinds = [type(m) for m in model.features if not isinstance(m, nn.Flatten)]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 500), (500, 500), (500, 10)]
    assert model(torch.randn(4, 784)).shape == (4, 10)
    assert model.embed(torch.randn(4, 784)).shape == (4, 500)


def _describe(module: nn.Module) -> tuple:
    if isinstance(module, nn.Conv2d):
        return ("conv", module.kernel_size, module.stride, module.padding, module.in_channels, module.out_channels)
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        return ("bn", module.num_features)
    if isinstance(module, nn.MaxPool2d):
        return ("pool", module.kernel_size, module.stride)
    if isinstance(module, nn.Linear):
        return ("dense", module.in_features, module.out_features)
    return (type(module).__name__,)


def test_paper_cnn_layer_structure_is_pinned():
    """Section VI-A: 5x5,1x1,5x5,1x1,5x5,1x1 convolutions with 128,128,256,256,512,512 maps, 3x3/stride-2
    max-pooling after convolutions 2, 4, 6, a dense layer of 1024; batch norm then ReLU after every layer."""
    model = build_model("cnn", (3, 32, 32), 100)
    expected = []
    channels = 3
    for i, (kernel, maps) in enumerate([(5, 128), (1, 128), (5, 256), (1, 256), (5, 512), (1, 512)], start=1):
        expected += [("conv", (kernel, kernel), (1, 1), (kernel // 2, kernel // 2), channels, maps), ("bn", maps),
                     ("ReLU",)]
        channels = maps
        if i % 2 == 0:
            expected.append(("pool", 3, 2))
    expected += [("Flatten",), ("dense", 512 * 4 * 4, 1024), ("bn", 1024), ("ReLU",)]  # 32 -> 16 -> 8 -> 4
    assert [_describe(m) for m in model.features] == expected
    assert _describe(model.head) == ("dense", 1024, 100)
    assert model.embed(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("cnn", (784,), 10)


# ------------------------------------------------------------------------------------------ torchvision models


class _ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 1000)

    def forward(self, x):
        return self.fc(self.body(x))


class _VGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 1000))

    def forward(self, x):
        return self.classifier(self.features(x))


class _ViTLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.LazyLinear(6))
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(6, 1000)))

    def forward(self, x):
        torch._assert(x.shape[-1] == 16, f"Wrong image width! Expected 16 but got {x.shape[-1]}!")
        return self.heads(self.encoder(x))


class _DenseNetLike(_ResNetLike):
    def __init__(self):
        super().__init__()
        self.classifier = self.fc
        del self.fc

    def forward(self, x):
        return self.classifier(self.body(x))


class _InceptionLike(_ResNetLike):
    """Returns (logits, aux logits) in training mode while ``aux_logits`` is on, like torchvision's Inception3."""

    def __init__(self):
        super().__init__()
        self.aux_logits = True
        self.AuxLogits = nn.Sequential(nn.Flatten(), nn.LazyLinear(1000))

    def forward(self, x):
        aux = self.AuxLogits(x) if self.training and self.AuxLogits is not None else None
        out = self.fc(self.body(x))
        return (out, aux) if self.training and self.aux_logits else out


class _NestedLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 5), nn.ReLU())
        self.top = nn.ModuleDict({"proj": nn.Linear(5, 1000)})

    def forward(self, x):
        return self.top["proj"](self.trunk(x))


class _SqueezeLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = nn.Sequential(nn.Conv2d(3, 1000, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.classifier(x)


_FAKE_MODELS = {"resnet_like": _ResNetLike, "vgg_like": _VGGLike, "vit_like": _ViTLike, "densenet_like": _DenseNetLike,
                "inception_like": _InceptionLike, "nested_like": _NestedLike, "squeeze_like": _SqueezeLike}


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in ``torchvision`` with ``models.get_model`` and ``models.list_models`` (the real one is not
    installed here); records the calls to check ``weights=None``."""
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return _FAKE_MODELS[name]()

    def list_models(module=None):
        assert module is models, "only the classification models (module=torchvision.models) are listed"
        return sorted(_FAKE_MODELS)

    models.get_model, models.list_models = get_model, list_models
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


@pytest.mark.parametrize(("name", "width", "removed"), [
    ("resnet_like", 8, "fc"), ("vgg_like", 12, "classifier.3"), ("vit_like", 6, "heads.head"),
    ("densenet_like", 8, "classifier"), ("inception_like", 8, "fc"), ("nested_like", 5, "top.proj")])
def test_torchvision_models_get_our_head(fake_torchvision, name, width, removed):
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", (3, 16, 16), 7)
    assert fake_torchvision == [(name, {"weights": None})]
    assert isinstance(model.features.get_submodule(removed), nn.Identity)
    assert not [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (width, 7)
    x = torch.randn(3, 3, 16, 16)
    model.eval()  # no dropout: the two calls below see the same network
    h = model.embed(x)
    assert h.shape == (3, width) and model(x).shape == (3, 7)
    torch.testing.assert_close(model(x), h @ model.head.weight.T + model.head.bias)
    assert build_model(name, (3, 16, 16), 7, head="cosine").head(h).abs().max() <= 1 + 1e-6  # plain name, cosines
    assert check_model_name(name) == name and check_model_name(f"torchvision:{name}") == f"torchvision:{name}"


def test_torchvision_embedding_is_the_input_of_the_removed_layer(fake_torchvision):
    torch.manual_seed(0)
    model = build_model("torchvision:resnet_like", (3, 16, 16), 4)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.embed(x), model.features.body(x))
    model.load_state_dict(model.state_dict())  # plain keys, no wrapper needed to reload a checkpoint
    assert "features.body.0.weight" in model.state_dict() and "head.weight" in model.state_dict()
    inception = build_model("torchvision:inception_like", (3, 16, 16), 4)
    assert inception.features.aux_logits is False and inception.features.AuxLogits is None
    assert inception.train()(x).shape == (2, 4)


def test_torchvision_errors(fake_torchvision):
    with pytest.raises(ValueError, match="no nn.Linear classification layer"):
        build_model("torchvision:squeeze_like", (3, 16, 16), 4)
    with pytest.raises(ValueError, match="cannot take inputs of shape \\(3, 20, 20\\).*Wrong image width"):
        build_model("torchvision:vit_like", (3, 20, 20), 4)
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("torchvision:resnet_like", (784,), 4)
    with pytest.raises(ValueError, match="unknown model 'torchvision:resnet9000'.*resnet_like"):
        build_model("torchvision:resnet9000", (3, 16, 16), 4)
    with pytest.raises(ValueError, match="valid names: cnn, linear, mlp, resnet_small, 'timm:NAME' for a timm "
                                         "model, or a torchvision .*densenet_like"):
        check_model_name("alexnet")
    assert final_linear(_VGGLike())[0] == "classifier.3"


def test_without_torchvision_the_error_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match="torchvision is not installed here") as err:
        build_model("torchvision:resnet18", (3, 32, 32), 10)
    assert "'mlp' and 'cnn' work without it" in str(err.value)
    assert isinstance(err.value, ImportError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="unknown model 'resnet18'; valid names: cnn, linear, mlp.*not installed"):
        build_model("resnet18", (3, 32, 32), 10)
    assert build_model("mlp", (64,), 10)(torch.randn(2, 64)).shape == (2, 10)  # ours need nothing


def test_real_torchvision_imports_on_this_torch():
    """torchvision (a CUDA build for torch 2.13 on a CPU torch here) imports through logitsep.backbones."""
    tv = import_torchvision()
    model = build_model("torchvision:resnet18", (3, 32, 32), 10)
    assert isinstance(model.features.fc, nn.Identity) and model.head.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "resnet18" in tv.models.list_models(module=tv.models)
    with pytest.raises(ValueError, match="no nn.Linear"):
        build_model("squeezenet1_0", (3, 64, 64), 10)


# ------------------------------------------------------------------------------------------------ command line


def test_cli_accepts_torchvision_models_and_dataset_aliases():
    parser = build_parser()
    args = parser.parse_args(["train", "--dataset", "fashion-mnist", "--model", "torchvision:resnet18", "--loss", "ce",
                              "--out", "x"])
    assert (args.dataset, args.model) == ("fashion_mnist", "torchvision:resnet18")
    args = parser.parse_args(["reproduce", "table1", "--dataset", "synthetic", "--model", "cnn", "--out", "x"])
    assert (args.dataset, args.model) == ("synthetic", "cnn")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "imagenet", "--loss", "ce", "--out", "x"])
