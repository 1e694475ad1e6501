"""SLC metrics against scikit-learn and brute-force references (slow, obvious loops live here, not in the
package). Keren, Sabato & Schuller, ICDM 2018, Section VI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from logitsep.core.ranking import recall_position
from logitsep.metrics import (
    METRIC_KEYS,
    _per_class,
    _use_dense,
    all_logits_scores,
    contiguous_transpose,
    mean_relative_improvement,
    one_minus,
    per_class_metrics,
    slc_metrics,
)

RECALLS = (0.9, 0.99)


# ---------------------------------------------------------------------------------------------- references

def brute_precision_at_recall(labels: np.ndarray, scores: np.ndarray, r: float) -> float:
    """Walk the distinct thresholds from the highest down; the first whose recall reaches r gives the answer."""
    positives = labels.sum()
    for threshold in sorted(set(scores.tolist()), reverse=True):
        selected = scores >= threshold
        tp = int((labels & selected).sum())
        if tp / positives >= r:
            return tp / int(selected.sum())
    raise AssertionError("recall never reached r")


def sklearn_precision_at_recall(labels: np.ndarray, scores: np.ndarray, r: float) -> float:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    ok = np.nonzero(recall[: len(thresholds)] >= r)[0]  # thresholds ascending: the last index is the highest
    return float(precision[ok.max()])


def reference(scores: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Everything slc_metrics returns, from scikit-learn (AP, AUROC) and brute-force loops (precision@r).
    ``labels`` is the [n, k] boolean matrix of positives."""
    k = scores.shape[1]
    per = {"auprc": np.full(k, np.nan), **{f"precision@{r:g}": np.full(k, np.nan) for r in RECALLS}}
    for c in range(k):
        y, s = labels[:, c], scores[:, c]
        if not y.any():
            continue
        per["auprc"][c] = average_precision_score(y, s)
        for r in RECALLS:
            brute = brute_precision_at_recall(y, s, r)
            assert brute == pytest.approx(sklearn_precision_at_recall(y, s, r), abs=1e-12)
            per[f"precision@{r:g}"][c] = brute
    out: dict[str, object] = {key: float(np.nanmean(v)) for key, v in per.items()}
    out["pooled_auprc"] = average_precision_score(labels.ravel(), scores.ravel())
    out["pooled_auroc"] = roc_auc_score(labels.ravel(), scores.ravel())
    out["per_class"] = per
    return out


def assert_matches(result: dict, ref: dict, tol: float = 1e-10) -> None:
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(ref[key], abs=tol), key
    if "per_class" in result:
        for key, expected in ref["per_class"].items():
            np.testing.assert_allclose(result["per_class"][key], expected, atol=tol, equal_nan=True, err_msg=key)


def one_hot(y: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=bool)[y]


# ----------------------------------------------------------------------------------------- agreement tests

@pytest.mark.parametrize("decimals", [None, 1, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_single_label_matches_references(seed: int, decimals: int | None) -> None:
    """Random scores, with heavy ties when rounded; the last class never occurs (NaN, left out of means).
    n * k is above one transpose tile, so the tiled transpose is exercised."""
    rng = np.random.default_rng(seed)
    n, k = 600, 40
    y = rng.integers(0, k - 1, size=n)
    scores = rng.standard_normal((n, k)) + 1.5 * one_hot(y, k)  # informative but far from separable
    if decimals is not None:
        scores = np.round(scores, decimals)
    result = slc_metrics(scores, y, per_class=True)
    ref = reference(scores, one_hot(y, k))
    assert_matches(result, ref)
    assert math.isnan(result["per_class"]["auprc"][k - 1])
    np.testing.assert_array_equal(result["per_class"]["num_positives"], np.bincount(y, minlength=k))
    assert result["accuracy"] == pytest.approx(np.mean(np.argmax(scores, axis=1) == y))


def test_float32_and_layouts_match_references() -> None:
    rng = np.random.default_rng(5)
    n, k = 400, 70
    y = rng.integers(0, k, size=n)
    scores = np.round(rng.standard_normal((n, k)) + one_hot(y, k), 2).astype(np.float32)
    ref = reference(scores, one_hot(y, k))
    for layout in (scores, np.asfortranarray(scores), scores.T.copy().T, np.float16(scores)):
        expected = ref if layout.dtype != np.float16 else reference(layout.astype(np.float32), one_hot(y, k))
        assert_matches(slc_metrics(layout, y, per_class=True), expected)


def test_multilabel_matches_references() -> None:
    rng = np.random.default_rng(2)
    n, k = 300, 25
    labels = rng.random((n, k)) < 0.3
    labels[:, 3] = False  # a class without positives
    labels[:, 4] = True  # a class with only positives
    scores = np.round(rng.standard_normal((n, k)) + labels, 1)
    for target in (labels, labels.astype(np.int64), labels.astype(np.float32), torch.from_numpy(labels)):
        result = slc_metrics(scores, target, per_class=True)
        assert_matches(result, reference(scores, labels))
        assert result["accuracy"] is None
        assert math.isnan(result["per_class"]["auprc"][3])
        assert result["per_class"]["auprc"][4] == 1.0


def test_single_label_equals_its_one_hot_multilabel() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, size=200)
    scores = rng.standard_normal((200, 6))
    a, b = slc_metrics(scores, y), slc_metrics(scores, one_hot(y, 6))
    assert {key: a[key] for key in METRIC_KEYS} == {key: b[key] for key in METRIC_KEYS}


@pytest.mark.parametrize("dense", [False, True])
def test_sparse_and_dense_paths_match_references(dense: bool) -> None:
    """Both per-class algorithms (binary search of the positives / argsort of the columns), forced, on
    single-label and on sparse and dense multi-label targets with ties."""
    rng = np.random.default_rng(14)
    n, k = 250, 15
    y = rng.integers(0, k - 2, size=n)
    cases = [(y, None, one_hot(y, k))]
    for density in (0.02, 0.4):
        labels = rng.random((n, k)) < density
        cases.append((None, labels, labels))
    for target_y, target_labels, positives in cases:
        scores = np.round(rng.standard_normal((n, k)) + positives, 1)
        got = _per_class(scores, target_y, target_labels, RECALLS, dense=dense)
        expected = reference(scores, positives)["per_class"]
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, atol=1e-12, equal_nan=True, err_msg=key)


def test_path_selection() -> None:
    assert not _use_dense(10_000, 10_000, 1_000)  # single-label, many classes: binary search
    assert _use_dense(10_000, 10_000, 5)  # single-label, few classes: argsort
    assert _use_dense(5_000_000, 10_000, 1_000)  # dense multi-label


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_input(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    n, k = 300, 12
    y = torch.randint(0, k, (n,), generator=gen)
    logits = (torch.randn(n, k, generator=gen) + 2 * torch.nn.functional.one_hot(y, k)).to(dtype)
    logits.requires_grad_(dtype.is_floating_point)
    result = slc_metrics(logits, y, per_class=True)
    as_numpy = logits.detach().double().numpy()  # exact for every dtype; half precision has many ties
    assert_matches(result, reference(as_numpy, one_hot(y.numpy(), k)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_input() -> None:
    gen = torch.Generator().manual_seed(8)
    y = torch.randint(0, 9, (500,), generator=gen)
    logits = torch.randn(500, 9, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        on_cpu = slc_metrics(logits.to(dtype), y, per_class=True)
        on_gpu = slc_metrics(logits.to(dtype).cuda(), y.cuda(), per_class=True)
        assert {key: on_gpu[key] for key in METRIC_KEYS} == {key: on_cpu[key] for key in METRIC_KEYS}
        np.testing.assert_array_equal(on_gpu["per_class"]["auprc"], on_cpu["per_class"]["auprc"])
    on_gpu_multilabel = slc_metrics(logits.cuda(), torch.nn.functional.one_hot(y, 9).cuda())
    assert on_gpu_multilabel["pooled_auroc"] == slc_metrics(logits, y)["pooled_auroc"]


# ----------------------------------------------------------------------------------------- exact values

def test_hand_computed_values() -> None:
    """Column 0: scores .9 .8 .7 .6 .5, positives .9 and .7 -> AP = (1/1 + 2/3) / 2.
    Column 1: scores .1 .8 .2 .8 .4, positives .8 .8 .4 (the two .8 enter together) -> AP = 1."""
    scores = np.array([[0.9, 0.1], [0.8, 0.8], [0.7, 0.2], [0.6, 0.8], [0.5, 0.4]])
    target = np.array([0, 1, 0, 1, 1])
    result = slc_metrics(scores, target, per_class=True)
    ap0 = (1 / 1 + 2 / 3) / 2
    # column 1: threshold .8 selects 2 rows, both positive (recall 2/3); .4 selects 3 of 3 (recall 1)
    ap1 = (2 / 3) * (2 / 2) + (1 / 3) * (3 / 3)
    np.testing.assert_allclose(result["per_class"]["auprc"], [ap0, ap1])
    # recall 0.9 needs every positive: column 0 -> threshold .7 (2 of 3 selected), column 1 -> .4 (3 of 3)
    np.testing.assert_allclose(result["per_class"]["precision@0.9"], [2 / 3, 1.0])
    assert result["auprc"] == pytest.approx((ap0 + ap1) / 2)
    # pooled: positives .9 .8 .8 .7 .4 among 10 scores; negatives .8 .6 .5 .2 .1
    # AUROC: .9 beats 5; .8 beats 4 ties 1 (twice); .7 beats 4; .4 beats 2 -> (5 + 4.5 + 4.5 + 4 + 2) / 25
    assert result["pooled_auroc"] == pytest.approx(20 / 25)
    # AP: thresholds .9 (1/1), .8 (3/4: two positives), .7 (4/5), .4 (5/8)
    assert result["pooled_auprc"] == pytest.approx((1 + 2 * 3 / 4 + 4 / 5 + 5 / 8) / 5)
    assert result["accuracy"] == pytest.approx(3 / 5)  # row 1 ties .8/.8 -> argmax 0, wrong; row 4 wrong


def test_perfect_separation_gives_exactly_one() -> None:
    """Every true logit above every false logit (the PoLS holds): all metrics are exactly 1."""
    rng = np.random.default_rng(4)
    n, k = 500, 30
    y = rng.integers(0, k, size=n)
    scores = rng.uniform(-5, 0, size=(n, k))
    scores[np.arange(n), y] = rng.uniform(0.5, 3, size=n)
    result = slc_metrics(scores, y, per_class=True)
    for key in METRIC_KEYS:
        assert result[key] == 1.0, key
    assert result["accuracy"] == 1.0
    ref = reference(scores, one_hot(y, k))
    assert ref["pooled_auprc"] == 1.0 and ref["pooled_auroc"] == 1.0


def test_within_example_order_is_not_enough() -> None:
    """Correct argmax in every row (accuracy 1, per-class AP below 1 though) but true logits below false
    logits of other rows: the pooled AUROC sees the PoLS violation."""
    y = np.array([0, 1, 0, 1])
    scores = np.array([[10.0, 9.0], [0.0, 1.0], [11.0, 10.5], [2.0, 3.0]])
    result = slc_metrics(scores, y)
    assert result["accuracy"] == 1.0
    ref = reference(scores, one_hot(y, 2))
    assert result["pooled_auroc"] == pytest.approx(ref["pooled_auroc"]) and result["pooled_auroc"] < 0.75
    assert result["auprc"] == pytest.approx(ref["auprc"]) and result["auprc"] < 1


def test_reversed_ranking() -> None:
    rng = np.random.default_rng(6)
    n, k = 300, 8
    y = rng.integers(0, k, size=n)
    scores = rng.uniform(0, 1, size=(n, k))
    scores[np.arange(n), y] = rng.uniform(-2, -1, size=n)
    result = slc_metrics(scores, y, per_class=True)
    assert result["pooled_auroc"] == 0.0
    assert result["accuracy"] == 0.0
    assert_matches(result, reference(scores, one_hot(y, k)))


def test_all_scores_tied() -> None:
    y = np.array([0, 0, 1, 2, 2, 2])
    result = slc_metrics(np.zeros((6, 4)), y, per_class=True)
    np.testing.assert_allclose(result["per_class"]["auprc"], [2 / 6, 1 / 6, 3 / 6, np.nan])
    assert result["pooled_auroc"] == 0.5
    assert result["pooled_auprc"] == pytest.approx(6 / 24)


def test_no_positives_at_all_gives_nan() -> None:
    result = slc_metrics(np.random.default_rng(0).standard_normal((5, 3)), np.zeros((5, 3), dtype=bool))
    for key in METRIC_KEYS:
        assert math.isnan(result[key]), key
    single = slc_metrics(np.array([[1.0], [2.0]]), np.array([0, 0]))  # k = 1: no negatives at all
    assert single["auprc"] == 1.0 and math.isnan(single["pooled_auroc"])


def test_infinite_scores_rank_at_the_ends() -> None:
    scores = np.array([[np.inf, 0.0], [-np.inf, 1.0], [0.5, -np.inf], [0.2, np.inf]])
    y = np.array([0, 1, 0, 1])
    result = slc_metrics(scores, y)
    assert result["pooled_auroc"] == 1.0 and result["auprc"] == 1.0


def test_recall_rounding() -> None:
    """m = min{j : j / P >= r} in float64 arithmetic, for the P where r * P rounds the wrong way."""
    p = np.arange(1, 1001)
    naive_wrong = 0
    for r in (0.9, 0.99, 0.07, 0.28, 0.55, 1.0, 1 / 3):
        brute = np.array([next(j for j in range(1, q + 1) if j / q >= r) for q in p])
        np.testing.assert_array_equal(recall_position(r, p), brute, err_msg=str(r))
        naive_wrong += int((np.ceil(r * p) != brute).sum())
    assert naive_wrong > 0  # e.g. 0.07 * 100 = 7.000000000000001: ceil gives 8, but 7 / 100 >= 0.07


def test_custom_recall_levels() -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(0, 5, size=100)
    scores = rng.standard_normal((100, 5))
    result = slc_metrics(scores, y, recall_levels=(0.5,))
    assert set(result) == {"auprc", "precision@0.5", "pooled_auprc", "pooled_auroc", "accuracy"}
    expected = np.mean([brute_precision_at_recall(y == c, scores[:, c], 0.5) for c in range(5)])
    assert result["precision@0.5"] == pytest.approx(expected)


def test_keys_types_and_per_class_function() -> None:
    rng = np.random.default_rng(10)
    y = rng.integers(0, 4, size=50)
    scores = rng.standard_normal((50, 4))
    result = slc_metrics(scores, y)
    assert list(result) == [*METRIC_KEYS, "accuracy"]
    assert all(type(v) is float for v in result.values())
    json.dumps(result)
    per = per_class_metrics(scores, y)
    assert set(per) == {"auprc", "precision@0.9", "precision@0.99", "num_positives"}
    assert np.nanmean(per["auprc"]) == pytest.approx(result["auprc"])


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(11)
    scores = rng.standard_normal((300, 80)).astype(np.float32)
    y = rng.integers(0, 80, size=300)
    before, y_before = scores.copy(), y.copy()
    tensor = torch.from_numpy(scores.copy())
    fortran, small = np.asfortranarray(scores), scores[:10, :5].copy(order="F")
    small_before = small.copy()
    slc_metrics(scores, y)
    slc_metrics(tensor, torch.from_numpy(y))
    slc_metrics(fortran, y)
    slc_metrics(small, y[:10] % 5)
    np.testing.assert_array_equal(scores, before)
    np.testing.assert_array_equal(fortran, before)
    np.testing.assert_array_equal(small, small_before)
    np.testing.assert_array_equal(y, y_before)
    np.testing.assert_array_equal(tensor.numpy(), before)


def test_tiledcontiguous_transpose() -> None:
    rng = np.random.default_rng(12)
    for shape in [(1, 1), (700, 130), (257, 65), (3, 20_000), (20_000, 2)]:
        x = rng.standard_normal(shape).astype(np.float32)
        for layout in (x, np.asfortranarray(x)):
            t = contiguous_transpose(layout)
            assert t.flags.c_contiguous and t.flags.owndata
            np.testing.assert_array_equal(t, x.T)


# ----------------------------------------------------------------------------------------- bad inputs

GOOD_SCORES = np.zeros((4, 3))
GOOD_TARGET = np.array([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("scores", "target", "error", "match"),
    [
        (np.zeros(4), GOOD_TARGET, ValueError, "2-D"),
        (np.zeros((4, 3, 1)), GOOD_TARGET, ValueError, "2-D"),
        (np.zeros((4, 3), dtype=np.int64), GOOD_TARGET, TypeError, "floating-point"),
        (np.zeros((4, 3), dtype=bool), GOOD_TARGET, TypeError, "floating-point"),
        (np.array([["a", "b"]]), np.array([0]), TypeError, "floating-point"),
        (np.zeros((0, 3)), np.zeros(0, dtype=np.int64), ValueError, "empty"),
        (np.zeros((4, 0)), GOOD_TARGET, ValueError, "empty"),
        (np.array([[0.0, np.nan, 1.0]] * 4), GOOD_TARGET, ValueError, "NaN"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), ValueError, "NaN"),
        ({"a": 1}, GOOD_TARGET, TypeError, "numpy array or a torch tensor"),
        (GOOD_SCORES, np.array([0.0, 1.0, 2.0, 0.0]), TypeError, "integer"),
        (GOOD_SCORES, np.array([True, False, True, True]), TypeError, "integer"),
        (GOOD_SCORES, torch.tensor([0.0, 1.0, 2.0, 0.0]), TypeError, "integer"),
        (GOOD_SCORES, np.array([0, 1, 2]), ValueError, "3 entries but scores have 4 rows"),
        (GOOD_SCORES, np.array([0, 1, 3, 0]), ValueError, r"in \[0, 3\)"),
        (GOOD_SCORES, np.array([0, -1, 2, 0]), ValueError, r"in \[0, 3\)"),
        (GOOD_SCORES, np.zeros((4, 2), dtype=bool), ValueError, "scores' shape"),
        (GOOD_SCORES, np.full((4, 3), 2), ValueError, "only 0 and 1"),
        (GOOD_SCORES, np.zeros((4, 3), dtype=complex), TypeError, "0/1"),
        (GOOD_SCORES, np.zeros((4, 3, 1), dtype=np.int64), ValueError, "class indices or an"),
    ],
)
def test_bad_inputs(scores: object, target: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        slc_metrics(scores, target)
    with pytest.raises(error, match=match):
        per_class_metrics(scores, target)


@pytest.mark.parametrize("levels", [(0.0,), (1.5,), (-0.1,)])
def test_bad_recall_levels(levels: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="recall levels"):
        slc_metrics(GOOD_SCORES, GOOD_TARGET, recall_levels=levels)
    with pytest.raises(TypeError, match="recall levels"):
        slc_metrics(GOOD_SCORES, GOOD_TARGET, recall_levels=("0.9",))


# ----------------------------------------------------------------------------------------- helpers

def test_all_logits_scores() -> None:
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(50, 7, generator=gen) * 30
    out = all_logits_scores(logits)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.softmax(logits.double(), dim=1))
    as_numpy = all_logits_scores(logits.numpy())
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float64
    np.testing.assert_allclose(as_numpy, out.numpy(), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(as_numpy.sum(axis=1), 1.0)
    huge = all_logits_scores(np.array([[1e4, 0.0, -1e4], [-1e4, -1e4 + 1, -1e4]]))
    assert np.isfinite(huge).all()
    np.testing.assert_allclose(huge[1], np.exp([0.0, 1.0, 0.0]) / np.exp([0.0, 1.0, 0.0]).sum())
    # float64 keeps a confident model's ranking: in float32 both rows would tie at exactly 1.0
    confident = all_logits_scores(np.array([[20.0, 0.0], [25.0, 0.0]], dtype=np.float32))
    assert confident[1, 0] > confident[0, 0]
    assert all_logits_scores(logits.half()).dtype == torch.float64


@pytest.mark.parametrize(
    ("logits", "error"),
    [(np.zeros(3), ValueError), (np.zeros((0, 3)), ValueError), (np.zeros((2, 3), dtype=int), TypeError),
     (np.array([[0.0, np.inf]]), ValueError), (torch.tensor([[0.0, float("nan")]]), ValueError),
     (torch.zeros(2, 2, dtype=torch.long), TypeError)],
)
def test_all_logits_scores_bad_input(logits: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        all_logits_scores(logits)


def test_mean_relative_improvement_reproduces_the_paper() -> None:
    """Paper Table I: 1 - P@0.9 and 1 - P@0.99 of (CE, max-margin) vs (self-norm, NCE, binary CE, batch CE,
    batch max-margin) give the printed 91.3% / 88.4% (MNIST) and 39.6% / 40.8% (SVHN)."""
    mnist_non, mnist_aligned = [(0.005, 0.203), (0.018, 0.262)], [
        (0.001, 0.021), (0.002, 0.021), (0.000, 0.037), (0.001, 0.022), (0.001, 0.034)]
    svhn_non, svhn_aligned = [(0.028, 0.545), (0.025, 0.532)], [
        (0.014, 0.298), (0.017, 0.320), (0.016, 0.312), (0.013, 0.280), (0.020, 0.384)]
    for non, aligned, printed in ((mnist_non, mnist_aligned, (0.913, 0.884)), (svhn_non, svhn_aligned, (0.396, 0.408))):
        for column, expected in enumerate(printed):
            value = mean_relative_improvement([r[column] for r in non], [r[column] for r in aligned])
            assert round(value, 3) == expected
    assert mean_relative_improvement([0.9, 0.8], [0.95], from_metric=True) == pytest.approx((0.15 - 0.05) / 0.15)
    assert mean_relative_improvement([0.1], [0.2]) == pytest.approx(-1.0)  # worse: negative


def test_mean_relative_improvement_edge_cases() -> None:
    assert math.isnan(mean_relative_improvement([0.0, 0.0], [0.0]))
    assert math.isnan(mean_relative_improvement([1.0], [0.5], from_metric=True))
    with pytest.raises(ValueError, match="non-empty"):
        mean_relative_improvement([], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        mean_relative_improvement([0.1], [float("nan")])
    with pytest.raises(TypeError, match="sequence"):
        mean_relative_improvement(0.1, [0.1])  # type: ignore[arg-type]


def test_one_minus() -> None:
    row = {"loss": "ce", "lr": 0.1, "auprc": 0.99, "precision@0.9": 0.75, "pooled_auroc": 1.0, "accuracy": None,
           "per_class": {"auprc": np.array([0.5, np.nan]), "num_positives": np.array([3, 0])}}
    out = one_minus(row)
    assert out["loss"] == "ce" and out["lr"] == 0.1 and out["accuracy"] is None
    assert out["auprc"] == pytest.approx(0.01) and out["precision@0.9"] == 0.25 and out["pooled_auroc"] == 0.0
    np.testing.assert_array_equal(out["per_class"]["auprc"], [0.5, np.nan])
    np.testing.assert_array_equal(out["per_class"]["num_positives"], [3, 0])
    assert row["auprc"] == 0.99  # input untouched


def test_benchmark_runs_small(tmp_path) -> None:
    from logitsep.bench.metrics import run

    result = run(n=300, k=20, repeat=1, out=str(tmp_path / "speed"), dtypes=("float32",))
    assert result["ratio"]["float32"] > 0
    for suffix in (".csv", ".json", ".png"):
        assert (tmp_path / f"speed{suffix}").stat().st_size > 0
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["rows"] and "environment" in saved


def test_one_minus_converts_nested_per_class_values() -> None:
    """Nested mappings (``per_class``, ``all_logits``) are converted entry by entry: arrays, lists and numbers
    whose 1 − value differs from the value (0.5 would hide a missing conversion)."""
    row = {"auprc": 0.75, "all_logits": {"auprc": 0.9, "precision@0.99": 0.2, "lr": 0.1},
           "per_class": {"auprc": np.array([0.25, 0.875, np.nan]), "precision@0.9": [0.125, 1.0],
                         "num_positives": np.array([3, 4, 0])}}
    out = one_minus(row)
    assert out["auprc"] == 0.25
    assert out["all_logits"] == {"auprc": pytest.approx(0.1), "precision@0.99": pytest.approx(0.8), "lr": 0.1}
    np.testing.assert_array_equal(out["per_class"]["auprc"], [0.75, 0.125, np.nan])
    np.testing.assert_array_equal(out["per_class"]["precision@0.9"], [0.875, 0.0])
    np.testing.assert_array_equal(out["per_class"]["num_positives"], [3, 4, 0])  # counts are not metrics
    np.testing.assert_array_equal(row["per_class"]["auprc"], [0.25, 0.875, np.nan])  # input untouched
