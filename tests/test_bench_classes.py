"""``logitsep bench classes`` (logitsep.bench.classes): one training step against k, exact and sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logitsep.bench import classes as bench_classes
from logitsep.cli import main
from logitsep.core import hugepages


def test_bench_classes_rows_ratios_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "classes", "--classes", "200,2000", "--dim", "8", "--batch-size", "4", "--sampled", "32",
                 "--repeats", "2", "--warmup", "1", "--no-memory", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [(r["path"], r["classes"]) for r in rows] == [("exact", 200), ("exact", 2000), ("sampled", 200),
                                                         ("sampled", 2000)]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["ratio_to_classes"] == 200 and r["loss"] == "nce"
    assert [r["ratio"] for r in rows if r["classes"] == 200] == [1.0, 1.0]
    largest = rows[-1]  # the target is the sampled step at the largest k against the smallest
    assert result["meets_target"] == {"nce": largest["ratio"] <= 1.3} and result["target"] == 1.3
    assert sorted(Path(f).name for f in result["files"]) == ["classes.csv", "classes.json", "classes.png"]
    assert all(Path(f).is_file() for f in result["files"])


def test_bench_classes_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="has no sampled form"):
        bench_classes.run(classes=[10], losses=["ce"], out=None, memory=False)
    with pytest.raises(ValueError, match="unknown path"):
        bench_classes.run(classes=[10], paths=["fast"], out=None, memory=False)


def test_bench_classes_marks_full_coverage_and_pages() -> None:
    result = bench_classes.run(classes=[50, 500], paths=["sampled"], dim=4, batch=4, sampled=100, repeats=1,
                               warmup=0, out=None, memory=False, pages="ordinary")
    rows = result["rows"]
    assert [(r["classes"], r["full_coverage"]) for r in rows] == [(50, True), (500, False)]  # 100 >= 50: exact
    assert [r["huge_pages"] for r in rows] == [False, False] and "huge_vs_ordinary" not in rows[0]
    rows = bench_classes.run(classes=[50], paths=["sampled"], dim=4, batch=4, sampled=10, repeats=1, warmup=0,
                             out=None, memory=False)["rows"]
    assert rows[0]["huge_pages"] == hugepages.available()  # "auto": as training
    with pytest.raises(ValueError, match="unknown pages"):
        bench_classes.run(classes=[50], pages="large", out=None, memory=False)


@pytest.mark.skipif(not hugepages.available(), reason="huge pages not available here")
def test_bench_classes_times_both_pages_in_the_same_rounds(tmp_path: Path) -> None:
    result = bench_classes.run(classes=[50, 500], paths=["sampled"], dim=4, batch=4, sampled=10, repeats=2,
                               warmup=0, out=tmp_path / "classes", memory=False, pages="both")
    rows = result["rows"]
    assert [(r["classes"], r["huge_pages"]) for r in rows] == [(50, True), (500, True), (50, False), (500, False)]
    assert all(r["huge_vs_ordinary"] > 0 for r in rows[:2]) and all("huge_vs_ordinary" not in r for r in rows[2:])
    assert result["meets_target"] == {"nce": rows[1]["ratio"] <= 1.3}  # judged in the pages training uses
    assert (tmp_path / "classes.png").is_file()
