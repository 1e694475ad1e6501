"""Class search: vectors whose inner products are the logits, the on-disk index (durability, corruption, readers
during appends), exact search against brute force, FAISS search against exact, and `logitsep index` on a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from logitsep.heads import CosineHead, LinearHead
from logitsep.search import (
    DATA,
    HEADER,
    ClassSearch,
    EmbeddingIndex,
    class_vectors,
    head_fingerprint,
    item_vectors,
)
from logitsep.search import scan as scan_mod
from logitsep.search import screen as screen_mod
from logitsep.search import storage as storage_mod

# ----------------------------------------------------------------------------------------------- helpers


def brute_force(vectors: np.ndarray, query: np.ndarray, threshold: float | None, top_k: int | None):
    """Reference: float64 scores of every item, sorted by (score descending, id ascending) with Python's sort."""
    scores = [float(np.dot(v.astype(np.float64), query.astype(np.float64))) for v in vectors]
    order = sorted(range(len(vectors)), key=lambda i: (-scores[i], i))
    if threshold is not None:
        order = [i for i in order if scores[i] >= threshold]
    if top_k is not None:
        order = order[:top_k]
    return order, [scores[i] for i in order]


def integer_data(gen: torch.Generator, n: int, dim: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integers: every score is exact in float32, and many items tie (the tie-breaking rule is tested)."""
    return (torch.randint(-3, 4, (n, dim), generator=gen).float(),
            torch.randint(-2, 3, (q, dim), generator=gen).float())


def files_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def index_of(tmp_path: Path):
    def make(vectors: torch.Tensor, name: str = "index", exact_path: str | None = None) -> EmbeddingIndex:
        index = EmbeddingIndex.create(tmp_path / name, vectors.shape[1], exact_path=exact_path)
        index.append(vectors)
        return index

    return make


# --------------------------------------------------------------------------------- head ↔ inner products


def test_item_and_class_vectors_give_the_linear_logits(gen: torch.Generator) -> None:
    head = LinearHead(6, 11)
    h = torch.randn(9, 6, generator=gen)
    scores = (item_vectors(head, h).double() @ class_vectors(head).double().T)
    reference = h.double() @ head.weight.detach().double().T + head.bias.detach().double()
    torch.testing.assert_close(scores, reference, rtol=1e-6, atol=1e-6)
    assert item_vectors(head, h).shape == (9, 7)
    torch.testing.assert_close(class_vectors(head, [4, 2, 4]), class_vectors(head)[[4, 2, 4]])
    torch.testing.assert_close(class_vectors(head, 3), class_vectors(head)[[3]])


def test_vectors_of_a_bias_free_linear_and_a_cosine_head(gen: torch.Generator) -> None:
    lin = nn.Linear(5, 4, bias=False)
    h = torch.randn(7, 5, generator=gen)
    torch.testing.assert_close(item_vectors(lin, h) @ class_vectors(lin).T, lin(h).detach(), rtol=1e-5, atol=1e-5)
    cos = CosineHead(5, 4, scale=3.0)
    h[0] = 0.0  # a zero embedding scores 0, like the head
    w = cos.weight.detach().double()
    reference = 3.0 * torch.stack([torch.stack([
        (hi.double() @ wj) / max(float(hi.double().norm()), 1e-12) / float(wj.norm()) for wj in w]) for hi in h])
    got = (item_vectors(cos, h) @ class_vectors(cos).T).double()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), cos.logits(h, torch.arange(4)).detach(), rtol=1e-5, atol=1e-5)


def test_vector_arguments_are_checked() -> None:
    head = LinearHead(4, 3)
    with pytest.raises(ValueError, match=r"\[batch, 4\] \(embedding dimension 4\)"):
        item_vectors(head, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating"):
        item_vectors(head, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown class 3"):
        class_vectors(head, [0, 3])
    with pytest.raises(ValueError, match="unknown class -1"):
        class_vectors(head, -1)
    with pytest.raises(TypeError, match="integers"):
        class_vectors(head, [0.5])
    with pytest.raises(TypeError, match="linear head"):
        item_vectors(nn.Conv1d(1, 1, 1), torch.zeros(1, 1))


def test_fingerprint_changes_with_any_parameter() -> None:
    head = LinearHead(4, 3)
    before = head_fingerprint(head)
    assert before == head_fingerprint(head)
    with torch.no_grad():
        head.bias[1] += 1e-6
    assert head_fingerprint(head) != before


# ------------------------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64])
def test_exact_search_equals_brute_force(gen: torch.Generator, index_of, chunk_rows: int | None) -> None:
    vectors, queries = integer_data(gen, 150, 5, 4)
    index = index_of(vectors)
    data, qs = vectors.numpy(), queries.numpy()
    for threshold, top_k in [(2.0, None), (None, 9), (1.0, 5), (None, 1), (100.0, None), (-np.inf, None),
                             (3.0, 1000)]:
        results = index.search(queries, threshold=threshold, top_k=top_k, chunk_rows=chunk_rows)
        assert len(results) == len(queries)
        for j, result in enumerate(results):
            ids, scores = brute_force(data, qs[j], threshold, top_k)
            assert result.ids.tolist() == ids, (threshold, top_k, j)
            assert result.scores.tolist() == scores
            assert result.ids.dtype == np.int64 and result.scores.dtype == np.float32
            assert result.scanned == len(vectors)


def test_per_query_thresholds_and_single_queries(gen: torch.Generator, index_of) -> None:
    vectors, queries = integer_data(gen, 80, 4, 3)
    index = index_of(vectors)
    batch = index.search(queries, threshold=[0.0, 2.0, 5.0])
    for j, t in enumerate([0.0, 2.0, 5.0]):
        one = index.search(queries[j], threshold=t)  # a 1-D query gives one result
        assert one.ids.tolist() == batch[j].ids.tolist() == brute_force(vectors.numpy(), queries[j].numpy(), t,
                                                                        None)[0]
    single = index.search(queries[0].numpy().astype(np.float64), top_k=4)  # numpy float64 queries are accepted
    assert single.ids.tolist() == brute_force(vectors.numpy(), queries[0].numpy(), None, 4)[0]


def test_continuous_scores_match_a_float64_scan(gen: torch.Generator, index_of) -> None:
    vectors = torch.randn(500, 33, generator=gen)
    queries = torch.randn(6, 33, generator=gen)
    index = index_of(vectors)
    exact = vectors.double() @ queries.double().T
    for j, result in enumerate(index.search(queries, top_k=20, chunk_rows=128)):
        assert result.ids.tolist() == torch.argsort(exact[:, j], descending=True)[:20].tolist()
        np.testing.assert_allclose(result.scores, exact[result.ids, j].numpy(), rtol=1e-5, atol=1e-5)


def test_one_query_product_is_a_float32_dot_product_per_row(gen: torch.Generator) -> None:
    """The float32 scan's product for one query (numpy's BLAS): each score within the float32 error bound of its
    float64 dot product, γ_d·Σ|v_j q_j|, on a memory-map-like view whose rows start at any alignment."""
    for n, dim, offset in [(1, 3, 0), (1000, 7, 1), (70_001, 33, 3), (5000, 513, 0)]:
        block = torch.randn(n + offset, dim, generator=gen)[offset:]
        query = torch.randn(dim, generator=gen)
        got = scan_mod.matrix_vector(block, query)
        assert got.dtype == torch.float32 and got.shape == (n,)
        exact = block.double() @ query.double()
        gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
        bound = gamma * (block.double().abs() @ query.double().abs()) + 2.0 ** -24 * exact.abs()
        assert bool(((got.double() - exact).abs() <= bound).all())


def test_float32_scan_of_many_rows_equals_a_float64_brute_force(gen: torch.Generator, tmp_path: Path) -> None:
    """A float32 scan of 70,000 rows (BLAS splits them over its threads): on integer data (exact scores, many ties)
    its threshold and top-k answers are those of the float64 brute force, ties by id."""
    vectors = torch.randint(-3, 4, (70_000, 3), generator=gen).float()
    query = torch.tensor([1.0, -2.0, 1.0])
    with EmbeddingIndex.create(tmp_path / "ix", 3) as index:
        index.append(vectors)
    exact = vectors.double() @ query.double()
    with EmbeddingIndex.open(tmp_path / "ix", screen=False) as index:
        found = index.search(query, threshold=10.0)
        top = index.search(query, top_k=40)
    order = sorted(range(len(vectors)), key=lambda i: (-float(exact[i]), i))  # score descending, ties by id
    assert found.ids.tolist() == [i for i in order if exact[i] >= 10.0]
    assert top.ids.tolist() == order[:40] and top.scores.tolist() == exact[order[:40]].tolist()


def test_float16_cut_keeps_every_score_at_or_above_the_cut(gen: torch.Generator) -> None:
    """The screen compares float16 scores with the largest float16 at most the cut: no score ≥ cut is lost
    (a cut rounded to the nearest float16 would lose some), and only scores within one float16 step below it
    are added; cuts beyond float16's range bound from below as well."""
    scores = (torch.randn(100_000, generator=gen) * 300).half()
    as32 = scores.float().numpy()
    cuts = [*(torch.randn(300, generator=gen) * 300).tolist(), 0.0, -0.0, 1e-9, -1e-9, 0.1, 65504.0, -65504.0,
            1e6, -1e6]
    for cut in cuts:
        c16 = screen_mod.float16_at_most(cut)
        assert c16.dtype == torch.float16 and float(c16) <= cut
        kept = set(np.flatnonzero((scores >= c16).numpy()).tolist())
        wanted = set(np.flatnonzero(as32 >= np.float32(cut)).tolist())
        assert wanted <= kept, cut
        if abs(cut) < 60000:  # nothing more than the float16 values in [c16, cut)
            assert all(float(c16) <= as32[i] < cut for i in kept - wanted)


# ------------------------------------------------------------------------------- float16 screen (exact)


def clustered(gen: torch.Generator, n: int, dim: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items near one of ``classes`` unit means and the class vectors: a few items score high for each query,
    most score low, and many fall near the thresholds tested (the screen's margin is exercised)."""
    means = torch.nn.functional.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    noise = 0.5 / dim ** 0.5 * torch.randn(n, dim, generator=gen)
    items = means[torch.randint(0, classes, (n,), generator=gen)] + noise
    return items, means


def screened(index: EmbeddingIndex) -> int:
    """Rows the index's float16 screen holds (0: not built)."""
    return 0 if index._screen is None else index._screen.count


@pytest.mark.parametrize("threshold, top_k", [(0.5, None), (0.9, None), (None, 7), (0.6, 25), (None, 1)])
def test_screened_search_equals_a_float64_brute_force(gen: torch.Generator, index_of, monkeypatch,
                                                      threshold: float | None, top_k: int | None) -> None:
    vectors, means = clustered(gen, 3000, 24, 30)
    index = index_of(vectors, exact_path="screen")
    monkeypatch.setattr(storage_mod, "scan", lambda *a, **k: pytest.fail("the screen should answer, not the scan"))
    results = index.search(means[:3], threshold=threshold, top_k=top_k)
    assert screened(index) == len(vectors)
    for j, result in enumerate(results):
        ids, scores = brute_force(vectors.numpy(), means[j].numpy(), threshold, top_k)
        assert result.ids.tolist() == ids
        np.testing.assert_allclose(result.scores, scores, rtol=1e-6, atol=1e-6)
        assert result.scanned == len(vectors)


def paths_available() -> list[str]:
    return ["screen", "numpy", "torch"] + (["faiss"] if scan_mod.faiss_available() else [])


def test_every_path_gives_the_same_answer_bit_for_bit(gen: torch.Generator, tmp_path: Path) -> None:
    """The float16 screen and the float32 kernels (numpy, torch, FAISS), one query at a time or batched, in one
    chunk or many: the same ids in the same order and the same float32 scores, bit for bit. Thresholds set at an
    item's own score (a tie at the threshold) and top-k cut inside groups of equal rows (ties by id)."""
    vectors, means = clustered(gen, 3000, 40, 8)
    vectors[100:110] = vectors[5]  # ten copies of item 5: equal scores, ties broken by id
    with EmbeddingIndex.create(tmp_path / "ix", 40) as index:
        index.append(vectors)
    ref = EmbeddingIndex.open(tmp_path / "ix", exact_path="numpy")
    at = float(ref.search(means[0], top_k=40).scores[-1])  # a threshold exactly at a stored item's score
    every = ref.search(vectors[5], threshold=-np.inf)
    tie = float(every.scores[every.ids == 5][0])  # the score of item 5 and its ten copies
    cases = [(0.4, None), (None, 50), (0.7, 3), ([0.3, 0.8], None), (-np.inf, 5), (at, None), ([at, at], 7),
             (tie, None)]
    for path in paths_available():
        ix = EmbeddingIndex.open(tmp_path / "ix", exact_path=path)
        for threshold, top_k in cases:
            queries = torch.stack([vectors[5], means[1]]) if threshold == tie else means[:2]
            want = ref.search(queries, threshold=threshold, top_k=top_k)
            for got in (ix.search(queries, threshold=threshold, top_k=top_k),
                        [ix.search(v, threshold=t, top_k=top_k) for v, t in
                         zip(queries, threshold if isinstance(threshold, list) else [threshold] * 2, strict=True)],
                        ix.search(queries, threshold=threshold, top_k=top_k, chunk_rows=257)):
                for x, y in zip(got, want, strict=True):
                    assert x.ids.tolist() == y.ids.tolist(), (path, threshold, top_k)
                    assert x.scores.tobytes() == y.scores.tobytes(), (path, threshold, top_k)
        assert ix.last_path == path
    assert len(ref.search(means[0], threshold=at)) == 40
    assert ref.search(vectors[5], threshold=tie).ids[-11:].tolist() == [5, *range(100, 110)]  # tied, by id


def test_scores_are_the_float64_inner_products_rounded_once(gen: torch.Generator, tmp_path: Path) -> None:
    """Every path's scores: the float32 rounding of the float64 inner product (products exact, summed in float64),
    closer to the true value than a float32 dot product."""
    vectors, means = clustered(gen, 2000, 64, 4)
    with EmbeddingIndex.create(tmp_path / "ix", 64) as index:
        index.append(vectors)
    for path in paths_available():
        found = EmbeddingIndex.open(tmp_path / "ix", exact_path=path).search(means[0], top_k=30)
        exact = (vectors[found.ids].double() @ means[0].double()).numpy()
        assert (found.scores == exact.astype(np.float32)).mean() > 0.99  # rounding of a float64 sum: nearly always
        np.testing.assert_allclose(found.scores, exact, rtol=2 ** -24, atol=0)


def test_auto_path_is_measured_and_cached(gen: torch.Generator, tmp_path: Path, monkeypatch) -> None:
    """``auto`` runs every candidate path on the first search of a kind and keeps the fastest; later searches of
    that kind and size reuse the choice; ``$LOGITSEP_EXACT_PATH`` and ``exact_path=`` override it."""
    from logitsep.search import paths as paths_mod

    paths_mod.forget()
    vectors, means = clustered(gen, 5000, 16, 4)
    with EmbeddingIndex.create(tmp_path / "ix", 16) as index:
        index.append(vectors)
    clock = iter(range(10 ** 6))
    speed = {"screen": 5.0, "numpy": 3.0, "torch": 1.0, "faiss": 4.0, "loop": 9.0}
    now = [0.0]

    def fake_search_with(self, path, q, thresholds, k, real=storage_mod.EmbeddingIndex._search_with):
        now[0] += speed[path] * (1 + next(clock) % 2 * 0.01)
        return real(self, path, q, thresholds, k)

    monkeypatch.setattr(storage_mod.EmbeddingIndex, "_search_with", fake_search_with)
    monkeypatch.setattr(paths_mod.time, "perf_counter", lambda: now[0])
    ix = EmbeddingIndex.open(tmp_path / "ix")
    assert ix.exact_path == "auto"
    want = ix.search(means[0], threshold=0.5)
    assert ix.last_path == "torch"
    choice = [c for c in paths_mod.chosen() if c.kind == "single"][0]
    assert set(choice.seconds) == set(paths_available()) and choice.path == "torch"
    speed["torch"] = 100.0  # cached: not measured again at this size
    assert ix.search(means[1], threshold=0.5) is not None and ix.last_path == "torch"
    batch = ix.search(means[:3], threshold=0.5)
    assert ix.last_path == "torch" or ix.last_path in paths_mod.BATCH_PATHS
    assert batch[0].ids.tolist() == want.ids.tolist()
    monkeypatch.setenv(paths_mod.ENV, "screen")
    assert EmbeddingIndex.open(tmp_path / "ix").exact_path == "screen"
    monkeypatch.setenv(paths_mod.ENV, "fastest")
    with pytest.raises(ValueError, match="LOGITSEP_EXACT_PATH must be one of auto, screen"):
        EmbeddingIndex.open(tmp_path / "ix")
    with pytest.raises(ValueError, match="exact_path must be one of"):
        EmbeddingIndex.open(tmp_path / "ix", exact_path="gpu")
    with pytest.raises(ValueError, match="needs screen=True"):
        EmbeddingIndex.open(tmp_path / "ix", screen=False, exact_path="screen")
    paths_mod.forget()


def test_screen_margin_bounds_the_float16_error(gen: torch.Generator) -> None:
    """The bound of ``screen_margin`` holds on data built to strain it: entries of every magnitude from the
    float16 subnormals to 10^4, all of one sign (no cancellation hides the rounding) or mixed, long rows."""
    if not screen_mod.fp16_mv_accumulates_in_fp32():
        pytest.skip("this CPU's float16 matrix-vector product does not accumulate in float32 (the screen is off)")
    worst = 0.0
    for dim in (3, 64, 513, 4096):
        for signed in (False, True):
            mags = 10.0 ** torch.empty(200, dim).uniform_(-7, 4, generator=gen)
            rows = mags * (torch.randn(200, dim, generator=gen).sign() if signed else 1)
            query = 10.0 ** torch.empty(dim).uniform_(-7, 0, generator=gen)
            max_norm = float(rows.double().norm(dim=1).max())
            query /= max(1.0, 1.02 * max_norm * float(query.double().norm()) / screen_mod.F16_SCORE_LIMIT)
            assert 1.01 * max_norm * float(query.double().norm()) < screen_mod.F16_SCORE_LIMIT  # the screen's domain
            exact = rows.double() @ query.double()
            got = torch.mv(rows.half(), query.half()).double()
            margin = screen_mod.screen_margin(dim, max_norm, float(query.double().norm()))
            worst = max(worst, float((got - exact).abs().max()) / margin)
    assert worst <= 1.0, worst
    assert worst > 0.05  # the bound is not vacuous: errors come within a factor of 20 of it


def test_screen_follows_appends_and_steps_aside_when_it_cannot_help(gen: torch.Generator, tmp_path: Path) -> None:
    vectors, means = clustered(gen, 500, 8, 4)
    index = EmbeddingIndex.create(tmp_path / "ix", 8, exact_path="screen")
    index.append(vectors[:300])
    assert index.search(means[0], threshold=0.5).ids.tolist() == brute_force(
        vectors[:300].numpy(), means[0].numpy(), 0.5, None)[0]
    assert screened(index) == 300
    index.append(vectors[300:])  # the next search converts the new rows only
    assert index.search(means[0], threshold=0.5).ids.tolist() == brute_force(
        vectors.numpy(), means[0].numpy(), 0.5, None)[0]
    assert screened(index) == 500
    # every item a candidate (threshold −inf) → the float32 scan answers
    assert len(index.search(means[0], threshold=-np.inf)) == 500
    # a row beyond float16's range turns the screen off for good; answers stay exact
    big = torch.zeros(1, 8)
    big[0, 0] = 1e6
    index.append(big)
    result = index.search(means[0], top_k=3)
    assert result.ids.tolist() == brute_force(torch.cat([vectors, big]).numpy(), means[0].numpy(), None, 3)[0]
    assert not index._screen.usable
    # a query whose scores would leave float16's range is scanned in float32
    plain = EmbeddingIndex.create(tmp_path / "iy", 8, exact_path="screen")
    plain.append(vectors)
    assert plain.search(means[0] * 1e5, top_k=2).ids.tolist() == brute_force(
        vectors.numpy(), (means[0] * 1e5).numpy(), None, 2)[0]
    assert screened(EmbeddingIndex.open(tmp_path / "iy", screen=False)) == 0


def test_empty_index_and_top_k_beyond_the_count(tmp_path: Path, gen: torch.Generator) -> None:
    index = EmbeddingIndex.create(tmp_path / "empty", 3)
    assert len(index) == 0 and index.vectors.shape == (0, 3)
    for result in index.search(torch.ones(2, 3), threshold=0.0, top_k=5):
        assert len(result) == 0 and result.scanned == 0
    reader = EmbeddingIndex.open(tmp_path / "empty")
    assert len(reader.search(torch.ones(3), top_k=2)) == 0
    index.append(torch.randn(3, 3, generator=gen))
    assert len(index.search(torch.ones(3), top_k=10)) == 3


def test_search_arguments_are_checked(gen: torch.Generator, index_of) -> None:
    index = index_of(torch.randn(10, 4, generator=gen))
    with pytest.raises(ValueError, match="threshold.*top_k"):
        index.search(torch.ones(4))
    with pytest.raises(ValueError, match="dimension is 4"):
        index.search(torch.ones(5), top_k=1)
    with pytest.raises(ValueError, match="dimension is 4"):
        index.search(torch.ones(2, 3, 4), top_k=1)
    with pytest.raises(TypeError, match="floating"):
        index.search(torch.ones(4, dtype=torch.long), top_k=1)
    with pytest.raises(TypeError, match="numpy array"):
        index.search([1.0, 2.0, 3.0, 4.0], top_k=1)
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.tensor([1.0, float("nan"), 0.0, 0.0]), top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        index.search(torch.ones(4), top_k=0)
    with pytest.raises(ValueError, match="one per query"):
        index.search(torch.ones(3, 4), threshold=[1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.ones(4), threshold=float("nan"))
    with pytest.raises(ValueError, match="chunk_rows"):
        index.search(torch.ones(4), top_k=1, chunk_rows=0)


# ------------------------------------------------------------------------------------------ on-disk index


def test_appends_persist_and_reopen(tmp_path: Path, gen: torch.Generator) -> None:
    a, b = torch.randn(5, 3, generator=gen), torch.randn(2, 3, generator=gen)
    index = EmbeddingIndex.create(tmp_path / "ix", 3, meta={"run": "r1"})
    assert index.append(a) == 5
    assert index.append(b.numpy()) == 7
    assert index.append(torch.zeros(0, 3)) == 7
    assert index.append(torch.ones(3)) == 8  # one [dim] vector is one row
    index.close()
    reopened = EmbeddingIndex.open(tmp_path / "ix")
    assert len(reopened) == 8 and reopened.dim == 3 and reopened.meta == {"run": "r1"}
    torch.testing.assert_close(reopened.vectors, torch.cat([a, b, torch.ones(1, 3)]))
    header = json.loads((tmp_path / "ix" / HEADER).read_text())
    assert header["count"] == 8 and header["dtype"] == "float32"
    assert (tmp_path / "ix" / DATA).stat().st_size == 8 * 3 * 4


def test_bad_appends_change_nothing(tmp_path: Path, gen: torch.Generator) -> None:
    index = EmbeddingIndex.create(tmp_path / "ix", 3)
    index.append(torch.randn(4, 3, generator=gen))
    before = files_state(tmp_path / "ix")
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        index.append(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.append(torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="too large for float32"):
        index.append(np.array([[1e300, 0.0, 0.0]]))
    with pytest.raises(TypeError, match="floating"):
        index.append(torch.zeros(2, 3, dtype=torch.int32))
    reader = EmbeddingIndex.open(tmp_path / "ix")
    with pytest.raises(ValueError, match="read-only"):
        reader.append(torch.zeros(1, 3))
    assert files_state(tmp_path / "ix") == before


def test_create_refuses_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        EmbeddingIndex.create(tmp_path / "taken", 3)
    assert (tmp_path / "taken" / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert len(EmbeddingIndex.create(tmp_path / "empty", 3)) == 0  # an empty folder is fine
    with pytest.raises(ValueError, match="dim"):
        EmbeddingIndex.create(tmp_path / "new", 0)


def test_failed_commit_keeps_the_old_index(tmp_path: Path, gen: torch.Generator, monkeypatch) -> None:
    first = torch.randn(3, 2, generator=gen)
    index = EmbeddingIndex.create(tmp_path / "ix", 2)
    index.append(first)
    before = files_state(tmp_path / "ix")

    def crash(*args, **kwargs):
        raise OSError("disk full while writing the header")

    monkeypatch.setattr(storage_mod, "_write_header", crash)
    with pytest.raises(OSError, match="disk full"):
        index.append(torch.randn(4, 2, generator=gen))
    monkeypatch.undo()
    assert len(index) == 3 and files_state(tmp_path / "ix") == before
    torch.testing.assert_close(EmbeddingIndex.open(tmp_path / "ix").vectors, first)


def test_crash_between_data_write_and_header_commit(tmp_path: Path, gen: torch.Generator) -> None:
    """A process killed after writing rows but before committing the header leaves extra bytes (here 1.5 rows):
    readers ignore them without touching the file; the next writer cuts them off and appends after the
    committed rows."""
    first, later = torch.randn(4, 3, generator=gen), torch.randn(2, 3, generator=gen)
    index = EmbeddingIndex.create(tmp_path / "ix", 3)
    index.append(first)
    index.close()
    data_path = tmp_path / "ix" / DATA
    with open(data_path, "ab") as f:
        f.write(np.arange(4.5 * 3, dtype=np.float32)[:6].tobytes() + b"\x01\x02")  # 1.5 rows of garbage
    before = files_state(tmp_path / "ix")
    reader = EmbeddingIndex.open(tmp_path / "ix")
    assert len(reader) == 4
    torch.testing.assert_close(reader.vectors, first)
    assert len(reader.search(torch.ones(3), threshold=-np.inf)) == 4
    assert files_state(tmp_path / "ix") == before  # read-only: nothing changed on disk
    writer = EmbeddingIndex.open(tmp_path / "ix", writable=True)
    assert data_path.stat().st_size == 4 * 3 * 4  # recovered to the committed rows
    assert writer.append(later) == 6
    torch.testing.assert_close(EmbeddingIndex.open(tmp_path / "ix").vectors, torch.cat([first, later]))


def test_process_killed_before_the_commit(tmp_path: Path, gen: torch.Generator) -> None:
    """A real crash: a child process appends and is killed (``os._exit``) right after its rows are written and
    fsynced, before the header commit. The index keeps its committed rows; the next writer recovers."""
    import subprocess
    import sys
    import textwrap

    first = torch.randn(3, 4, generator=gen)
    with EmbeddingIndex.create(tmp_path / "ix", 4) as index:
        index.append(first)
    child = textwrap.dedent(f"""
        import os, numpy as np
        from logitsep.search import EmbeddingIndex
        EmbeddingIndex._commit = lambda self, count: os._exit(9)  # die between the data write and the commit
        EmbeddingIndex.open({str(tmp_path / "ix")!r}, writable=True).append(np.ones((5, 4), np.float32))
    """)
    assert subprocess.run([sys.executable, "-c", child], timeout=120).returncode == 9
    data_path = tmp_path / "ix" / DATA
    assert data_path.stat().st_size == (3 + 5) * 4 * 4  # the rows were written...
    reader = EmbeddingIndex.open(tmp_path / "ix")
    assert len(reader) == 3  # ...but never committed
    torch.testing.assert_close(reader.vectors, first)
    with EmbeddingIndex.open(tmp_path / "ix", writable=True) as writer:
        assert data_path.stat().st_size == 3 * 4 * 4
        assert writer.append(torch.zeros(1, 4)) == 4
    torch.testing.assert_close(EmbeddingIndex.open(tmp_path / "ix").vectors, torch.cat([first, torch.zeros(1, 4)]))


def test_truncated_data_file_is_a_clear_error(tmp_path: Path, gen: torch.Generator) -> None:
    index = EmbeddingIndex.create(tmp_path / "ix", 3)
    index.append(torch.randn(4, 3, generator=gen))
    index.close()
    data_path = tmp_path / "ix" / DATA
    with open(data_path, "r+b") as f:
        f.truncate(4 * 3 * 4 - 5)
    before = files_state(tmp_path / "ix")
    for writable in (False, True):
        with pytest.raises(ValueError, match=f"{DATA}.*truncated"):
            EmbeddingIndex.open(tmp_path / "ix", writable=writable)
    assert files_state(tmp_path / "ix") == before
    data_path.unlink()
    with pytest.raises(FileNotFoundError, match=f"{DATA} is missing"):
        EmbeddingIndex.open(tmp_path / "ix")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"{not json", "not valid JSON"),
    (b'{"format": "something else"}', "not a logitsep-embedding-index header"),
    (b'{"format": "logitsep-embedding-index", "version": 99, "dim": 3, "count": 0, "dtype": "float32"}',
     "unsupported index format version 99"),
    (b'{"format": "logitsep-embedding-index", "version": 1, "dim": 3, "count": -1, "dtype": "float32"}',
     "invalid 'count'"),
    (b'{"format": "logitsep-embedding-index", "version": 1, "dim": 3, "count": 0, "dtype": "float16"}',
     "unsupported dtype"),
    (b"\xff\xfe\x00", "not valid JSON"),
])
def test_corrupt_header_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    EmbeddingIndex.create(tmp_path / "ix", 3).close()
    (tmp_path / "ix" / HEADER).write_bytes(content)
    before = files_state(tmp_path / "ix")
    for writable in (False, True):
        with pytest.raises(ValueError, match=message) as err:
            EmbeddingIndex.open(tmp_path / "ix", writable=writable)
        assert HEADER in str(err.value)
    assert files_state(tmp_path / "ix") == before


def test_missing_index_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        EmbeddingIndex.open(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{HEADER} is missing"):
        EmbeddingIndex.open(tmp_path / "bare")


def test_readers_see_committed_appends_and_writers_are_exclusive(tmp_path: Path, gen: torch.Generator) -> None:
    writer = EmbeddingIndex.create(tmp_path / "ix", 2)
    reader = EmbeddingIndex.open(tmp_path / "ix")
    with pytest.raises(ValueError, match="already open for writing"):
        EmbeddingIndex.open(tmp_path / "ix", writable=True)
    query = torch.tensor([1.0, 0.0])
    seen = []
    rows = torch.randn(12, 2, generator=gen)
    for i in range(0, 12, 3):
        writer.append(rows[i:i + 3])
        result = reader.search(query, threshold=-np.inf)  # search refreshes first
        seen.append(len(result))
        assert sorted(result.ids.tolist()) == list(range(i + 3))  # a committed prefix, nothing half-written
    assert seen == [3, 6, 9, 12] and len(reader) == 12 and reader.refresh() == 12
    writer.close()
    EmbeddingIndex.open(tmp_path / "ix", writable=True).close()  # the lock is released on close


# ----------------------------------------------------------------------------------------- approximate


def test_ivf_probing_every_list_is_exact(gen: torch.Generator, index_of) -> None:
    vectors, queries = integer_data(gen, 400, 6, 5)
    index = index_of(vectors)
    approx = index.approximate("ivf", nlist=8, nprobe=8)
    assert approx.params() == {"kind": "ivf", "nlist": 8, "nprobe": 8} and len(approx) == 400
    for t in (2.0, 5.0):  # integer scores: FAISS's and ours are both exact, so the sets must be equal
        for a, e in zip(approx.search(queries, threshold=t), index.search(queries, threshold=t), strict=True):
            assert a.ids.tolist() == e.ids.tolist() and a.scores.tolist() == e.scores.tolist()
            assert a.scanned == 400
    continuous = torch.randn(400, 6, generator=gen)
    index2 = index_of(continuous, name="continuous")
    approx2 = index2.approximate("ivf", nlist=4, nprobe=4)
    q = torch.randn(3, 6, generator=gen)
    for a, e in zip(approx2.search(q, top_k=7), index2.search(q, top_k=7), strict=True):
        assert a.ids.tolist() == e.ids.tolist()
        assert a.scores.tobytes() == e.scores.tobytes()  # the exact search's canonical scores, bit for bit
    one = approx2.search(q[0], threshold=0.5, top_k=3)  # both: the top 3 over the threshold
    assert one.ids.tolist() == index2.search(q[0], threshold=0.5, top_k=3).ids.tolist()
    # a threshold exactly at a stored item's score: IVF keeps it as the exact search does
    at = index2.search(q, top_k=25)
    for j in range(len(q)):
        t = float(at[j].scores[-1])
        a, e = approx2.search(q[j], threshold=t), index2.search(q[j], threshold=t)
        assert a.ids.tolist() == e.ids.tolist() and a.scores.tobytes() == e.scores.tobytes() and len(e) >= 25


def test_ivf_with_few_probes_scans_less_and_finds_clusters(gen: torch.Generator, index_of) -> None:
    means = torch.randn(8, 16, generator=gen) * 3
    labels = torch.arange(800) % 8
    vectors = means[labels] + 0.3 * torch.randn(800, 16, generator=gen)
    index = index_of(vectors)
    approx = index.approximate("ivf", nlist=16, nprobe=3, train_size=800)
    halfway = 0.5 * means.square().sum(dim=1)  # per class: half of ‖m_c‖², between the class and the others
    exact = index.search(means, threshold=halfway)
    assert sum(len(e) for e in exact) == pytest.approx(800, rel=0.05)
    found = approx.search(means, threshold=halfway)
    hits = sum(len(set(a.ids) & set(e.ids)) for a, e in zip(found, exact, strict=True))
    assert hits / sum(len(e) for e in exact) > 0.9
    assert all(set(a.ids) <= set(e.ids) for a, e in zip(found, exact, strict=True))  # never a false hit
    assert all(r.scanned < 800 for r in found)
    assert [r.scanned for r in approx.search(means, top_k=5)] == [r.scanned for r in found]


def test_approximate_index_update_and_arguments(tmp_path: Path, gen: torch.Generator) -> None:
    index = EmbeddingIndex.create(tmp_path / "ix", 4)
    with pytest.raises(ValueError, match="holds no vectors"):
        index.approximate("ivf")
    index.append(torch.randn(100, 4, generator=gen))
    with pytest.raises(ValueError, match="unknown approximate index kind"):
        index.approximate("hnsw")
    approx = index.approximate("ivf", nlist=4, nprobe=4)
    with pytest.raises(ValueError, match="nprobe"):
        approx.nprobe = 5
    with pytest.raises(ValueError, match="dimension is 4"):
        approx.search(torch.ones(3), top_k=1)
    extra = torch.full((1, 4), 10.0)
    index.append(extra)
    assert approx.update() == 101
    assert approx.search(torch.ones(4), top_k=1).ids.tolist() == [100]


# ------------------------------------------------------------------------------------------ class search


def test_class_search_scores_are_the_logits(tmp_path: Path, gen: torch.Generator) -> None:
    head = LinearHead(5, 7)
    h = torch.randn(60, 5, generator=gen)
    index = EmbeddingIndex.create(tmp_path / "ix", 6, meta={"head_sha256": head_fingerprint(head)})
    index.append(item_vectors(head, h))
    searcher = ClassSearch(index, head, class_names=[f"c{i}" for i in range(7)])
    logits = head(h).detach()
    for c in (0, 3, "c6"):
        col = logits[:, searcher.class_index(c)]
        result = searcher.search(c, top_k=5)
        assert result.ids.tolist() == torch.argsort(col, descending=True)[:5].tolist()
        np.testing.assert_allclose(result.scores, col[result.ids].numpy(), rtol=1e-5, atol=1e-5)
    several = searcher.search([1, 2], threshold=[0.0, 0.5])
    for r, c, t in zip(several, [1, 2], [0.0, 0.5], strict=True):
        assert set(r.ids.tolist()) == set((logits[:, c] >= t).nonzero().flatten().tolist())


def test_class_search_refuses_unknown_classes_and_other_heads(tmp_path: Path, gen: torch.Generator) -> None:
    head = LinearHead(5, 4)
    index = EmbeddingIndex.create(tmp_path / "ix", 6, meta={"head_sha256": head_fingerprint(head)})
    index.append(item_vectors(head, torch.randn(10, 5, generator=gen)))
    searcher = ClassSearch(index, head)
    with pytest.raises(ValueError, match="unknown class 4"):
        searcher.search(4, top_k=1)
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        searcher.search("cat", top_k=1)
    with pytest.raises(TypeError, match="bool"):
        searcher.search(True, top_k=1)
    with pytest.raises(ValueError, match="different model head"):
        ClassSearch(index, LinearHead(5, 4))
    with pytest.raises(ValueError, match="7-dimensional|another model"):
        ClassSearch(index, LinearHead(6, 4))


# ------------------------------------------------------------------------------ `logitsep index` on a run


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from logitsep.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="digits", steps=50, batch_size=64), out=out, progress=False)
    return out


@pytest.mark.slow
def test_index_command_matches_the_full_logits(digits_run: Path, tmp_path: Path, capsys) -> None:
    from logitsep.cli import main
    from logitsep.data import load_dataset
    from logitsep.runs import load_run
    from logitsep.train import predict

    out = tmp_path / "digits-index"
    assert main(["index", str(digits_run), "--dataset", "digits", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 400 and report["dim"] == 501  # the MLP embedding (500) + the bias
    model = load_run(digits_run).model
    x, _ = load_dataset("digits").split("test")
    logits = predict(model, x)
    searcher = ClassSearch.from_run(digits_run, out)
    assert len(searcher.index) == len(x) and searcher.index.meta["split"] == "test"
    for c in range(10):
        col = logits[:, c].double()
        result = searcher.search(c, top_k=10)
        np.testing.assert_allclose(result.scores, col[result.ids].numpy(), rtol=1e-4, atol=1e-4)
        true_top = torch.argsort(col, descending=True)
        if col[true_top[9]] - col[true_top[10]] > 1e-3:  # no near-tie at the cut
            assert set(result.ids.tolist()) == set(true_top[:10].tolist())
    batch = searcher.search(list(range(10)), threshold=0.0)
    for c, r in enumerate(batch):
        clear = (logits[:, c] - 0.0).abs() > 1e-4
        assert set(r.ids.tolist()) & set(clear.nonzero().flatten().tolist()) == \
            set(((logits[:, c] >= 0) & clear).nonzero().flatten().tolist())

    # an existing --out is refused and left alone; a missing run is a clear error
    before = files_state(out)
    assert main(["index", str(digits_run), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert files_state(out) == before
    assert main(["index", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")]) == 2
    assert "run folder" in (err := capsys.readouterr().err) and "no-run does not exist" in err
    (tmp_path / "empty-run").mkdir()
    assert main(["index", str(tmp_path / "empty-run"), "--out", str(tmp_path / "x")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_index_refuses_a_checkpoint_that_does_not_match(digits_run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from logitsep.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(digits_run, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["head.weight"] = weights["head.weight"][:, :-1].contiguous()  # an embedding one unit too short
    save_file(weights, str(broken / "model.safetensors"))
    assert main(["index", str(broken), "--out", str(tmp_path / "ix")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert not (tmp_path / "ix").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".ix")]

    other = tmp_path / "other"
    shutil.copytree(digits_run, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["head.bias"] = weights["head.bias"] + 1.0
    save_file(weights, str(other / "model.safetensors"))
    assert main(["index", str(digits_run), "--out", str(tmp_path / "good")]) == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="different model head"):
        ClassSearch.from_run(other, tmp_path / "good")


# ------------------------------------------------------------------- regressions found by planted bugs


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced files")
def test_append_fsyncs_the_rows_before_the_header_commit(tmp_path: Path, gen: torch.Generator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability order of an append: the rows reach the disk (fsync of vectors.f32) before the rename that
    commits the new header, and the folder is fsynced after it (so the rename itself is durable)."""
    index = EmbeddingIndex.create(tmp_path / "ix", 3)
    folder = str((tmp_path / "ix").resolve())
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", _fd_path(fd)))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    index.append(torch.randn(5, 3, generator=gen))
    monkeypatch.undo()
    commit = events.index(("replace", f"{folder}/{HEADER}"))
    assert ("fsync", f"{folder}/{DATA}") in events[:commit], events
    assert ("fsync", folder) in events[commit + 1:], events
    assert EmbeddingIndex.open(tmp_path / "ix").vectors.shape == (5, 3)


def test_failure_after_the_header_rename_keeps_the_committed_rows(tmp_path: Path, gen: torch.Generator,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The header rename is the commit: if the folder's fsync after it fails, the append reports the error but
    the rows it committed stay (cutting them off would leave a header counting rows the data file lacks)."""
    first, later = torch.randn(3, 4, generator=gen), torch.randn(2, 4, generator=gen)
    index = EmbeddingIndex.create(tmp_path / "ix", 4)
    index.append(first)
    folder = (tmp_path / "ix").resolve()
    real_fsync, real_replace = os.fsync, os.replace
    renamed = []

    def replace(src, dst) -> None:
        real_replace(src, dst)
        renamed.append(Path(dst).name)

    def fsync(fd: int) -> None:
        if renamed and Path(_fd_path(fd)) == folder:
            raise OSError("EIO while syncing the folder")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="EIO"):
        index.append(later)
    monkeypatch.undo()
    assert renamed == [HEADER]  # the failure came after the commit
    assert len(index) == 5
    reopened = EmbeddingIndex.open(tmp_path / "ix")
    torch.testing.assert_close(reopened.vectors, torch.cat([first, later]))


def _one_way_rows(dim: int, n_low: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and a query whose every entry is just below a float16 rounding midpoint: each rounds *down* by
    almost half a float16 step, so the float16 score of a full row errs by about 2·u16 of the score, all in one
    direction (random data makes errors of both signs that cancel). Half the rows are such, half are zero."""
    x = 1 + 2.0 ** -11 - 2.0 ** -20  # rounds to 1.0 in float16
    rows = torch.zeros(2 * n_low, dim)
    rows[::2] = x
    return rows, torch.full((dim,), x)


def test_screen_margin_covers_roundings_that_all_go_one_way() -> None:
    if not screen_mod.fp16_mv_accumulates_in_fp32():
        pytest.skip("this CPU's float16 matrix-vector product does not accumulate in float32 (the screen is off)")
    for dim in (4, 64, 1024):
        rows, query = _one_way_rows(dim, 1)
        exact = float(rows[0].double() @ query.double())
        s16 = float(torch.mv(rows.half(), query.half())[0])
        margin = screen_mod.screen_margin(dim, float(rows[0].double().norm()), float(query.double().norm()))
        assert exact - s16 > 0.4 * margin  # the data strain the bound: a margin 2.5x smaller would not hold
        assert abs(exact - s16) <= margin


def test_screen_keeps_items_whose_float16_scores_all_round_down(tmp_path: Path) -> None:
    """End to end: items whose float16 scores fall about 2·u16 below the threshold their float32 scores pass
    must still be found by the screened search (the same answer as the float32 scan)."""
    rows, query = _one_way_rows(64, 50)
    rows = torch.cat([rows, torch.zeros(900, 64)])  # few candidates: the screen answers, it does not step aside
    with EmbeddingIndex.create(tmp_path / "ix", 64) as index:
        index.append(rows)
    threshold = float(rows[0].double() @ query.double()) * (1 - 2.0 ** -16)
    fast = EmbeddingIndex.open(tmp_path / "ix", exact_path="screen")
    plain = EmbeddingIndex.open(tmp_path / "ix", screen=False, exact_path="torch")
    found = fast.search(query, threshold=threshold)
    assert fast._screen is not None and fast._screen.last_candidates >= 0  # the screen answered
    assert found.ids.tolist() == plain.search(query, threshold=threshold).ids.tolist() == list(range(0, 100, 2))


def test_screened_threshold_keeps_scores_exactly_at_the_threshold(tmp_path: Path) -> None:
    """Scores exactly equal to the threshold match (``score >= threshold``) on every search path: the float16
    screen, the float32 scan, FAISS IVF and the service's score columns. Small integers make every score exact."""
    from logitsep.search.select import select

    rows = torch.zeros(1000, 4)
    rows[::50] = 1.0  # 20 items score exactly 4, the rest 0
    rows[1::50] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # 20 items score 3, just below
    query = torch.ones(4)
    with EmbeddingIndex.create(tmp_path / "ix", 4) as index:
        index.append(rows)
    want = list(range(0, 1000, 50))
    fast = EmbeddingIndex.open(tmp_path / "ix", exact_path="screen")
    plain = EmbeddingIndex.open(tmp_path / "ix", screen=False)
    for ix in (fast, plain):
        assert ix.search(query, threshold=4.0).ids.tolist() == want
        assert ix.search(query, threshold=4.0, top_k=5).ids.tolist() == want[:5]
    assert fast._screen.last_candidates >= 0  # the screen answered the threshold query
    ivf = plain.approximate(nlist=4, nprobe=4)
    assert ivf.search(query, threshold=4.0).ids.tolist() == want
    column = (rows @ query).numpy()
    assert select(column, 4.0, None).ids.tolist() == want


def _midpoint(binade: int, k: int, above: bool) -> float:
    """Just above (or below) the k-th rounding midpoint of float16 in [2^binade, 2^(binade+1)): rounds up (down)
    by almost half a float16 step. Exact in float32."""
    step = 2.0 ** (binade - 10)
    return 2.0 ** binade + k * step + step / 2 + (2.0 ** -22 if above else -2.0 ** -22)


def test_screened_top_k_survives_errors_of_opposite_signs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-k screen keeps every row whose float16 score is within *twice* the error bound of the k-th best
    float16 score: the k-th best can be over-estimated by the bound while a true top-k row is under-estimated by
    it. Checked with the tightest valid bound (the largest actual error on these rows), so that the slack in
    ``screen_margin`` cannot hide a cut one bound short. Row 0 and the first half of the query round up, row 1
    and the second half round down: row 1 scores higher in float32, lower in float16, by more than the bound
    plus a float16 step."""
    if not screen_mod.fp16_mv_accumulates_in_fp32():
        pytest.skip("this CPU's float16 matrix-vector product does not accumulate in float32 (the screen is off)")
    up = [_midpoint(-1, 907, True), _midpoint(-1, 934, True), 0.0, 0.0]
    down = [0.0, 0.0, _midpoint(-1, 863, False), _midpoint(-1, 959, False)]
    query = torch.tensor([_midpoint(0, 11, True), _midpoint(0, 21, True), _midpoint(0, 6, False),
                          _midpoint(0, 36, False)])
    rows = torch.tensor([up, down] + [[0.0] * 4] * 98)
    exact = rows.double() @ query.double()
    s16 = torch.mv(rows.half(), query.half()).double()
    tight = float((s16 - exact).abs().max())
    assert exact[1] > exact[0]
    assert float(s16[1]) < float(screen_mod.float16_at_most(float(s16[0]) - tight))  # one bound short loses row 1
    monkeypatch.setattr(screen_mod, "screen_margin", lambda *args: tight)
    with EmbeddingIndex.create(tmp_path / "ix", 4) as index:
        index.append(rows)
    fast = EmbeddingIndex.open(tmp_path / "ix", exact_path="screen")
    assert fast.search(query, top_k=1).ids.tolist() == [1]
    assert fast._screen.last_candidates >= 0  # the screen answered


def test_float32_paths_keep_items_whose_fast_scores_lose_small_terms(tmp_path: Path) -> None:
    """Rows ±1 that cancel and two tiny terms t: a float32 sum that adds t to a partial sum of ±1 drops it (scores 0
    or t, by summation order), while the inner product is 2t. With the threshold at 2t every row matches: each path
    must keep rows whose fast score fell short by up to its error bound, and score them exactly."""
    gen = torch.Generator().manual_seed(3)
    t = 2.0 ** -30
    pattern = torch.tensor([1.0, 1.0, -1.0, -1.0, t, t, 0.0, 0.0])
    rows = torch.stack([pattern[torch.randperm(8, generator=gen)] for _ in range(200)])
    rows = torch.cat([rows, torch.zeros(4000, 8)])  # enough rows for every path to run as it would
    query = torch.ones(8)
    assert bool(((rows[:200] @ query) < 2 * t).any())  # float32 really loses them in some orders
    with EmbeddingIndex.create(tmp_path / "ix", 8) as index:
        index.append(rows)
    for path in paths_available():
        found = EmbeddingIndex.open(tmp_path / "ix", exact_path=path).search(query, threshold=2 * t)
        assert found.ids.tolist() == list(range(200)), path
        assert set(found.scores.tolist()) == {2 * t}, path


def test_top_k_cut_allows_errors_of_opposite_signs() -> None:
    """``cut_of``: the k-th best fast score may be over-estimated by the margin while a true top-k row is
    under-estimated by it; the cut sits two margins below the k-th best fast score (one margin loses row 1)."""
    from logitsep.search.exact import candidates, cut_of

    m = 0.01
    canonical = np.array([1.0, 1.005, 0.0], np.float32)
    fast = np.array([1.0 + m, 1.005 - m, 0.0], np.float32)  # row 1 is the true top-1
    assert 1 in candidates(fast, cut_of(fast, None, 1, m)).tolist()
    assert 1 not in candidates(fast, float(np.sort(fast)[-1]) - m).tolist()  # one margin is not enough
    assert canonical.argmax() == 1
    assert cut_of(fast, 0.5, 1, m) == pytest.approx(1.0 + m - 2 * m)  # the higher of the two cuts
    assert cut_of(fast, 2.0, 1, m) == pytest.approx(2.0 - m)
