"""Enrollment: classes added to a trained run from a few examples (logitsep.enrollment, SingleLogitClassifier.enroll,
``logitsep enroll`` / ``logitsep classes``, and what the index and class search see).

References are written differently from the code: the imprinted cosine row is a loop over examples, the logits
of enrolled classes come from a float64 matrix product of the stored rows, and the trained rows are compared bit
for bit with the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from logitsep import enrollment
from logitsep.classifier import SingleLogitClassifier, calibrate_run, class_list, enroll_run
from logitsep.cli import main
from logitsep.data import load_dataset
from logitsep.enrollment import ENROLLED, NEGATIVES, Enrolled, extend_head, new_row, read_enrolled, truncate_head
from logitsep.heads import CosineHead, LinearHead
from logitsep.runs import load_run
from logitsep.search import ClassSearch, build_index
from logitsep.train import TrainConfig, train


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits, batch_ce, calibrated: enrolled classes are copies of trained digits under new names."""
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="digits", model="mlp", loss="batch_ce", steps=300, lr=0.1, batch_size=64, seed=0),
          out=out, progress=False, eval_splits=())
    calibrate_run(out)
    return out


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def examples(digits, c: int, n: int = 5) -> torch.Tensor:
    return digits.train_x[digits.train_y == c][:n]


def test_enroll_adds_a_class_without_touching_the_trained_ones(run: Path, digits) -> None:
    before = SingleLogitClassifier.from_run(run)
    x, _ = digits.split("test")
    old = before.head.logit_columns(before.embed(x))
    clf = SingleLogitClassifier.from_run(run)
    c = clf.enroll("threes", examples(digits, 3))
    assert c == 10 and clf.num_classes == 11 and clf.class_names[-1] == "threes" and clf.base_classes == 10
    again = SingleLogitClassifier.from_run(run)  # what the next process sees
    assert again.class_names == clf.class_names and again.num_classes == 11
    # trained rows: the checkpoint's, bit for bit; their logits unchanged
    weights = load_file(str(run / "model.safetensors"))
    head_key = next(k for k in weights if k.endswith("head.weight"))
    assert torch.equal(again.head.weight[:10], weights[head_key])
    assert torch.equal(again.head.logit_columns(again.embed(x))[:, :10], old)
    # the new logit: the stored row, in float64
    stored = load_file(str(run / ENROLLED))
    h = again.embed(x).double()
    expected = h @ stored["weight"][0].double() + stored["bias"][0].double()
    torch.testing.assert_close(again.score(x, "threes").double(), expected, rtol=1e-5, atol=1e-5)
    # its threshold is the global one, and predict uses it
    assert again.threshold_for("threes") == again.thresholds.global_threshold
    assert torch.equal(again.predict(x, 10), again.score(x, 10) >= again.thresholds.global_threshold)


def test_enrolled_class_finds_its_examples(run: Path, digits) -> None:
    """A class enrolled from 10 examples of a digit is found among the test set above the global threshold (the
    digit is also a trained class here, so the stored negatives contain it: the bar is modest on purpose)."""
    clf = SingleLogitClassifier.from_run(run)
    x, y = digits.split("test")
    for rule in ("imprint", "fit"):
        c = clf.enroll(f"sevens-{rule}", examples(digits, 7, 10), rule=rule)
        s = clf.score(x, c)
        order = torch.argsort(s, descending=True)[:20]
        assert (y[order] == 7).float().mean() >= 0.9, rule


def test_remove_renumbers_and_refuses_trained_classes(run: Path, digits) -> None:
    clf = SingleLogitClassifier.from_run(run)
    clf.enroll("a", examples(digits, 1))
    clf.enroll("b", examples(digits, 2))
    wb = clf.head.weight[11].clone()
    with pytest.raises(ValueError, match="trained, not enrolled"):
        clf.remove("4")
    clf.remove("a")
    again = SingleLogitClassifier.from_run(run)
    assert again.class_names[10:] == ["b"] and torch.equal(again.head.weight[10], wb)
    again.remove(10)
    assert not (run / ENROLLED).exists()
    assert SingleLogitClassifier.from_run(run).num_classes == 10


@pytest.mark.parametrize("name, err, match", [
    ("", ValueError, "empty"), ("   ", ValueError, "empty"), ("3", ValueError, "exists already"),
    ("12", ValueError, "number"), ("x" * 201, ValueError, "at most 200"), ("a\nb", ValueError, "control"),
    (7, TypeError, "string")])
def test_bad_names_change_nothing(run: Path, digits, name, err, match) -> None:
    clf = SingleLogitClassifier.from_run(run)
    with pytest.raises(err, match=match):
        clf.enroll(name, examples(digits, 1))
    assert clf.num_classes == 10 and not (run / ENROLLED).exists()


@pytest.mark.parametrize("make, err, match", [
    (lambda d: torch.zeros(0, 64), ValueError, "1 to 1024"),
    (lambda d: torch.zeros(1025, 64), ValueError, "1 to 1024"),
    (lambda d: torch.zeros(3, 63), ValueError, "must be inputs"),
    (lambda d: torch.zeros(3, 64, dtype=torch.long), TypeError, "floating"),
    (lambda d: torch.full((3, 64), float("nan")), ValueError, "non-finite"),
    (lambda d: np.zeros((3, 64)), TypeError, "torch.Tensor")])
def test_bad_examples_change_nothing(run: Path, digits, make, err, match) -> None:
    clf = SingleLogitClassifier.from_run(run)
    clf.enroll("kept", examples(digits, 1))
    snapshot = (run / ENROLLED).read_bytes()
    with pytest.raises(err, match=match):
        clf.enroll("new", make(digits))
    assert (run / ENROLLED).read_bytes() == snapshot and clf.class_names[-1] == "kept"


def test_a_failed_write_leaves_the_old_file_and_the_classifier(run: Path, digits, monkeypatch) -> None:
    clf = SingleLogitClassifier.from_run(run)
    clf.enroll("kept", examples(digits, 1))
    snapshot = (run / ENROLLED).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        clf.enroll("lost", examples(digits, 2))
    monkeypatch.undo()
    assert (run / ENROLLED).read_bytes() == snapshot
    assert clf.class_names[-1] == "kept" and clf.num_classes == 11 and clf.head.k == 11
    assert clf.enrolled.names == ["kept"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert SingleLogitClassifier.from_run(run).class_names[-1] == "kept"


def test_rows_of_another_checkpoint_are_refused(run: Path, digits, tmp_path: Path) -> None:
    SingleLogitClassifier.from_run(run).enroll("kept", examples(digits, 1))
    other = Enrolled("0" * 64, ["x"], torch.zeros(1, 500), torch.zeros(1), [{}])
    enrollment.write_enrolled(tmp_path, other)
    shutil.copy(tmp_path / ENROLLED, run / ENROLLED)
    with pytest.raises(ValueError, match="another checkpoint"):
        SingleLogitClassifier.from_run(run)
    (run / ENROLLED).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a valid enrollment file"):
        load_run(run)
    assert load_run(run, enrolled=False).model.head.k == 10  # the trained classes still load


def test_recalibration_keeps_enrolled_classes_at_the_new_global_threshold(run: Path, digits) -> None:
    SingleLogitClassifier.from_run(run).enroll("threes", examples(digits, 3))
    th = calibrate_run(run, precision=0.9)
    assert len(th.per_class) == 10  # thresholds.json: the trained classes
    clf = SingleLogitClassifier.from_run(run)
    assert clf.threshold_for("threes") == th.global_threshold != pytest.approx(0.0)
    with pytest.raises(ValueError, match="trained classes only"):
        clf.calibrate(*digits.split("valid"))


def test_enroll_needs_thresholds(run: Path, digits) -> None:
    (run / "thresholds.json").unlink()
    with pytest.raises(ValueError, match="calibrate"):
        SingleLogitClassifier.from_run(run).enroll("x", examples(digits, 1))


def test_negatives_are_stored_once_and_tied_to_the_checkpoint(run: Path, digits) -> None:
    clf = SingleLogitClassifier.from_run(run)
    h, y = clf.negatives()
    assert (run / NEGATIVES).is_file() and h.shape == (len(digits.valid_y), 500)
    vx, vy = digits.split("valid")
    torch.testing.assert_close(h, clf.embed(vx))
    assert torch.equal(y, vy)
    stamp = (run / NEGATIVES).stat().st_mtime_ns
    clf.negatives()
    assert (run / NEGATIVES).stat().st_mtime_ns == stamp


def test_index_and_search_see_a_new_class_at_once(run: Path, digits, tmp_path: Path) -> None:
    build_index(run, tmp_path / "index", split="test", progress=False)  # before the enrollment
    clf = SingleLogitClassifier.from_run(run)
    c = clf.enroll("sevens", examples(digits, 7, 10))
    search = ClassSearch.from_run(run, tmp_path / "index")
    assert search.num_classes == 11 and search.class_names[c] == "sevens"
    x, _ = digits.split("test")
    scores = clf.score(x, c).double().numpy()
    t = clf.threshold_for(c)
    result = search.search("sevens", threshold=t)
    near = np.abs(scores - t) < 1e-4  # float32 summation orders differ by ~1e-6; only these may disagree
    assert set(result.ids.tolist()) - set(np.flatnonzero(near)) == set(np.flatnonzero(scores >= t)) - set(
        np.flatnonzero(near))


def test_fingerprint_of_the_trained_rows(run: Path, digits) -> None:
    base = SingleLogitClassifier.from_run(run).head
    clf = SingleLogitClassifier.from_run(run)
    clf.enroll("x", examples(digits, 1))
    assert clf.head.fingerprint(10) == base.fingerprint() != clf.head.fingerprint()
    assert truncate_head(clf.head, 10).fingerprint() == base.fingerprint()
    with pytest.raises(ValueError):
        clf.head.fingerprint(12)


def test_imprint_on_a_cosine_head_is_the_normalised_mean() -> None:
    g = torch.Generator().manual_seed(0)
    head = CosineHead(6, 4, scale=3.0)
    h = torch.randn(5, 6, generator=g)
    w, b = new_row("imprint", head, h, torch.randn(20, 6, generator=g), 0.5)
    acc = torch.zeros(6, dtype=torch.float64)
    for row in h.double():
        acc += row / row.norm()
    assert b is None
    torch.testing.assert_close(w.double(), acc / acc.norm(), rtol=1e-6, atol=1e-6)
    big = extend_head(head, Enrolled("s", ["n"], w[None], None, [{}]))
    torch.testing.assert_close(big.logit(h, 4), 3.0 * torch.nn.functional.cosine_similarity(h, w[None].expand(5, 6)))


def test_fit_puts_the_global_threshold_between_separable_classes() -> None:
    g = torch.Generator().manual_seed(1)
    head = LinearHead(8, 3)
    pos = torch.randn(6, 8, generator=g) + 4 * torch.eye(8)[0]
    neg = torch.randn(300, 8, generator=g)
    t = 1.7
    w, b = new_row("fit", head, pos, neg, t)
    assert ((pos @ w + b) >= t).all() and ((neg @ w + b) < t).float().mean() > 0.97
    wi, bi = new_row("imprint", head, pos, neg, t)
    assert ((pos @ wi + bi) >= t).float().mean() > 0.8  # the bias rule: halfway between positives and negatives
    with pytest.raises(ValueError, match="unknown enrollment rule"):
        new_row("mean", head, pos, neg, t)


def test_cli_enroll_and_classes(run: Path, digits, tmp_path: Path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "new"
    folder.mkdir()
    for i, img in enumerate(examples(digits, 5, 4)):
        Image.fromarray((img.reshape(8, 8).numpy() * 256).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["enroll", str(run), "--name", "fives", "--input", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class"] == 10 and out["examples"] == 4 and out["rule"] == "fit"
    assert main(["classes", str(run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["classes"]
    assert [c["enrolled"] for c in listed] == [False] * 10 + [True] and listed[10]["examples"] == 4
    assert main(["enroll", str(run), "--name", "fives", "--input", str(folder)]) == 2
    assert "exists already" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["enroll", str(run), "--name", "x", "--input", str(empty)]) == 2
    assert main(["classes", str(run), "--remove", "fives"]) == 0
    assert class_list(run)["classes"][-1]["name"] == "9"
    assert enroll_run(run, "again", folder)["class"] == 10


def test_read_enrolled_checks_shapes(tmp_path: Path) -> None:
    e = Enrolled("s", ["a", "b"], torch.zeros(2, 4), torch.zeros(2), [{}, {}])
    enrollment.write_enrolled(tmp_path, e)
    assert read_enrolled(tmp_path, "s", 4, True).names == ["a", "b"]
    with pytest.raises(ValueError, match="weight must be"):
        read_enrolled(tmp_path, "s", 5, True)
    with pytest.raises(ValueError, match="bias must be absent"):
        read_enrolled(tmp_path, "s", 4, False)
