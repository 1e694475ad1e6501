"""Your own data (``--data PATH``): arrays folders (memory-mapped, batched from disk) and image folders, the whole
command chain on them (train → evaluate → calibrate → query → index → serve), class names everywhere a class shows,
and an error naming the file for every malformed input."""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from logitsep.cli import main
from logitsep.core.images import encode_png
from logitsep.data import Rows, load_dataset

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def _patterns(k: int, n_per: int, seed: int, side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images: one random binary pattern per class, each example with a few pixels flipped."""
    rng = np.random.default_rng(seed)
    proto = rng.integers(0, 2, size=(k, side, side)).astype(bool)
    y = np.repeat(np.arange(k), n_per)
    flips = rng.random((len(y), side, side)) < 0.05
    x = (proto[y] ^ flips).astype(np.uint8) * 255
    return x, y.astype(np.int64)


def write_arrays(folder: Path, k: int, n_per: int, names: list[str] | None = None, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = _patterns(k, n_per, seed)
    np.save(folder / "train_x.npy", x)
    np.save(folder / "train_y.npy", y)
    if names is not None:
        (folder / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def big_arrays(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5,000 named classes (the names are CJK-like strings), 4 images of each, 8×8 uint8."""
    names = [f"字{i:04d}" for i in range(5000)]
    return write_arrays(tmp_path_factory.mktemp("arrays") / "data", 5000, 4, names)


def test_arrays_are_memory_mapped_and_read_a_batch_at_a_time(big_arrays: Path) -> None:
    data = load_dataset(str(big_arrays))
    assert data.on_disk and isinstance(data.train_x, Rows) and data.input_kind == "image"
    assert data.num_classes == 5000 and data.class_names[7] == "字0007" and data.input_shape == (1, 8, 8)
    assert len(data.train_x) + len(data.valid_x) + len(data.test_x) == 20000  # 10% + 10% carved by seed
    assert isinstance(data.train_x.parts[0][0], np.memmap)  # never loaded whole
    full = np.load(big_arrays / "train_x.npy")
    labels = np.load(big_arrays / "train_y.npy")
    rows = data.valid_x.parts[0][1]
    pick = torch.tensor([5, 0, 17, 5])
    want = full[rows[pick.numpy()]].astype(np.float32)[:, None] / 256
    assert torch.equal(data.valid_x[pick], torch.from_numpy(want))
    assert data.valid_y.tolist() == labels[rows].tolist()
    x, y = data.split("train_full")  # train + valid: one view over both index sets
    assert len(x) == len(data.train_x) + len(data.valid_x)
    torch.testing.assert_close(x[len(data.train_x) + 3], data.valid_x[3])
    again = load_dataset(str(big_arrays))  # the carving is the same every time
    assert np.array_equal(again.test_x.parts[0][1], data.test_x.parts[0][1])


def test_the_command_chain_on_5000_named_classes(big_arrays: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(big_arrays), "--model", "mlp", "--loss", "batch_ce", "--steps", "40",
                 "--lr", "0.05", "--batch-size", "128", "--out", str(run), "--json"]) == 0
    capsys.readouterr()
    spec = json.loads((run / "model.json").read_text(encoding="utf-8"))
    assert spec["num_classes"] == 5000 and spec["class_names"][4321] == "字4321"
    assert spec["dataset"] == str(big_arrays.resolve()) and spec["input_shape"] == [1, 8, 8]
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auprc"] > 0
    assert main(["calibrate", str(run), "--recall", "0.9", "--json"]) == 0
    classes = json.loads(capsys.readouterr().out)["classes"]
    assert len(classes) == 5000 and classes[12]["name"] == "字0012"
    x, _ = _patterns(5000, 4, 0)
    (tmp_path / "img.png").write_bytes(encode_png(x[4 * 321]))  # an example of class 321
    assert main(["query", str(run), "--class", "字0321", "--input", str(tmp_path / "img.png"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["class"] == 321 and answer["class_name"] == "字0321"
    assert main(["query", str(run), "--class", "字0321", "--input", str(tmp_path / "img.png")]) == 0
    assert "(字0321)" in capsys.readouterr().out  # the table names the class
    assert main(["index", str(run), "--out", str(tmp_path / "index"), "--json"]) == 0
    capsys.readouterr()
    from logitsep.classifier import SingleLogitClassifier
    from logitsep.serve.app import create_app
    from logitsep.serve.service import Service

    with TestClient(create_app(Service(SingleLogitClassifier.from_run(run), tmp_path / "index"))) as client:
        body = client.get("/classes").json()
        assert len(body["classes"]) == 5000 and body["classes"][99]["name"] == "字0099"
        png = base64.b64encode(encode_png(x[4 * 77])).decode()
        assert client.post("/ingest", json={"images": [png]}).status_code == 200
        found = client.get("/search", params={"class_id": 77, "top_k": 5}).json()
        assert found["total"] == 2001 and len(found["items"]) == 5
        client.app.state.service.close()


def test_features_multilabel_and_a_linear_model(tmp_path: Path, capsys) -> None:
    """[n, d] float16 features with an [n, k] 0/1 label matrix, and --model linear over them."""
    rng = np.random.default_rng(3)
    k, d, n = 6, 12, 300
    means = rng.standard_normal((k, d)) * 3
    labels = rng.random((n, k)) < 0.3
    labels[np.arange(n), rng.integers(0, k, n)] = True
    x = (labels.astype(np.float32) @ means / labels.sum(1, keepdims=True) + rng.standard_normal((n, d)))
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "train_x.npy", x.astype(np.float16))
    np.save(folder / "train_y.npy", labels)
    data = load_dataset(str(folder))
    assert data.input_kind == "features" and data.input_shape == (d,) and data.num_classes == k
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--model", "linear", "--loss", "bce", "--steps", "60",
                 "--lr", "0.1", "--batch-size", "32", "--out", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test"]["accuracy"] is None and result["test"]["auprc"] > 0.5  # multi-label: no top-1 accuracy
    np.save(tmp_path / "q.npy", x[:5].astype(np.float32))
    assert main(["query", str(run), "--class", "2", "--input", str(tmp_path / "q.npy"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 5


def _image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (8, 8), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            img = np.clip(rng.normal(60 * i + 20, 10, size=size[::-1]), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / name / f"{j}.png")
    return root


def test_the_command_chain_on_an_image_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LOGITSEP_DATA", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "pets", {"cat": 12, "dog": 12, "owl": 12})
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8), mode="RGB").save(folder / "owl" / "colour.jpg")
    data = load_dataset(str(folder))
    assert data.class_names == ["cat", "dog", "owl"] and data.input_shape == (3, 8, 8)  # one colour image: RGB
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == 1  # decoded once, cached as arrays
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--loss", "bce", "--steps", "30", "--lr", "0.1", "--batch-size",
                 "8", "--out", str(run), "--json"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0 and main(["calibrate", str(run), "--recall", "1"]) == 0
    capsys.readouterr()
    assert main(["query", str(run), "--class", "owl", "--input", str(folder / "owl" / "0.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_name"] == "owl"
    assert main(["index", str(run), "--out", str(tmp_path / "ix"), "--split", "train"]) == 0
    from logitsep.search import ClassSearch

    found = ClassSearch.from_run(run, tmp_path / "ix").search("dog", top_k=3)
    assert len(found) == 3
    # a changed folder is decoded again
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(folder / "cat" / "new.png")
    assert len(load_dataset(str(folder)).train_y) + 1 > len(data.train_y)
    assert len(list((tmp_path / "cache" / "folders").iterdir())) == 2


@pytest.mark.parametrize(("make", "message"), [
    (lambda f: np.save(f / "train_x.npy", np.array([[1.0], [1.0, 2.0]], dtype=object), allow_pickle=True),
     "train_x.npy: not a readable .npy"),  # ragged rows become an object array, which is never unpickled
    (lambda f: np.save(f / "train_x.npy", np.zeros((20, 3), np.float64)), "train_x.npy: must be .* float32"),
    (lambda f: np.save(f / "train_y.npy", np.zeros(19, np.int64)), "train_y.npy has 19 labels but train_x.npy "
                                                                     "has 20 rows"),
    (lambda f: np.save(f / "train_y.npy", np.full(20, -1)), "train_y.npy: labels must be class indices >= 0"),
    (lambda f: np.save(f / "train_y.npy", np.zeros(20, np.float32)), "train_y.npy: class indices must be integers"),
    (lambda f: (f / "classes.txt").write_text("a\nb\n"), "classes.txt names 2 classes but the labels go up to "
                                                         "class 3"),
    (lambda f: (f / "classes.txt").write_text("a\nb\na\nc\n"), "classes.txt: class names must be unique"),
    (lambda f: (f / "classes.txt").write_text("a\n\nb\nc\n"), "classes.txt: line 2 is empty"),
    (lambda f: np.save(f / "train_x.npy", np.full((20, 3), np.nan, np.float32)), "train_x.npy: row 0 holds NaN"),
    (lambda f: np.save(f / "valid_x.npy", np.zeros((4, 5), np.float32)), "valid_y.npy is missing"),
    (lambda f: (np.save(f / "valid_x.npy", np.zeros((4, 5), np.float32)),
                np.save(f / "valid_y.npy", np.zeros(4, np.int64))), "valid_x.npy: inputs of shape \\[5\\]"),
    (lambda f: np.save(f / "train_y.npy", np.full((20, 4), 2)), "train_y.npy: a multi-label matrix must hold only"),
    (lambda f: (f / "train_y.npy").unlink(), "has no train_y.npy"),
])
def test_malformed_arrays_name_the_file(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    np.save(folder / "train_x.npy", np.zeros((20, 3), np.float32))
    np.save(folder / "train_y.npy", np.arange(20) % 4)
    make(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_dataset(str(folder))


def test_malformed_image_folders_name_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOGITSEP_DATA", str(tmp_path / "cache"))
    folder = _image_folder(tmp_path / "a", {"x": 3, "y": 3})
    (folder / "y" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not an image file"):
        load_dataset(str(folder))
    (folder / "y" / "notes.txt").unlink()
    (folder / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: class folder without images"):
        load_dataset(str(folder))
    (folder / "empty").rmdir()
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "x" / "tall.png")
    with pytest.raises(ValueError, match="tall.png: 8x9 pixels, but .* is 8x8"):
        load_dataset(str(folder))
    (folder / "x" / "tall.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="tall.png: not a readable PNG/JPEG image"):
        load_dataset(str(folder))
    (folder / "x" / "tall.png").unlink()
    with pytest.raises(FileNotFoundError, match="no data folder"):
        load_dataset(str(tmp_path / "nowhere"))
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--loss", "ce", "--out", str(tmp_path / "r")]) == 1
