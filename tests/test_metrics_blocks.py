"""Metrics and calibration read a block of classes at a time (``slc_metrics_blocked``, ``calibrate_blocked``):
the very results of the in-memory ``slc_metrics`` / ``calibrate_scores`` (compared with ``==``, not a
tolerance), on integer-valued scores whose ties cross blocks and join positives and negatives; the pooled values
against brute-force pair loops and scikit-learn; the classifier and the commands on the block path."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from logitsep.classifier import SingleLogitClassifier
from logitsep.cli import main
from logitsep.core.blocks import ScoreBlocks, default_block_size
from logitsep.core.ranking import PooledCounts
from logitsep.heads import CosineHead, LinearHead
from logitsep.metrics import all_logits_blocks, all_logits_scores, slc_metrics, slc_metrics_blocked
from logitsep.models import SLCModel
from logitsep.thresholds import _most_taken, calibrate_blocked, calibrate_scores
from logitsep.train import evaluate_blocked

RECALLS = (0.5, 0.9, 0.99)


# ----------------------------------------------------------------------------------------------- helpers


def blocks_of(x: np.ndarray, calls: list | None = None):
    """``score_block`` of a matrix held in memory (recording the calls in ``calls``)."""
    def score_block(start: int, stop: int) -> np.ndarray:
        if calls is not None:
            calls.append((start, stop))
        return x[:, start:stop]
    return score_block


def assert_identical(got: dict, want: dict) -> None:
    """Same keys, same values: floats equal (NaN where NaN), per-class arrays equal element by element."""
    assert list(got) == list(want)
    for key, value in want.items():
        if key == "per_class":
            assert list(got[key]) == list(value)
            for name, array in value.items():
                assert got[key][name].dtype == array.dtype, name
                np.testing.assert_array_equal(got[key][name], array, err_msg=name)  # NaN == NaN here
        elif isinstance(value, float) and math.isnan(value):
            assert isinstance(got[key], float) and math.isnan(got[key]), key
        else:
            assert type(got[key]) is type(value) and got[key] == value, (key, got[key], value)


def tied_scores(rng: np.random.Generator, n: int, k: int, y: np.ndarray, levels: int, dtype) -> np.ndarray:
    """Small integers (every value shared by many scores, in every block), the true class a little higher."""
    x = rng.integers(-levels, levels + 1, size=(n, k)) + (np.arange(k) == y[:, None]) * rng.integers(0, 3, (n, 1))
    return x.astype(dtype)


def brute_pooled(x: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """Pooled AUROC by looping over every (positive, negative) pair in float64; pooled AP from scikit-learn."""
    pos = x[positive].astype(np.float64).tolist()
    neg = x[~positive].astype(np.float64).tolist()
    wins = 0.0
    for p in pos:
        for q in neg:
            wins += 1.0 if p > q else 0.5 if p == q else 0.0
    return wins / (len(pos) * len(neg)), float(average_precision_score(positive.ravel(), x.ravel()))


# ------------------------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_size", [1, 4, 7, 37, 60, None])
def test_blocked_metrics_equal_the_in_memory_ones(dtype, block_size) -> None:
    """Block sizes 1, non-divisors of k = 37, k and more, the default; three classes without positives; heavy
    ties (7 distinct values) across blocks and between positives and negatives."""
    rng = np.random.default_rng(0)
    n, k = 240, 37
    y = rng.integers(0, k - 3, size=n)
    x = tied_scores(rng, n, k, y, 3, dtype)
    want = slc_metrics(x, y, per_class=True, recall_levels=RECALLS)
    calls: list = []
    got = slc_metrics_blocked(blocks_of(x, calls), k, y, block_size=block_size, per_class=True,
                              recall_levels=RECALLS, progress=False)
    assert_identical(got, want)
    size = block_size or default_block_size(n)
    ranges = [(a, min(a + size, k)) for a in range(0, k, size)]
    assert calls == ranges + ranges  # every block once per pass, in order, covering every class once
    assert all(math.isnan(v) for v in got["per_class"]["auprc"][k - 3:])


def test_blocked_metrics_brute_force_pooled_values() -> None:
    rng = np.random.default_rng(1)
    n, k = 60, 9
    y = rng.integers(0, k, size=n)
    x = tied_scores(rng, n, k, y, 2, np.float64)
    positive = np.arange(k) == y[:, None]
    auroc, auprc = brute_pooled(x, positive)
    for size in (1, 2, 4, 9):
        got = slc_metrics_blocked(blocks_of(x), k, y, block_size=size, progress=False)
        assert got["pooled_auroc"] == pytest.approx(auroc, abs=1e-12)
        assert got["pooled_auprc"] == pytest.approx(auprc, abs=1e-12)


@pytest.mark.parametrize("block_size", [1, 3, 5, 30])
def test_blocked_metrics_multilabel(block_size) -> None:
    rng = np.random.default_rng(2)
    n, k = 80, 13
    labels = rng.random((n, k)) < 0.25
    labels[:, 3] = False  # no positives
    labels[:, 4] = True  # only positives
    x = np.round(rng.standard_normal((n, k)) + labels, 1).astype(np.float32)
    for target in (labels, labels.astype(np.int64), torch.from_numpy(labels)):
        got = slc_metrics_blocked(blocks_of(x), k, target, block_size=block_size, per_class=True)
        assert_identical(got, slc_metrics(x, labels, per_class=True))
        assert got["accuracy"] is None
    auroc, auprc = brute_pooled(x, labels)
    assert got["pooled_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert got["pooled_auprc"] == pytest.approx(auprc, abs=1e-12)
    nothing = np.zeros((n, k), dtype=bool)  # no positive at all: NaN, as in memory
    assert_identical(slc_metrics_blocked(blocks_of(x), k, nothing, block_size=4), slc_metrics(x, nothing))


def test_accuracy_ties_across_blocks_take_the_first_class() -> None:
    """The row maximum shared by classes in different blocks: np.argmax's first index, not the last block's."""
    x = np.zeros((4, 6), dtype=np.float32)
    x[0, [1, 4]] = 5  # tie across blocks {0,1}, {2,3}, {4,5}: class 1
    x[1, [4, 5]] = 5  # tie inside the last block: class 4
    x[2, :] = -np.inf  # every score -inf: class 0
    x[3, [0, 5]] = [1, 2]
    for y, accuracy in ((np.array([1, 4, 0, 5]), 1.0), (np.array([4, 5, 1, 0]), 0.0)):
        for size in (1, 2, 4, 6):
            got = slc_metrics_blocked(blocks_of(x), 6, y, block_size=size)
            assert got["accuracy"] == accuracy == slc_metrics(x, y)["accuracy"]


def test_torch_blocks_and_mixed_layouts() -> None:
    """Blocks as torch tensors (float16 upcast exactly, as ``check_scores`` does) or non-contiguous arrays."""
    rng = np.random.default_rng(3)
    n, k = 50, 11
    y = rng.integers(0, k, size=n)
    x = tied_scores(rng, n, k, y, 4, np.float32)
    want = slc_metrics(x, y, per_class=True)
    t = torch.from_numpy(x)
    assert_identical(slc_metrics_blocked(lambda a, b: t[:, a:b], k, torch.from_numpy(y), block_size=3,
                                         per_class=True), want)
    assert_identical(slc_metrics_blocked(lambda a, b: t[:, a:b].half(), k, y, block_size=4, per_class=True),
                     slc_metrics(t.half(), y, per_class=True))
    fortran = np.asfortranarray(x)
    assert_identical(slc_metrics_blocked(blocks_of(fortran), k, y, block_size=5, per_class=True), want)


def test_blocked_metrics_bad_inputs() -> None:
    x = np.zeros((5, 4), dtype=np.float32)
    y = np.array([0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"must return \[5, 2\]"):
        slc_metrics_blocked(lambda a, b: x[:, :1], 4, y, block_size=2)
    with pytest.raises(ValueError, match="NaN"):
        slc_metrics_blocked(lambda a, b: np.full((5, b - a), np.nan), 4, y)
    with pytest.raises(TypeError, match="floating-point"):
        slc_metrics_blocked(lambda a, b: np.zeros((5, b - a), dtype=np.int64), 4, y)
    with pytest.raises(ValueError, match="block_size"):
        slc_metrics_blocked(blocks_of(x), 4, y, block_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        slc_metrics_blocked(blocks_of(x), 0, y)
    with pytest.raises(TypeError, match="score_block must be a function"):
        slc_metrics_blocked(x, 4, y)
    with pytest.raises(ValueError, match=r"target values must be in \[0, 3\)"):
        slc_metrics_blocked(blocks_of(x), 3, y)
    with pytest.raises(ValueError, match="multi-label target must have the scores' shape"):
        slc_metrics_blocked(blocks_of(x), 3, np.zeros((5, 4), dtype=bool))
    state = {"calls": 0}

    def changing(a: int, b: int) -> np.ndarray:  # another value on the second pass
        state["calls"] += 1
        return np.full((5, b - a), float(state["calls"] > 2), dtype=np.float32)
    with pytest.raises(ValueError, match="must return the same values"):
        slc_metrics_blocked(changing, 4, y, block_size=2)


def test_pooled_counts_equal_a_sort_of_everything() -> None:
    rng = np.random.default_rng(4)
    items = rng.integers(-5, 6, size=3000).astype(np.float64)
    items[:3] = [np.inf, -np.inf, -0.0]
    positives = np.concatenate([items[rng.integers(0, 3000, 40)], [0.0, 7.5, -9.0]])
    counts = PooledCounts(positives)
    for chunk in np.array_split(np.concatenate([items, positives]), 7):
        counts.add(chunk.reshape(-1, 1) if len(chunk) % 2 else chunk)
    everything = np.sort(np.concatenate([items, positives]))
    below, upto = counts.counts()
    np.testing.assert_array_equal(counts.positives, np.sort(positives))
    np.testing.assert_array_equal(below, np.searchsorted(everything, counts.positives, side="left"))
    np.testing.assert_array_equal(upto, np.searchsorted(everything, counts.positives, side="right"))
    assert counts.total == everything.size


def test_all_logits_blocks_match_the_softmax() -> None:
    rng = np.random.default_rng(5)
    n, k = 70, 23
    y = rng.integers(0, k, size=n)
    z = rng.standard_normal((n, k)).astype(np.float32) * 4
    softmax = all_logits_blocks(blocks_of(z), k, n, block_size=5)
    blocked = np.concatenate([softmax(a, min(a + 6, k)) for a in range(0, k, 6)], axis=1)
    np.testing.assert_allclose(blocked, all_logits_scores(z), rtol=1e-13, atol=0)
    got = slc_metrics_blocked(softmax, k, y, block_size=6)
    want = slc_metrics(all_logits_scores(z), y)
    assert {key: pytest.approx(value, abs=1e-12) for key, value in want.items()} == got
    with pytest.raises(ValueError, match="infinite"):
        all_logits_blocks(lambda a, b: np.full((n, b - a), np.inf), k, n)


def test_score_blocks_ranges_and_checks() -> None:
    blocks = ScoreBlocks(lambda a, b: np.zeros((3, b - a)), 10, 3, block_size=4)
    assert blocks.ranges == [(0, 4), (4, 8), (8, 10)]
    assert [(a, b, x.shape) for a, b, x in blocks.scan("test")] == [(0, 4, (3, 4)), (4, 8, (3, 4)), (8, 10, (3, 2))]
    assert default_block_size(10) == 2**22 // 10 and default_block_size(10**8) == 1


# ---------------------------------------------------------------------------------------------- calibration


def thresholds_json(th) -> str:
    return json.dumps(th.to_dict())  # NaN recalls compare as text


def calibrations(x: np.ndarray, target: np.ndarray, kw: dict, block_size: int, names=None) -> tuple[str, str, int]:
    calls: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 recall of a ranking without positives, in both
        want = calibrate_scores(x, target, class_names=names, **kw)
        got = calibrate_blocked(blocks_of(x, calls), x.shape[1], target, class_names=names, block_size=block_size,
                                progress=False, **kw)
    passes = len(calls) // len(range(0, x.shape[1], block_size))
    return thresholds_json(got), thresholds_json(want), passes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_calibration_equals_calibrate_scores(dtype) -> None:
    """Random small cases with ties, precision and recall targets, every block size, single- and multi-label:
    the same thresholds.json, to the bit; the third pass (the global threshold below a positive score) runs."""
    rng = np.random.default_rng(6)
    passes_seen = set()
    for case in range(120):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 10))
        y = rng.integers(0, k, size=n)
        x = tied_scores(rng, n, k, y, int(rng.integers(1, 6)), dtype)
        target = rng.random((n, k)) < 0.3 if case % 4 == 0 else y
        block_size = int(rng.integers(1, k + 2))
        for kw in ({"precision": float(rng.choice([0.1, 0.3, 0.5, 0.8, 0.99, 1.0]))},
                   {"recall": float(rng.choice([0.2, 0.5, 0.9, 1.0]))}):
            got, want, passes = calibrations(x, target, kw, block_size)
            assert got == want, (case, kw, block_size)
            passes_seen.add(passes)
    assert passes_seen == {2, 3}


def test_blocked_calibration_global_threshold_at_a_negative_score() -> None:
    """Pooled ranking 10(P) 9 8 6(P) 5 4 3 2(P) 1 0.5 -1(P) -2: precision 0.4 is last reached at the negative 5,
    between the positive scores 6 and 2 (third pass); 0.35 at the positive -1 (two passes); 0.3 at the lowest
    score (third pass, everything taken)."""
    x = np.array([[10, 9, 1], [8, 6, 0.5], [5, 4, 2], [-1, 3, -2]], dtype=np.float32)
    y = np.array([0, 1, 2, 0])
    # and 10(P) 9(P) 8 7 6 5 1(P) 0 -1: precision 0.5 takes two negatives below 9, down to 7
    x2 = np.array([[10, 8, 7], [6, 9, 5], [0, -1, 1]], dtype=np.float64)
    y2 = np.array([0, 1, 2])
    for scores, target, precision, threshold, passes in (
            (x, y, 0.4, 5.0, 3), (x, y, 0.35, -1.0, 2), (x, y, 0.3, -2.0, 3), (x, y, 0.45, 6.0, 2),
            (x, y, 0.33, -2.0, 3), (x, y, 1.0, 10.0, 2),
            (x2, y2, 0.5, 7.0, 3), (x2, y2, 0.4, 1.0, 2), (x2, y2, 0.6, 8.0, 3), (x2, y2, 0.3, -1.0, 3)):
        for block_size in (1, 2, 3):
            got, want, seen = calibrations(scores, target, {"precision": precision}, block_size)
            assert got == want, precision
            assert json.loads(got)["global"]["threshold"] == threshold and seen == passes, precision


def test_most_taken_is_the_float64_rule() -> None:
    """The most pairs a threshold may take at ``tp`` positives: the largest t with ``tp / t >= p``, by brute force
    (int(tp / p) alone is one short where the division rounds down)."""
    for tp in range(1, 120):
        for p in (0.3, 0.1, 0.7, 0.35, 0.9, 0.99, 1.0, 1 / 3, 2 / 7, 0.01, 0.07, 0.14, 0.28, 0.17):
            t = 1
            while tp / (t + 1) >= p:
                t += 1
            assert _most_taken(tp, p) == t, (tp, p)


def test_blocked_calibration_unreachable_and_without_positives() -> None:
    x = np.array([[1.0, 3.0], [2.0, 3.0], [0.5, 3.0]], dtype=np.float32)
    y = np.array([0, 0, 0])  # class 1 has no positives, and its scores are the highest
    got, want, _ = calibrations(x, y, {"precision": 1.0}, 1, names=["a", "b"])
    assert got == want
    obj = json.loads(got)
    assert obj["global"]["source"] == "unreachable" and obj["classes"][1]["source"] == "global"
    assert obj["classes"][1]["name"] == "b"
    nothing = np.zeros((3, 2), dtype=bool)
    for kw in ({"precision": 0.5}, {"recall": 0.5}):
        got, want, _ = calibrations(x, nothing, kw, 1)
        assert got == want


def test_blocked_calibration_bad_inputs() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="not both"):
        calibrate_blocked(blocks_of(x), 3, np.arange(3), precision=0.9, recall=0.9)
    with pytest.raises(ValueError, match="y must be"):
        calibrate_blocked(blocks_of(x), 3, np.zeros((4, 3, 1), dtype=int))
    with pytest.raises(ValueError, match=r"must return \[3, 1\]"):
        calibrate_blocked(blocks_of(x), 3, np.arange(3), block_size=1)
    with pytest.raises(ValueError, match="num_classes"):
        calibrate_blocked(blocks_of(x), -1, np.arange(4))


# ------------------------------------------------------------------------------------------ heads, classifier


@pytest.mark.parametrize("head", [LinearHead(6, 9), CosineHead(6, 9, scale=3.0)])
def test_logit_columns_of_a_block_are_those_of_all(head) -> None:
    torch.manual_seed(0)
    h = torch.randn(20, 6)
    full = head.logit_columns(h)
    assert torch.equal(head.logit_columns(h, range(2, 7)), full[:, 2:7])
    assert torch.equal(head.logit_columns(h, torch.tensor([8, 0])), full[:, [8, 0]])


def integer_model(k: int = 7, d: int = 5, seed: int = 0) -> tuple[SLCModel, torch.Tensor, torch.Tensor]:
    """A linear head on the inputs with small integer weights: every logit is an exact small integer, whatever
    the summation order, so the block path's ``head.logits`` equals ``model(x)`` to the bit and ties abound."""
    g = torch.Generator().manual_seed(seed)
    head = LinearHead(d, k)
    with torch.no_grad():
        head.weight.copy_(torch.randint(-2, 3, (k, d), generator=g).float())
        head.bias.copy_(torch.randint(-1, 2, (k,), generator=g).float())
    x = torch.randint(-2, 3, (90, d), generator=g).float()
    y = torch.randint(0, k - 1, (90,), generator=g)
    return SLCModel(torch.nn.Identity(), head), x, y


def test_classifier_calibrates_in_blocks_to_the_same_thresholds(device) -> None:
    model, x, y = integer_model()
    clf = SingleLogitClassifier(model, (5,), device=device)
    h = clf.embed(x)
    blocks = clf.score_blocks(h)
    assert torch.equal(torch.cat([blocks(0, 3), blocks(3, 7)], dim=1), clf.all_scores(h).float().cpu())
    # random float weights: the blocks are logit(h, c)'s values to the bit (a matrix product's are not)
    torch.manual_seed(0)
    float_clf = SingleLogitClassifier(SLCModel(torch.nn.Identity(), LinearHead(64, 40)), (64,), device=device)
    h64 = torch.randn(300, 64)
    assert torch.equal(float_clf.score_blocks(h64)(5, 29), float_clf.all_scores(h64).float().cpu()[:, 5:29])
    for kw in ({"precision": 0.6}, {"recall": 0.9}):
        want = clf.calibrate(x, y, **kw).to_dict()
        for block_size in (1, 3, 7):
            assert clf.calibrate(x, y, **kw, block_size=block_size, progress=False).to_dict() == want


def test_evaluate_blocked_equals_the_metrics_of_the_scores(device) -> None:
    model, x, y = integer_model()
    with torch.no_grad():
        scores = model(x)
    model.to(device)
    want = slc_metrics(scores, y)
    all_logits = slc_metrics(all_logits_scores(scores * 2.5), y)
    for block_size in (1, 2, 7):
        got = evaluate_blocked(model, x, y, device=device, softmax_scale=2.5, block_size=block_size, progress=False)
        assert {key: got[key] for key in want} == want  # exact: integer logits
        assert got["all_logits"] == {key: pytest.approx(value, abs=1e-12) for key, value in all_logits.items()}


def test_evaluate_blocked_of_a_cosine_head_scores_its_cosines() -> None:
    """``head.outputs`` are ``forward``'s columns (cosines, not ``scale·cos``): a scale-3 cosine head evaluates
    as ``model(x)`` does, the all-logits softmax of ``softmax_scale·cos`` included."""
    torch.manual_seed(1)
    head = CosineHead(6, 12, scale=3.0)
    model = SLCModel(torch.nn.Identity(), head)
    x, y = torch.randn(150, 6), torch.randint(0, 12, (150,))
    with torch.no_grad():
        torch.testing.assert_close(head.outputs(x, range(3, 9)), model(x)[:, 3:9], rtol=0, atol=1e-6)
        assert torch.equal(head.logits(x, range(3, 9)), 3.0 * head.outputs(x, range(3, 9)))
        scores = model(x)
    want = slc_metrics(scores, y)
    all_logits = slc_metrics(all_logits_scores(scores * 5.0), y)
    got = evaluate_blocked(model, x, y, softmax_scale=5.0, block_size=5, progress=False)
    assert {key: got[key] for key in want} == {key: pytest.approx(v, abs=1e-6) for key, v in want.items()}
    assert got["all_logits"] == {key: pytest.approx(value, abs=1e-6) for key, value in all_logits.items()}


def test_commands_with_block_size_print_the_same_results(tmp_path: Path, capsys, monkeypatch) -> None:
    """``calibrate`` and ``evaluate`` take the block path with ``--block-size`` (and only then, at this size) and
    print what the in-memory path prints: the same thresholds, the same metrics up to float rounding."""
    import logitsep.classifier as classifier
    import logitsep.train as train_module
    from logitsep.data import load_dataset
    from logitsep.train import TrainConfig, train

    digits = load_dataset("digits")
    run = tmp_path / "run"
    train(TrainConfig(dataset="digits", loss="batch_ce", steps=5, lr=0.1, batch_size=32), data=digits, out=run,
          progress=False, eval_splits=())
    used = []

    def spy_on(module, name: str):
        real = getattr(module, name)

        def spy(*args, **kwargs):
            used.append((name, kwargs["block_size"]))
            return real(*args, **kwargs)
        return spy
    monkeypatch.setattr(classifier, "calibrate_blocked", spy_on(classifier, "calibrate_blocked"))
    monkeypatch.setattr(train_module, "evaluate_blocked", spy_on(train_module, "evaluate_blocked"))
    outputs = {}
    for extra in ([], ["--block-size", "3"], ["--block-size", "10"]):
        assert main(["calibrate", str(run), "--precision", "0.9", "--json", *extra]) == 0
        outputs.setdefault("calibrate", []).append(json.loads(capsys.readouterr().out))
        assert main(["evaluate", str(run), "--json", *extra]) == 0
        outputs.setdefault("evaluate", []).append(json.loads(capsys.readouterr().out))
    first, *rest = outputs["calibrate"]
    assert all(other == first for other in rest)  # thresholds: the same to the bit
    first, *rest = outputs["evaluate"]
    for other in rest:  # block scores are model(x)'s up to float rounding
        assert other.keys() == first.keys()
        for key in ("auprc", "precision@0.9", "precision@0.99", "pooled_auprc", "pooled_auroc", "accuracy"):
            assert other[key] == pytest.approx(first[key], abs=1e-6), key
            assert other["all_logits"][key] == pytest.approx(first["all_logits"][key], abs=1e-6), key
    assert used == [("calibrate_blocked", 3), ("evaluate_blocked", 3), ("calibrate_blocked", 10),
                    ("evaluate_blocked", 10)]
    with pytest.raises(SystemExit):
        main(["evaluate", str(run), "--block-size", "0"])
    assert "positive number of classes" in capsys.readouterr().err


def test_training_evaluates_and_calibrates_in_blocks_above_the_bound(monkeypatch, tmp_path) -> None:
    """train() switches to class blocks when n·k is large; the metrics and thresholds are those of the in-memory
    path (thresholds to the bit: both read logit_columns)."""
    import json

    import logitsep.train as train_module
    from logitsep.data import load_dataset
    from logitsep.train import TrainConfig, train

    data = load_dataset("digits")
    config = TrainConfig(dataset="digits", loss="bce", steps=20, lr=0.1, batch_size=32)
    train(config, data=data, out=tmp_path / "memory", progress=False)
    import logitsep.core.blocks as blocks_module

    monkeypatch.setattr(blocks_module, "BLOCKS_ABOVE", 0)
    blocks_used = []
    monkeypatch.setattr(train_module, "calibrate_blocked",
                        lambda *a, **kw: blocks_used.append(1) or calibrate_blocked(*a, **kw))
    train(config, data=data, out=tmp_path / "blocks", progress=False)
    assert blocks_used
    a = json.loads((tmp_path / "memory" / "metrics.json").read_text())["test"]
    b = json.loads((tmp_path / "blocks" / "metrics.json").read_text())["test"]
    for key in ("auprc", "precision@0.9", "pooled_auprc", "pooled_auroc", "accuracy"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert ((tmp_path / "memory" / "thresholds.json").read_text()
            == (tmp_path / "blocks" / "thresholds.json").read_text())
