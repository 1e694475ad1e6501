"""Open-set figures (AUROC, FPR@95, OSCR, the global-threshold figures) against references written differently
(scikit-learn, brute-force loops over thresholds in float64), and ``reproduce openset | enroll`` end to end at a tiny
size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from logitsep.cli import main
from logitsep.experiments.openset import OPENSET_KEYS, auroc, fpr_at_tpr, known_classes, openset_metrics, oscr


def data(seed: int, n: int = 300, ties: bool = True):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    if ties:
        s = np.round(s, 1)  # many tied scores
    positive = rng.random(n) < 0.4
    s[positive] += 0.8
    return s, positive


@pytest.mark.parametrize("seed", range(4))
def test_auroc_matches_sklearn(seed: int) -> None:
    s, p = data(seed)
    assert auroc(s, p) == pytest.approx(roc_auc_score(p, s), abs=1e-12)


def brute_fpr95(s: np.ndarray, p: np.ndarray, tpr: float = 0.95) -> float:
    best = None
    for t in sorted(set(s.tolist()), reverse=True):  # the highest threshold reaching the TPR
        if np.mean(s[p] >= t) >= tpr:
            best = t
            break
    return float(np.mean(s[~p] >= best))


def brute_oscr(s: np.ndarray, correct: np.ndarray, known: np.ndarray) -> float:
    points = [(0.0, 0.0)]
    for t in sorted(set(s.tolist()), reverse=True):
        points.append((np.sum(s[~known] >= t) / np.sum(~known), np.sum((s >= t) & known & correct) / np.sum(known)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        area += (x1 - x0) * (y0 + y1) / 2
    return area


@pytest.mark.parametrize("seed", range(4))
def test_fpr95_and_oscr_against_loops(seed: int) -> None:
    s, known = data(seed)
    correct = np.random.default_rng(seed + 10).random(len(s)) < 0.8
    assert fpr_at_tpr(s, known) == pytest.approx(brute_fpr95(s, known), abs=1e-12)
    assert fpr_at_tpr(s, known, 0.5) == pytest.approx(brute_fpr95(s, known, 0.5), abs=1e-12)
    assert fpr_at_tpr(np.array([5.0, 4, 3, 2, 1]), np.array([1, 0, 1, 0, 1], dtype=bool), 0.5) == 0.5
    u, k = data(seed, ties=False)
    assert fpr_at_tpr(u, k) == pytest.approx(brute_fpr95(u, k), abs=1e-12)
    assert oscr(s, correct, known) == pytest.approx(brute_oscr(s, correct, known), abs=1e-12)
    assert oscr(s, np.ones_like(known), known) == pytest.approx(auroc(s, known), abs=1e-12)  # all correct: AUROC


def test_global_threshold_figures_against_loops() -> None:
    rng = np.random.default_rng(3)
    z = np.round(rng.normal(size=(200, 4)), 1)
    y = rng.integers(-1, 4, size=200)
    t = 0.5
    m = openset_metrics(z, y, t)
    rejected = np.mean([all(z[i, c] < t for c in range(4)) for i in range(200) if y[i] < 0])
    recall = np.mean([z[i, y[i]] >= t for i in range(200) if y[i] >= 0])  # a tie at t is accepted
    assert m["rejected_at_global"] == pytest.approx(rejected) and m["known_recall_at_global"] == pytest.approx(recall)
    assert m["auroc"] == pytest.approx(roc_auc_score(y >= 0, z.max(axis=1)))
    soft = openset_metrics(z, y, None, "max_softmax")
    e = np.exp(z - z.max(axis=1, keepdims=True))
    assert soft["auroc"] == pytest.approx(roc_auc_score(y >= 0, (e / e.sum(axis=1, keepdims=True)).max(axis=1)))
    assert soft["rejected_at_global"] is None


def test_known_classes_spec() -> None:
    a = known_classes(6, 10, 5, seed=0)
    assert len(a) == 5 and all(len(k) == 6 and k == sorted(set(k)) for k in a) and len({tuple(k) for k in a}) > 1
    assert a == known_classes("6", 10, 5, seed=0)  # seeded
    assert known_classes("1,3,c", 4, 2, class_names=["a", "b", "c", "d"]) == [[1, 2, 3]] * 2
    assert known_classes("0-3,7", 10, 1) == [[0, 1, 2, 3, 7]] and known_classes("2-2", 10, 1) == [[2]]
    for bad, match in (("10", r"\[1, 9\]"), ("0", r"\[1, 9\]"), ("1,1", "distinct"), ("1,x", "neither"),
                       ("3-1", "a <= b"), ("0-10", "a <= b"), ("0-2,1", "distinct"),
                       ("0,1,2,3,4,5,6,7,8,9", "distinct")):
        with pytest.raises(ValueError, match=match):
            known_classes(bad, 10, 2)


def test_reproduce_openset_and_enroll_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "os"
    assert main(["reproduce", "openset", "--dataset", "digits", "--known", "6", "--splits", "2", "--losses",
                 "ce,batch_ce", "--steps", "60", "--out", str(out), "--json"]) == 0
    doc = json.loads((out / "openset.json").read_text())
    assert isinstance(doc, list)  # a list of rows (DESIGN.md); settings and command in openset_run.json
    rows = {r["loss"]: r for r in doc}
    assert set(rows) == {"ce", "ce (max softmax)", "batch_ce"}
    for r in rows.values():
        assert len(r["per_split"]) == 2
        for key in OPENSET_KEYS:
            vals = [s[key] for s in r["per_split"]]
            assert all(0 <= v <= 1 for v in vals) and r[key] == pytest.approx(np.mean(vals))
    assert json.loads((out / "openset_run.json").read_text())["settings"]["splits"] == 2
    assert rows["batch_ce"]["pols_aligned"] is True and (out / "openset.png").stat().st_size > 1000
    assert "Command:" in (out / "openset.md").read_text()
    out2 = tmp_path / "en"
    assert main(["reproduce", "enroll", "--dataset", "digits", "--known", "0-5", "--shots", "1,5,all",
                 "--draws", "2", "--steps", "60", "--out", str(out2), "--json"]) == 0
    doc = json.loads((out2 / "enroll.json").read_text())
    assert [(r["rule"], r["shots"]) for r in doc["rows"]] == [("imprint", 1), ("imprint", 5), ("imprint", "all"),
                                                              ("fit", 1), ("fit", 5), ("fit", "all")]
    assert doc["rows"][2]["draws"] == 1 and doc["rows"][2]["auprc_sd"] is None
    assert doc["settings"]["enrolled"] == [6, 7, 8, 9]
    # the trained classes' rows are untouched: their per-class AUPRC is the same in every row
    assert len({round(r["old_auprc"], 12) for r in doc["rows"]}) == 1
    assert doc["rows"][0]["old_auprc"] == pytest.approx(doc["old_before"]["auprc"])


def test_reproduce_openset_needs_known(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["reproduce", "openset", "--dataset", "digits", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["reproduce", "openset", "--dataset", "digits", "--known", "6", "--lrs", "0.1,0.01", "--out",
              str(tmp_path)])
