"""Smoke tests of the speed benchmarks at tiny sizes (no timing assertions): `logitsep bench speed`, `head` and
`search` run, write their files with the right keys, and compute the quantities next to the timings right."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from logitsep.bench import search as bench_search
from logitsep.bench import speed
from logitsep.bench._common import alternating_rounds, int_list, paired_ratio
from logitsep.cli import main


def conv_linear_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Reference count, written differently from the FLOP counter: forward hooks on every Conv2d and Linear,
    multiply-adds = output elements × inputs per output (in_channels/groups × kernel area, or in_features)."""
    total = [0]

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            per_output = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            per_output = mod.in_features
        total[0] += output.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(x)
    for h in handles:
        h.remove()
    return total[0] // x.shape[0]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_multiply_adds_of_the_paper_backbones(name: str) -> None:
    backbone, shape = speed.build_backbone(name)
    x = torch.randn(1, *shape)
    assert speed.multiply_adds(backbone, x) == conv_linear_macs(backbone, x)
    if name == "mlp":
        assert speed.multiply_adds(backbone, x) == 784 * 500 + 500 * 500


def test_bound_formula() -> None:
    assert speed.bound(1000, 1, 10) == 1.0
    assert speed.bound(0, 1 << 10, 7) == 1 << 10  # no backbone cost: the speed-up is k
    assert speed.bound(642_000, 1 << 18, 500) == pytest.approx((642_000 + (1 << 18) * 500) / (642_000 + 500))


def test_paired_ratio_cancels_drift_between_rounds() -> None:
    # the machine slows down 3x over the rounds; within each round b takes 1.02x a
    a = [1.0, 2.0, 3.0, 1.5, 2.5]
    b = [1.02 * t for t in a]
    assert paired_ratio(b, a) == pytest.approx(1.02)
    # one disturbed round moves the median of ratios, not the result
    assert paired_ratio([*b, 50.0], [*a, 1.0]) == pytest.approx(1.02)
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_interleaved_reverses_the_order_every_other_round() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = alternating_rounds(fns, rounds=2, device="cpu")
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2, "c": 2}
    runs = [calls[i] for i in range(len(calls)) if i == 0 or calls[i] != calls[i - 1]]  # consecutive calls merged
    # warm-up a b c, round 0 a b c, round 1 c b a (its c follows round 0's c, so the two runs merge)
    assert runs == list("abcabcba")


def test_class_list_parsing() -> None:
    assert int_list("1024, 2^14,2^18.5") == [1024, 16384, 370728]
    assert speed.CLASSES == (1024, 16384, 65536, 262144, 370728)
    for bad in ("x", "2^y", "0", ""):
        with pytest.raises(Exception, match="expected|positive"):
            int_list(bad)


def test_bench_speed_writes_rows_and_figure(tmp_path: Path) -> None:
    result = speed.run(backbones=["mlp"], classes=[8, 64], batch=4, repeats=1, out=tmp_path / "speed")
    rows = result["rows"]
    assert [r["classes"] for r in rows] == [8, 64] and all(r["d"] == 500 for r in rows)
    keys = {"backbone", "classes", "backbone_ms_per_example", "slc_ms_per_example", "all_ms_per_example",
            "linear_ms_per_example", "speedup", "bound", "slc_over_backbone", "all_over_linear", "backbone_macs"}
    assert keys <= set(rows[0])
    for r in rows:
        assert r["speedup"] == pytest.approx(r["all_ms_per_example"] / r["slc_ms_per_example"], rel=1e-3)
        assert r["bound"] == pytest.approx(speed.bound(r["backbone_macs"], r["classes"], r["d"]), rel=1e-4)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["device"] == "cpu" and saved["device_name"] and len(saved["rows"]) == 2
    with open(tmp_path / "speed.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_torchvision_backbones_are_skipped_with_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    notes: list[str] = []
    result = speed.run(backbones=["alexnet"], classes=[8], repeats=1, out=tmp_path / "speed", log=notes.append)
    assert result["rows"] == [] and "alexnet" in result["skipped"] and "torchvision" in notes[0]
    assert not (tmp_path / "speed.json").exists()


def test_a_torchvision_backbone_is_timed(tmp_path: Path) -> None:
    """torchvision imports here (logitsep.backbones), so the paper's Table III backbones are measured."""
    result = speed.run(backbones=["alexnet"], classes=[8], batch=1, repeats=1, warmup=1, out=tmp_path / "speed",
                       plot=False)
    (row,) = result["rows"]
    assert (row["backbone"], row["d"], row["classes"], row["warmup"]) == ("alexnet", 4096, 8, 1)
    assert row["backbone_macs"] > 7e8  # AlexNet: about 0.7 GMACs per 224x224 image


def test_bench_speed_cli_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "speed", "--backbones", "mlp", "--classes", "2^3", "--batch-size", "2", "--repeats", "1",
                 "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][0]["classes"] == 8 and (tmp_path / "speed.csv").is_file()
    with pytest.raises(SystemExit):
        main(["bench", "speed", "--backbones", "lenet"])
    assert "unknown backbone 'lenet'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch"):
        speed.run(backbones=["mlp"], classes=[8], batch=0, out=None)


def test_bench_head_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "head", "--dim", "16", "--classes", "100", "--batch-size", "4", "--repeats", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"all_ms", "slc_ms", "speedup"}
    assert out["all_ms"] > 0 and out["slc_ms"] > 0
    assert out["speedup"] == pytest.approx(out["all_ms"] / out["slc_ms"], rel=1e-3)
    assert main(["bench", "head", "--dim", "16", "--classes", "100", "--batch-size", "4", "--repeats", "1"]) == 0
    assert "speed-up" in capsys.readouterr().out


def test_bench_search_small(tmp_path: Path) -> None:
    from logitsep.search import paths

    paths.forget()
    result = bench_search.run(items=5000, dim=32, classes=20, queries=4, nlist=8, nprobes=(1, 8), repeats=1,
                              out=tmp_path / "search", tmp_dir=str(tmp_path))
    for key in ("items_per_s", "gb_per_s", "bandwidth_gb_per_s", "torch_ratio"):
        assert result[key] > 0
    # every exact path measured, with its ratios; the default search took the path measured fastest
    assert set(result["paths"]) == set(bench_search.exact_paths())
    assert all(v["torch_ratio"] > 0 and v["bandwidth_ratio"] > 0 for v in result["paths"].values())
    assert result["chosen_path"] in result["paths"] and result["chosen_batch_path"] in paths.BATCH_PATHS
    choice = next(c for c in paths.chosen() if c.kind == "single")
    assert choice.path == result["chosen_path"] == min(choice.seconds, key=choice.seconds.get)
    assert result["cpu"] and result["screened"] == (result["chosen_path"] == "screen")
    # the screen reads its float16 rows (33 × 2 bytes per item) plus at most 10% of the float32 rows
    screen = next(r for r in result["rows"] if r["method"] == "path screen")
    assert screen["items_per_s"] * 33 * 2 / 1e9 <= screen["gb_per_s"] <= screen["items_per_s"] * 33 * 2.4 / 1e9
    assert result["float32_scan_torch_ratio"] > 0 and result["float32_scan_bandwidth_ratio"] > 0
    ivf = {r["nprobe"]: r for r in result["rows"] if r["method"] == "ivf, one by one"}
    assert ivf[8]["recall_threshold"] == 1.0 and ivf[8]["recall_top_k"] == 1.0  # every list probed: exact
    assert ivf[8]["scanned_fraction"] == 1.0 and ivf[1]["scanned_fraction"] < 1.0
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["approximate"]["nlist"] == 8 and saved["items"] == 5000 and saved["rows"]
    assert (tmp_path / "search.png").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("logitsep-bench")] == []  # temp data removed


def test_bench_search_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "search", "--items", "2000", "--dim", "8", "--classes", "10", "--queries", "2",
                 "--nprobes", "1,2", "--repeats", "1", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"items_per_s", "gb_per_s", "bandwidth_gb_per_s", "torch_ratio"} <= set(out)
    assert {"cpu", "chosen_path", "paths"} <= set(out)
    assert (tmp_path / f"search-{bench_search.cpu_slug()}.csv").is_file()  # the CPU in the file name
    assert main(["bench", "search", "--items", "100", "--classes", "5", "--queries", "6", "--out",
                 str(tmp_path)]) == 2
    assert "queries" in capsys.readouterr().err


def test_bench_losses_small_writes_every_loss_with_paired_ratios(tmp_path: Path) -> None:
    from logitsep.bench import losses as bench_losses
    from logitsep.losses import LOSSES

    result = bench_losses.run(batch=8, k=12, rounds=3, out=str(tmp_path / "loss_speed"))
    rows = {r["loss"]: r for r in result["rows"]}
    assert set(rows) == set(LOSSES)
    for r in rows.values():
        assert r["rounds"] == 3 and r["ce_us"] > 0 and r["loss_us"] > 0
        assert 0 < r["ratio_q25"] <= r["ratio_to_ce"] <= r["ratio_q75"]
        assert r["meets_target"] is None or r["meets_target"] == (r["ratio_to_ce"] <= r["target"])
    for ext in ("csv", "json", "png"):
        assert (tmp_path / f"loss_speed.{ext}").stat().st_size > 0


def test_bench_losses_cli_refuses_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "losses", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
