"""``logitsep bench classes`` (logitsep.bench.classes): one training step against k, exact and sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logitsep.bench import classes as bench_classes
from logitsep.cli import main


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


def test_bench_classes_marks_full_coverage_and_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    from logitsep.core import hugepages

    monkeypatch.setenv("LOGITSEP_HUGE_PAGES", "0")
    result = bench_classes.run(classes=[50, 500], paths=["sampled"], dim=4, batch=4, sampled=100, repeats=1,
                               warmup=0, out=None, memory=False)
    rows = result["rows"]
    assert [(r["classes"], r["full_coverage"]) for r in rows] == [(50, True), (500, False)]  # 100 >= 50: exact
    assert [r["huge_pages"] for r in rows] == [False, False]
    monkeypatch.delenv("LOGITSEP_HUGE_PAGES")
    rows = bench_classes.run(classes=[50], paths=["sampled"], dim=4, batch=4, sampled=10, repeats=1, warmup=0,
                             out=None, memory=False)["rows"]
    assert rows[0]["huge_pages"] == hugepages.available()
