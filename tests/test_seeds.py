"""`logitsep summarize`: mean and spread over seeds of table2 runs, checked against numpy on hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from logitsep.cli import main
from logitsep.experiments import seeds


def per_loss_row(loss: str, scoring: str, seed: int, values: tuple[float, float, float], **settings: object) -> dict:
    auprc, p90, p99 = values
    return {"group": "per_loss", "method": f"{loss} ({scoring})", "loss": loss, "scoring": scoring,
            "pols_aligned": loss != "ce", "lr": 0.1 if loss == "ce" else 0.01, "auprc": auprc,
            "precision@0.9": p90, "precision@0.99": p99, "pooled_auprc": auprc, "pooled_auroc": 0.999,
            "accuracy": 0.98 + seed / 1000, "dataset": "mnist", "model": "mlp", "steps": 100, "batch_size": 128,
            "seed": seed, "train_split": "train", **settings}


def write_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    summary = {"group": "paper_layout", "method": "CE with all logits", "scoring": "all logits", "auprc": 0.5}
    (folder / "table2.json").write_text(json.dumps([summary, *rows]))
    return folder


VALUES = {  # seed → (batch_ce single logit, ce all logits), metric values (not 1 − metric)
    0: ((0.998, 0.9993, 0.962), (0.999, 0.9994, 0.982)),
    1: ((0.997, 0.9990, 0.975), (0.9988, 0.9996, 0.978)),
    2: ((0.9985, 0.9995, 0.970), (0.9991, 0.9990, 0.985)),
}


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    folders = [write_run(tmp_path / "seed0", [per_loss_row("batch_ce", "single logit", 0, VALUES[0][0]),
                                               per_loss_row("ce", "all logits", 0, VALUES[0][1])])]
    for seed in (1, 2):  # the later seeds ran one loss per folder
        folders.append(write_run(tmp_path / f"seed{seed}-bce", [per_loss_row("batch_ce", "single logit", seed,
                                                                             VALUES[seed][0])]))
        folders.append(write_run(tmp_path / f"seed{seed}-ce", [per_loss_row("ce", "all logits", seed,
                                                                           VALUES[seed][1])]))
    return folders


def test_mean_sd_and_ratio_against_numpy(runs: list[Path]) -> None:
    summary = seeds.summarize(seeds.load_rows(runs))
    by = {(r["loss"], r["scoring"]): r for r in summary}
    assert set(by) == {("batch_ce", "single logit"), ("ce", "all logits")}
    for j, key in enumerate(seeds.METRICS):
        for i, method in enumerate((("batch_ce", "single logit"), ("ce", "all logits"))):
            expected = 1 - np.array([VALUES[s][i][j] for s in (0, 1, 2)])
            got = by[method][key]
            assert by[method]["seeds"] == [0, 1, 2]
            np.testing.assert_allclose(got["values"], expected, rtol=1e-12)
            assert got["mean"] == pytest.approx(expected.mean(), rel=1e-12)
            assert got["std"] == pytest.approx(expected.std(ddof=1), rel=1e-12)
            assert (got["min"], got["max"]) == (pytest.approx(expected.min()), pytest.approx(expected.max()))
    comparison = seeds.compare(summary)
    for j, key in enumerate(seeds.METRICS):
        a = 1 - np.array([VALUES[s][0][j] for s in (0, 1, 2)])
        b = 1 - np.array([VALUES[s][1][j] for s in (0, 1, 2)])
        assert comparison[key]["ratio_of_means"] == pytest.approx(a.mean() / b.mean(), rel=1e-12)
        assert comparison[key]["ranges_overlap"] == bool(a.min() <= b.max() and b.min() <= a.max())
    # hand-checked: P@0.9's ranges overlap, AUPRC's do not (batch_ce .0015-.003 vs ce .0009-.0012)
    assert comparison["precision@0.9"]["ranges_overlap"] and not comparison["auprc"]["ranges_overlap"]


def test_one_seed_has_zero_spread_and_missing_pair_gives_no_comparison(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "a", [per_loss_row("ce", "single logit", 0, (0.99, 0.99, 0.9))])
    summary = seeds.summarize(seeds.load_rows([folder]))
    assert summary[0]["auprc"]["std"] == 0.0
    assert seeds.compare(summary) is None


def test_cli_writes_every_file(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "summary"
    assert main(["summarize", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "batch_ce (single logit)" in printed and "ratio of mean" in printed
    for ext in ("json", "csv", "md", "png"):
        assert (out / f"table2_seeds.{ext}").stat().st_size > 0
    result = json.loads((out / "table2_seeds.json").read_text())
    assert result["command"].startswith("logitsep summarize ") and result["settings"]["steps"] == 100
    md = (out / "table2_seeds.md").read_text()
    assert "± " in md and "![per-seed values](table2_seeds.png)" in md
    assert len((out / "table2_seeds.csv").read_text().strip().splitlines()) == 1 + 6  # header + 2 methods × 3 seeds
    assert main(["summarize", *map(str, runs), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["comparison"]["numerator"] == ["batch_ce", "single logit"]


def test_bad_input_is_named_and_writes_nothing(runs: list[Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "summary"
    assert main(["summarize", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere/table2.json does not exist" in capsys.readouterr().err
    other = write_run(tmp_path / "other", [per_loss_row("ce", "all logits", 7, (0.9, 0.9, 0.9), steps=5)])
    with pytest.raises(ValueError, match=r"differ in steps \(\[5, 100\]\)"):
        seeds.load_rows([*runs, other])
    # rows without weight_decay were written before it was recorded: they ran without it
    decayed = write_run(tmp_path / "decayed", [per_loss_row("ce", "all logits", 8, (0.9, 0.9, 0.9),
                                                            weight_decay=5e-4)])
    with pytest.raises(ValueError, match=r"differ in weight_decay \(\[0.0, 0.0005\]\)"):
        seeds.load_rows([*runs, decayed])
    plain = write_run(tmp_path / "plain", [per_loss_row("ce", "all logits", 9, (0.9, 0.9, 0.9), weight_decay=0.0)])
    assert len(seeds.load_rows([*runs, plain])) == 7  # 6 rows in runs, 1 here
    with pytest.raises(ValueError, match="seed 0, appears in both"):
        seeds.load_rows([runs[0], runs[0]])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "table2.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        seeds.load_rows([broken])
    (broken / "table2.json").write_text("[]")
    with pytest.raises(ValueError, match="no per-loss rows"):
        seeds.load_rows([broken])
    with pytest.raises(ValueError, match="at least one folder"):
        seeds.load_rows([])
    assert not out.exists()
