"""Single-logit classifier (``logitsep.classifier``): calibration, scoring, run files and the CLI commands."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from logitsep.classifier import SingleLogitClassifier, calibrate_run, query
from logitsep.cli import main
from logitsep.core.images import inputs_from_images, read_images
from logitsep.data import load_dataset
from logitsep.heads import CosineHead
from logitsep.models import build_model
from logitsep.thresholds import Thresholds, calibrate_scores
from logitsep.train import TrainConfig, train

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    """A run folder of a small model (digits, 50 steps); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(dataset="digits", loss="batch_ce", steps=50, lr=0.1, batch_size=64)
    train(config, data=digits, out=out, progress=False, eval_splits=())
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run without the thresholds that train() calibrated (tests add their own)."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    (dst / "thresholds.json").unlink()
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- calibration, brute force


def brute_threshold(scores: list[float], positive: list[bool], metric: str, value: float) -> float | None:
    """Loop over every distinct score as a threshold ("positive" when score >= T); None when unreachable."""
    total = sum(positive)
    candidates = sorted(set(scores))  # ascending
    if metric == "recall":
        candidates = candidates[::-1]  # the highest threshold first
    for t in candidates:
        taken = [p for s, p in zip(scores, positive, strict=True) if s >= t]
        tp = sum(taken)
        if metric == "precision" and tp / len(taken) >= value:
            return t  # ascending: the lowest threshold that reaches the precision
        if metric == "recall" and tp / total >= value:
            return t  # descending: the highest threshold that reaches the recall
    return None


@pytest.mark.parametrize(("metric", "value"), [("precision", 0.5), ("precision", 0.75), ("precision", 1.0),
                                               ("recall", 0.3), ("recall", 0.5), ("recall", 0.9), ("recall", 1.0)])
def test_calibration_equals_the_brute_force_loop(metric, value) -> None:
    rng = np.random.default_rng(7)
    n, k = 40, 5
    scores = rng.integers(0, 6, size=(n, k)).astype(np.float32) + (rng.random((n, k)) < 0.2) * 0.5
    y = rng.integers(0, k - 1, size=n)  # class k-1 has no positives
    y[:4] = [0, 1, 2, 3]
    scores[y == 2, 2] += 3  # one class well separated, so a high precision is reachable there
    th = calibrate_scores(scores, y, **{metric: value})
    assert th.target == {"metric": metric, "value": value, "examples": n}
    pooled = brute_threshold(scores.ravel().tolist(), (np.arange(k) == y[:, None]).ravel().tolist(), metric, value)
    if pooled is None:
        assert th.global_threshold > scores.max() and th.global_stats["source"] == "unreachable"
    else:
        assert th.global_threshold == pooled
    for c in range(k):
        positive = (y == c).tolist()
        if not any(positive):
            assert th.per_class[c] == th.global_threshold and th.class_stats[c]["source"] == "global"
            continue
        want = brute_threshold(scores[:, c].tolist(), positive, metric, value)
        if want is None:  # the next float32 above every score: nothing in the calibration data is accepted
            assert th.per_class[c] == float(np.nextafter(scores[:, c].max(), np.float32(np.inf)))
            assert th.class_stats[c]["source"] == "unreachable" and th.class_stats[c]["recall"] == 0.0
            continue
        assert th.per_class[c] == want, c
        accepted = scores[:, c] >= th.per_class[c]
        tp = int((accepted & (y == c)).sum())
        assert th.class_stats[c]["precision"] == tp / int(accepted.sum())
        assert th.class_stats[c]["recall"] == tp / int((y == c).sum())
        assert th.class_stats[c][metric] >= value


def test_calibration_rule_on_a_hand_example() -> None:
    """One class; scores and labels sorted high to low: 9+ 8- 7+ 7+ 7- 5+ 4- (P = 4)."""
    s = np.array([[9], [8], [7], [7], [7], [5], [4]], dtype=np.float32)
    y = np.array([0, 1, 0, 0, 1, 0, 1])
    scores = np.concatenate([s, -s], axis=1)  # a second class so y in [0, 2)
    # precision at T = 9, 8, 7, 5, 4: 1, 1/2, 3/5, 4/6, 4/7 -> the lowest T with precision >= 0.6 is 5
    assert calibrate_scores(scores, y, precision=0.6).per_class[0] == 5.0
    assert calibrate_scores(scores, y, precision=0.7).per_class[0] == 9.0  # only the top reaches 0.7
    # recall at T = 9, 8, 7, 5: 1/4, 1/4, 3/4, 1 -> the highest T with recall >= 0.5 is 7 (ties enter together)
    assert calibrate_scores(scores, y, recall=0.5).per_class[0] == 7.0
    assert calibrate_scores(scores, y, recall=0.25).per_class[0] == 9.0
    assert calibrate_scores(scores, y, recall=1.0).per_class[0] == 5.0
    assert calibrate_scores(scores, y).target["value"] == 0.99  # the default target


def test_calibrate_scores_bad_arguments() -> None:
    s, y = np.zeros((3, 2), dtype=np.float32), np.array([0, 1, 1])
    with pytest.raises(ValueError, match="not both"):
        calibrate_scores(s, y, precision=0.9, recall=0.9)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            calibrate_scores(s, y, recall=bad)
    with pytest.raises(TypeError, match="number"):
        calibrate_scores(s, y, precision="high")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        calibrate_scores(s, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[3\]"):
        calibrate_scores(s, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        calibrate_scores(s, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        calibrate_scores(np.full((3, 2), np.nan, dtype=np.float32), y)


def test_thresholds_json_round_trip_and_corrupt_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    th = calibrate_scores(rng.standard_normal((30, 4)).astype(np.float32), rng.integers(0, 4, 30), recall=0.8,
                          class_names=["a", "b", "c", "d"])
    th.model = {"sha256": "ab" * 32, "step": 3}
    path = th.save(tmp_path / "thresholds.json")
    back = Thresholds.load(path)
    assert back == th
    assert json.loads(path.read_text())["classes"][2]["name"] == "c"
    bad_files = {  # the file's text -> the problem the message must name
        path.read_text()[:50]: "corrupt JSON",
        "\x00\x01": "corrupt JSON",
        json.dumps({"format": "other"}): 'expected a JSON object with "format"',
        json.dumps({**th.to_dict(), "version": 2}): "unsupported version 2",
        json.dumps({**th.to_dict(), "classes": []}): "classes must be a non-empty list",
        json.dumps({**th.to_dict(), "global": {"threshold": float("nan")}}): "global.threshold must be a finite",
        json.dumps({**th.to_dict(), "classes": [{"class": 1, "threshold": 0.0}]}): r"classes\[0\] must be an object",
        json.dumps({**th.to_dict(), "target": {"metric": "f1"}}): "target must be an object with metric",
        json.dumps({**th.to_dict(), "model": {"step": 3}}): "model must be null or an object with a sha256",
    }
    for text, problem in bad_files.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=f"bad.json: not a valid thresholds file \\(.*{problem}"):
            Thresholds.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="no thresholds file"):
        Thresholds.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------- classifier


def test_scores_are_the_models_logits(run, digits) -> None:
    clf = SingleLogitClassifier.from_run(run, data=digits)
    assert clf.num_classes == 10 and clf.input_shape == (64,) and clf.class_names == digits.class_names
    assert clf.thresholds is None and clf.config.loss == "batch_ce"
    x = digits.test_x[:25]
    with torch.no_grad():
        full = clf.model(x)
    h = clf.embed(x)
    assert tuple(h.shape) == (25, 500)
    for c in (0, 7, "3", torch.tensor(9)):
        torch.testing.assert_close(clf.score(x, c), full[:, int(c)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clf.score_embeddings(h, c), full[:, int(c)], rtol=1e-5, atol=1e-5)
    per_row = digits.test_y[:25]
    torch.testing.assert_close(clf.score(x, per_row), full.gather(1, per_row[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clf.score(x, 1), full[:, 2])
    assert tuple(clf.embed(x[:0]).shape) == (0, 500)


def test_score_and_predict_never_compute_other_logits(run, digits) -> None:
    clf = SingleLogitClassifier.from_run(run, data=digits)
    x = digits.test_x[:10]
    expected = clf.score(x, 4)

    def forbidden(*args, **kwargs):
        raise AssertionError("all logits were computed")

    clf.model.head.forward = forbidden
    clf.model.head.logits = forbidden
    torch.testing.assert_close(clf.score(x, 4), expected)
    assert torch.equal(clf.predict(x, 4, threshold=0.0), expected >= 0.0)
    clf.thresholds = calibrate_scores(np.zeros((10, 10), np.float32) + np.arange(10), np.arange(10), recall=1.0)
    assert torch.equal(clf.predict(x, 4), expected >= clf.thresholds.per_class[4])
    per_row = torch.arange(10)
    want = clf.score(x, per_row) >= torch.tensor(clf.thresholds.per_class)[per_row]
    assert torch.equal(clf.predict(x, per_row), want)


def test_calibrate_then_predict_meets_the_target_on_the_calibration_data(run, digits) -> None:
    clf = SingleLogitClassifier.from_run(run, data=digits)
    x, y = digits.valid_x, digits.valid_y
    th = clf.calibrate(x, y, precision=0.9)
    assert clf.thresholds is th and th.model == clf.fingerprint
    for c in range(10):
        accepted = clf.predict(x, c)
        stats = th.class_stats[c]
        if stats["source"] == "unreachable":
            assert not bool(accepted.any())
            continue
        tp = int((accepted & (y == c)).sum())
        assert tp / int(accepted.sum()) == stats["precision"] >= 0.9
        assert tp / int((y == c).sum()) == stats["recall"]
    th = clf.calibrate(x, y, recall=0.95)
    for c in range(10):
        assert int((clf.predict(x, c) & (y == c)).sum()) >= 0.95 * int((y == c).sum())
    # one global threshold over all (example, class) pairs
    scores = clf.all_scores(clf.embed(x))
    onehot = torch.nn.functional.one_hot(y, 10).bool()
    accepted = scores >= th.global_threshold
    assert int((accepted & onehot).sum()) >= 0.95 * len(y)
    assert th.global_stats["recall"] == int((accepted & onehot).sum()) / len(y)


def test_train_saves_thresholds_calibrated_on_the_validation_split(trained, digits) -> None:
    clf = SingleLogitClassifier.from_run(trained, data=digits)
    assert clf.thresholds is not None and clf.thresholds.target["split"] == "valid"
    assert clf.thresholds.target["metric"] == "precision" and clf.thresholds.target["value"] == 0.99
    fresh = SingleLogitClassifier.from_run(trained, data=digits, load_thresholds=False)
    again = fresh.calibrate(*digits.split("valid"), precision=0.99)
    assert again.global_threshold == clf.thresholds.global_threshold and again.per_class == clf.thresholds.per_class


def test_calibrate_run_writes_thresholds_that_from_run_loads(run, digits) -> None:
    before = snapshot(run)
    th = calibrate_run(run, data=digits, recall=0.9)
    after = snapshot(run)
    assert set(after) == set(before) | {"thresholds.json"}
    assert all(after[name] == data for name, data in before.items())  # nothing else touched
    assert not list(run.glob(".*.tmp"))
    assert th.target == {"metric": "recall", "value": 0.9, "examples": 397, "split": "valid", "trained_on": "train"}
    clf = SingleLogitClassifier.from_run(run, data=digits)
    assert clf.thresholds == th
    assert clf.thresholds.model["step"] == 50 and len(clf.thresholds.model["sha256"]) == 64
    # the same scores as a model calibrated in memory
    fresh = SingleLogitClassifier.from_run(run, data=digits, load_thresholds=False)
    assert fresh.calibrate(digits.valid_x, digits.valid_y, recall=0.9).per_class == th.per_class


def test_thresholds_of_another_checkpoint_are_refused(run, digits, tmp_path) -> None:
    calibrate_run(run, data=digits)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    weights = build_model("mlp", (64,), 10).state_dict()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="calibrated for another checkpoint.*logitsep calibrate"):
        SingleLogitClassifier.from_run(other, data=digits)
    # recalibration replaces them
    calibrate_run(other, data=digits)
    assert SingleLogitClassifier.from_run(other, data=digits).thresholds is not None


def test_classifier_on_every_device(run, digits, device) -> None:
    cpu = SingleLogitClassifier.from_run(run, data=digits)
    clf = SingleLogitClassifier.from_run(run, data=digits, device=device)
    x = digits.valid_x[:50]
    torch.testing.assert_close(clf.score(x, 3).cpu(), cpu.score(x, 3), rtol=1e-4, atol=1e-4)
    per_row = digits.valid_y[:50]
    torch.testing.assert_close(clf.score(x, per_row).cpu(), cpu.score(x, per_row), rtol=1e-4, atol=1e-4)
    th = clf.calibrate(digits.valid_x, digits.valid_y, recall=0.9)
    assert clf.predict(x, per_row).device.type == device.type
    assert torch.equal(clf.predict(x, 3).cpu(), clf.score(x, 3).cpu() >= th.per_class[3])


def test_cosine_head_classifier() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (12,), 6, head="cosine", scale=1.0)
    assert isinstance(model.head, CosineHead)
    clf = SingleLogitClassifier(model, (12,), [f"c{i}" for i in range(6)])
    x = torch.randn(9, 12)
    with torch.no_grad():
        full = clf.model(x)
    torch.testing.assert_close(clf.score(x, "c4"), full[:, 4], rtol=1e-5, atol=1e-5)
    th = clf.calibrate(x, torch.arange(9) % 6, recall=1.0)
    assert len(th.per_class) == 6 and th.model is None


# -------------------------------------------------------------------------------------------- bad inputs


def test_classifier_bad_inputs(run, digits) -> None:
    clf = SingleLogitClassifier.from_run(run, data=digits)
    x = digits.test_x[:4]
    with pytest.raises(ValueError, match="unknown class 'cat'.*names"):
        clf.score(x, "cat")
    with pytest.raises(ValueError, match=r"unknown class 10: class indices are in \[0, 10\)"):
        clf.score(x, 10)
    with pytest.raises(ValueError, match="unknown class -1"):
        clf.predict(x, "-1", threshold=0.0)
    with pytest.raises(TypeError, match="int index or a class name"):
        clf.score(x, 2.0)
    with pytest.raises(ValueError, match=r"\[batch, 500\] \(embedding dimension 500\)"):
        clf.score_embeddings(torch.zeros(4, 499), 1)
    with pytest.raises(ValueError, match=r"\[n, 64\]"):
        clf.score(torch.zeros(4, 8, 8), 1)
    with pytest.raises(TypeError, match="floating-point"):
        clf.embed(torch.zeros(4, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="no calibrated thresholds.*logitsep calibrate"):
        clf.predict(x, 1)
    with pytest.raises(ValueError, match="finite number"):
        clf.predict(x, 1, threshold=float("nan"))
    with pytest.raises(ValueError, match=r"\[4\] tensor"):
        clf.score(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"unknown class 10: class indices are in \[0, 10\), got range \[1, 10\]"):
        clf.predict(x, torch.tensor([1, 2, 10, 3]), threshold=0.0)
    clf.thresholds = calibrate_scores(np.eye(10, dtype=np.float32), np.arange(10))
    with pytest.raises(ValueError, match=r"unknown class -1: class indices are in \[0, 10\), got range \[-1, 3\]"):
        clf.predict(x, torch.tensor([1, -1, 2, 3]))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        clf.predict(x, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    clf.thresholds = None
    with pytest.raises(ValueError, match="3 class names for a model of 10 classes"):
        SingleLogitClassifier(clf.model, (64,), ["a", "b", "c"])
    with pytest.raises(ValueError, match="has 3 classes but the model has 10"):
        clf.set_thresholds(calibrate_scores(np.eye(3, dtype=np.float32), np.arange(3)))


def test_broken_run_folders_give_clear_errors(run, digits, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SingleLogitClassifier.from_run(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        SingleLogitClassifier.from_run(empty)
    # a checkpoint that does not fit the model model.json describes
    state = json.loads((run / "state.json").read_text())
    mismatched = tmp_path / "mismatched"
    shutil.copytree(run, mismatched)
    (mismatched / "state.json").write_text(json.dumps({**state, "config": {**state["config"], "loss": "arcface"}}))
    with pytest.raises(ValueError, match=r"state.json and model.json describe different models \(loss 'arcface' in "
                                         r"state.json, 'batch_ce' in model.json\)"):
        SingleLogitClassifier.from_run(mismatched, data=digits)
    spec = json.loads((run / "model.json").read_text())
    (mismatched / "model.json").write_text(json.dumps({**spec, "loss": "arcface", "head": "cosine"}))
    with pytest.raises(ValueError, match=r"run .*mismatched: model.safetensors does not match.*cosine head.*"
                                         r"Unexpected key.*head.bias"):
        SingleLogitClassifier.from_run(mismatched, data=digits)
    with pytest.raises(ValueError, match="trained on 'digits', but data for 'other'"):
        SingleLogitClassifier.from_run(run, data=type("D", (), {"name": "other"})())
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors checkpoint"):
        SingleLogitClassifier.from_run(corrupt, data=digits)
    (corrupt / "state.json").write_text("{")
    with pytest.raises(ValueError, match="state.json: not a valid run state"):
        SingleLogitClassifier.from_run(corrupt, data=digits)
    (run / "thresholds.json").write_text('{"format": "logitsep-thresholds"')
    with pytest.raises(ValueError, match="thresholds.json: not a valid thresholds file"):
        SingleLogitClassifier.from_run(run, data=digits)


# ------------------------------------------------------------------------------------------------- images


def test_inputs_from_images_layouts() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    flat = inputs_from_images(gray, (64,))
    assert flat.dtype == torch.float32 and tuple(flat.shape) == (3, 64)
    assert torch.equal(flat, torch.tensor(gray.reshape(3, 64) / 256.0, dtype=torch.float32))
    rgb = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 256.0
    torch.testing.assert_close(inputs_from_images(rgb, (64,)).double(), torch.tensor(luma.reshape(2, 64)),
                               rtol=1e-6, atol=1e-6)
    rgba = np.concatenate([rgb, np.full((2, 8, 8, 1), 7, np.uint8)], axis=3)
    assert torch.equal(inputs_from_images(rgba, (64,)), inputs_from_images(rgb, (64,)))
    assert torch.equal(inputs_from_images(gray[..., None], (64,)), flat)
    # channel-first models: gray is repeated, colour moved to the front
    cnn = inputs_from_images(rgb, (3, 8, 8))
    assert tuple(cnn.shape) == (2, 3, 8, 8) and torch.equal(cnn[1, 2], torch.tensor(rgb[1, :, :, 2] / 256.0).float())
    rep = inputs_from_images(gray, (3, 8, 8))
    assert torch.equal(rep[:, 0], rep[:, 2]) and torch.equal(rep[:, 1], flat.reshape(3, 8, 8))
    # model inputs pass through unchanged
    feats = rng.random((5, 64)).astype(np.float32)
    assert torch.equal(inputs_from_images(feats, (64,)), torch.from_numpy(feats))
    assert torch.equal(inputs_from_images(feats.astype(np.float64), [64]), torch.from_numpy(feats))


def test_inputs_from_images_bad_inputs() -> None:
    with pytest.raises(ValueError, match="8×8 pixels"):
        inputs_from_images(np.zeros((2, 28, 28), np.uint8), (64,))
    with pytest.raises(ValueError, match="28×28 pixels"):
        inputs_from_images(np.zeros((1, 8, 8, 3), np.uint8), (784,))
    with pytest.raises(ValueError, match="32×32"):
        inputs_from_images(np.zeros((1, 28, 28, 3), np.uint8), (3, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        inputs_from_images(np.zeros((2, 8, 8), np.int16), (64,))
    with pytest.raises(TypeError, match="numpy array"):
        inputs_from_images([[0] * 64], (64,))
    with pytest.raises(ValueError, match="NaN"):
        inputs_from_images(np.full((1, 64), np.nan), (64,))
    with pytest.raises(ValueError, match="no images"):
        inputs_from_images(np.zeros((0, 8, 8), np.uint8), (64,))
    with pytest.raises(ValueError, match=r"\[n, 8, 8\] or \[n, 8, 8, C\]"):
        inputs_from_images(np.zeros((2, 8, 8, 2), np.uint8), (64,))
    with pytest.raises(ValueError, match=r"\[n, 65\]"):
        inputs_from_images(np.zeros((2, 64), np.float32), (65,))  # 65 is no square image


def test_read_images(tmp_path) -> None:
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    assert np.array_equal(read_images(tmp_path / "g.png"), gray[None])
    rgb = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.PNG")
    assert np.array_equal(read_images(tmp_path / "c.PNG"), rgb[None])
    Image.fromarray(np.dstack([rgb, gray]), mode="RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_images(tmp_path / "a.png"), rgb[None])
    np.save(tmp_path / "x.npy", rng.random((4, 64)))
    assert read_images(tmp_path / "x.npy").shape == (4, 64)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy: not a readable .npy"):
        read_images(tmp_path / "obj.npy")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="bad.png: not a readable PNG"):
        read_images(tmp_path / "bad.png")
    Image.fromarray(gray).save(tmp_path / "jpeg.png", format="JPEG")
    with pytest.raises(ValueError, match="not a PNG image"):
        read_images(tmp_path / "jpeg.png")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="give a .npy or a .png"):
        read_images(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="no input file"):
        read_images(tmp_path / "missing.npy")


# ------------------------------------------------------------------------------------------- command line


def test_cli_calibrate_and_query(run, digits, tmp_path, capsys) -> None:
    assert main(["calibrate", str(run), "--precision", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "precision >= 0.95" in out and "(global)" in out and "thresholds.json" in out
    th = Thresholds.load(run / "thresholds.json")
    assert th.target["metric"] == "precision" and th.target["value"] == 0.95
    assert main(["calibrate", str(run), "--recall", "0.9", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["target"]["metric"] == "recall" and len(obj["classes"]) == 10
    assert Thresholds.load(run / "thresholds.json").to_dict() == obj

    x, y = digits.test_x[:6], digits.test_y[:6]
    np.save(tmp_path / "x.npy", x.numpy())
    assert main(["query", str(run), "--class", str(int(y[0])), "--input", str(tmp_path / "x.npy"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    clf = SingleLogitClassifier.from_run(run, data=digits)
    c = int(y[0])
    assert result["class"] == c and result["threshold"] == clf.thresholds.per_class[c]
    assert result["threshold_source"] == "calibrated"
    scores = clf.score(x, c)
    assert [r["score"] for r in result["results"]] == pytest.approx(scores.tolist(), abs=1e-6)
    assert [r["match"] for r in result["results"]] == clf.predict(x, c).tolist()
    # a given threshold, a table
    assert main(["query", str(run), "--class", "0", "--input", str(tmp_path / "x.npy"), "--threshold=-1e9"]) == 0
    out = capsys.readouterr().out
    assert "given threshold" in out and out.count(" yes") == 6
    # uint8 images from a PNG: pixel/256
    img = (digits.test_x[0].reshape(8, 8).numpy() * 16).astype(np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "one.png")
    got = query(run, "5", tmp_path / "one.png")
    want = clf.score(torch.tensor(img.reshape(1, 64) / 256.0, dtype=torch.float32), 5)
    assert got["results"][0]["score"] == pytest.approx(float(want[0]), abs=1e-6)


def test_failing_commands_leave_the_run_folder_unchanged(run, tmp_path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    np.save(tmp_path / "big.npy", np.zeros((2, 28, 28), np.uint8))
    x = str(tmp_path / "x.npy")
    cases = [
        (["query", str(run), "--class", "0", "--input", x], "no calibrated thresholds"),
        (["query", str(run), "--class", "cat", "--input", x, "--threshold", "0"], "unknown class 'cat'"),
        (["query", str(run), "--class", "12", "--input", x, "--threshold", "0"], "unknown class 12"),
        (["query", str(run), "--class", "1", "--input", str(tmp_path / "big.npy"), "--threshold", "0"], "8×8"),
        (["query", str(run), "--class", "1", "--input", str(tmp_path / "none.npy"), "--threshold", "0"], "no input"),
        (["query", str(run), "--class", "1", "--input", x, "--threshold", "nan"], "finite number"),
        (["calibrate", str(run), "--precision", "1.5"], r"\(0, 1\]"),
        (["calibrate", str(tmp_path / "nowhere")], "does not exist"),
    ]
    before = snapshot(run)
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert snapshot(run) == before, argv
    # a corrupt thresholds.json: query refuses it and leaves it as it is; calibrate replaces it
    (run / "thresholds.json").write_text("{corrupt")
    before = snapshot(run)
    assert main(["query", str(run), "--class", "1", "--input", x, "--threshold", "0"]) == 2
    assert "thresholds.json: not a valid thresholds file" in capsys.readouterr().err
    assert main(["calibrate", str(run), "--precision", "2"]) == 2
    assert snapshot(run) == before
    # a checkpoint that does not match: nothing written
    (run / "thresholds.json").unlink()
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "config": {**state["config"], "loss": "arcface"}}))
    spec = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**spec, "loss": "arcface", "head": "cosine"}))
    before = snapshot(run)
    assert main(["calibrate", str(run)]) == 2
    assert "does not match" in capsys.readouterr().err
    assert snapshot(run) == before
