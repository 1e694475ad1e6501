"""``logitsep bench ivf``: IVF recall on a run's real embeddings, checked against a brute-force reference, and the
files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from logitsep.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="digits", loss="batch_ce", steps=40, batch_size=64), out=out, progress=False)
    return out


def _reference_recall(found: list[np.ndarray], reference: list[np.ndarray]) -> float:
    total = sum(len(r) for r in reference)
    return sum(len(np.intersect1d(f, r)) for f, r in zip(found, reference, strict=True)) / total if total else 1.0


def test_recall_matches_a_brute_force_reference_and_files_are_written(digits_run: Path, tmp_path: Path) -> None:
    from logitsep.bench import ivf
    from logitsep.bench.search import TOP_K

    synthetic = tmp_path / "search.json"
    synthetic.write_text(json.dumps({"items": 1000, "dim": 8, "classes": 4, "approximate": {"nlist": 4},
                                     "rows": [{"method": "ivf, one by one", "nprobe": 1, "recall_threshold": 0.9,
                                               "recall_top_k": 0.8, "speedup_vs_exact": 12.0}]}))
    nlist, seed = 8, 3
    result = ivf.run([digits_run], nprobes=[1, 2, nlist, 99], nlists=[nlist], queries=4, repeats=1, seed=seed,
                     cache=tmp_path / "cache", synthetic=synthetic, out=tmp_path / "out")
    rows = result["rows"]
    assert {r["nprobe"] for r in rows} == {1, 2, nlist}  # nprobe > nlist is skipped
    assert len(rows) == 3 * len(ivf.KINDS)

    # the reference: float64 scores of the cached vectors, and the same IVF index (same seed) searched again
    index, labels, run = ivf.embed_run(digits_run, tmp_path / "cache")
    try:
        n = len(index)
        assert n == len(labels) == sum(len(ivf.load_dataset("digits").split(s)[1]) for s in ivf.SPLITS)
        vectors = index.vectors.numpy()
        head = run.model.head
        classes = np.sort(torch.randperm(head.k, generator=torch.Generator().manual_seed(seed))[:4].numpy())
        q = head.class_vectors(torch.as_tensor(classes))
        thresholds = ivf.class_thresholds(run, index, labels, classes, q)
        scores = vectors.astype(np.float64) @ q.numpy().astype(np.float64).T
        sizes = np.bincount(labels, minlength=head.k)[classes]
        for j in range(len(classes)):  # class_size: as many results as the class has examples (no ties here)
            assert (scores[:, j] >= thresholds["class_size"][j] - 1e-5).sum() == sizes[j]
        approx = index.approximate("ivf", nlist=nlist, seed=seed)
        for kind in ivf.KINDS:
            reference = ivf.brute_force(vectors, q.numpy(), thresholds[kind])
            clear = [np.abs(scores[:, j] - thresholds[kind][j]) > 1e-4 for j in range(len(classes))]
            exact = ivf.one_by_one(index, q, thresholds[kind])
            for e, r, c in zip(exact, reference, clear, strict=True):  # the exact search is the reference
                assert set(e.ids.tolist()) & set(np.flatnonzero(c)) == set(r.tolist()) & set(np.flatnonzero(c))
            for p in (1, 2, nlist):
                approx.nprobe = p
                found = [f.ids for f in ivf.one_by_one(approx, q, thresholds[kind])]
                row = next(r for r in rows if r["threshold"] == kind and r["nprobe"] == p)
                # items within 1e-4 of the threshold may fall either way in float32: left out of both sides, and
                # allowed for in the tolerance (a handful at most: the class_size threshold is an item's score)
                sure = [f[c[f]] for f, c in zip(found, clear, strict=True)]
                sure_ref = [r[c[r]] for r, c in zip(reference, clear, strict=True)]
                unsure = sum(int((~c).sum()) for c in clear)
                assert unsure <= 2 * len(classes)
                total = max(sum(len(r) for r in sure_ref), 1)
                assert row["recall_threshold"] == pytest.approx(_reference_recall(sure, sure_ref),
                                                                abs=unsure / total + 1e-6)
                assert row["mean_results"] == pytest.approx(np.mean([len(r) for r in reference]),
                                                            abs=unsure / len(classes) + 0.01)
                if p == nlist:  # every list probed: IVF is exact, but for items on the threshold (a calibrated
                    # threshold is the score of a validation example, and FAISS sums in another order)
                    assert row["recall_threshold"] >= 1.0 - unsure / total - 1e-6 and row["recall_top_k"] == 1.0
                    assert row["scanned_fraction"] == 1.0
                else:
                    assert 0 < row["scanned_fraction"] < 1
        top = [np.argsort(-scores[:, j], kind="stable")[:TOP_K] for j in range(len(classes))]
        approx.nprobe = 1
        found = [f.ids for f in ivf.one_by_one(approx, q, top_k=TOP_K)]
        row = next(r for r in rows if r["threshold"] == "global" and r["nprobe"] == 1)
        assert row["recall_top_k"] == pytest.approx(_reference_recall(found, top), abs=0.02)
    finally:
        index.close()

    # the files: rows with every key, the command, the CPU, the synthetic curve; and the plot
    out = tmp_path / "out"
    for name in ("ivf.csv", "ivf.json", "ivf.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    saved = json.loads((out / "ivf.json").read_text())
    assert "bench" in saved["command"] or saved["command"]
    assert saved["environment"].get("processor") and saved["cpu_model"]
    assert saved["synthetic"]["points"][0]["speedup_vs_exact"] == 12.0
    for key in ("dataset", "run", "items", "dim", "nlist", "nprobe", "threshold", "recall_threshold", "recall_top_k",
                "speedup_vs_exact", "scanned_fraction"):
        assert all(key in r for r in saved["rows"]), key
    assert saved["rows"][0]["dataset"] == "digits" and saved["rows"][0]["dim"] == head.d + 1
    assert all(r["speedup_vs_exact"] > 0 for r in saved["rows"])
    assert {(b["threshold"], b["nlist"]) for b in saved["best"]} == {(k, nlist) for k in ivf.KINDS}
    header = (out / "ivf.csv").read_text().splitlines()[0]
    assert "recall_threshold" in header and "speedup_vs_exact" in header and "env_processor" in header


def test_the_cli_refuses_bad_lists(tmp_path: Path) -> None:
    from logitsep.bench import ivf

    with pytest.raises(ValueError, match="--nprobes"):
        ivf._ints("1,x", "--nprobes")
    with pytest.raises(ValueError, match="positive"):
        ivf._ints("0,2", "--nlist")
    with pytest.raises(ValueError, match="threshold kinds"):
        ivf.run([tmp_path], kinds=["median"])
