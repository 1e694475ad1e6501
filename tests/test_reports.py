"""`logitsep reproduce table1|table2` (paper Tables I and II) on the small bundled digits data, and the report
helpers they use: precision-recall points against scikit-learn, the paper layout, the relative-improvement row
recomputed by hand from the JSON."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from logitsep.cli import build_parser, main
from logitsep.core.keys import ROW_KEYS
from logitsep.experiments import (
    PAPER_IMPROVEMENT,
    PAPER_TABLE1,
    PAPER_TABLE2,
    reproduce_command,
    reusable_runs,
)
from logitsep.experiments.report import pr_curve, precision_at_recalls, table1_markdown, table2_markdown
from logitsep.metrics import slc_metrics

LOSSES = ["ce", "batch_ce", "bce"]  # one non-aligned loss, two aligned ones
ARGS = ["--dataset", "digits", "--losses", ",".join(LOSSES), "--steps", "20", "--lrs", "0.1,0.01"]
ROW_FIELDS = {"loss", "pols_aligned", "lr", "auprc", "precision@0.9", "precision@0.99", "pooled_auprc",
              "pooled_auroc", "accuracy"}


def _md_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row of ``text`` (separator rows left out)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def _hand_improvement(rows: list[dict], key: str) -> float:
    """(mean over non-aligned − mean over aligned) / mean over non-aligned of 1 − metric, with plain loops."""
    non, al = [], []
    for r in rows:
        (al if r["pols_aligned"] else non).append(1.0 - r[key])
    mean_non, mean_al = sum(non) / len(non), sum(al) / len(al)
    return (mean_non - mean_al) / mean_non


# ---------------------------------------------------------------------------------------------------------
# helpers, against references written differently
# ---------------------------------------------------------------------------------------------------------

def test_pr_curve_matches_sklearn_with_ties():
    import sklearn.metrics as sk
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 40, 500).astype(np.float64)  # many ties
    positive = rng.random(500) < 0.3
    recall, precision = pr_curve(scores, positive)
    p_ref, r_ref, thresholds = sk.precision_recall_curve(positive, scores)
    # scikit-learn: increasing thresholds, plus a final (precision 1, recall 0) point; ours: decreasing thresholds
    n = len(thresholds)
    np.testing.assert_allclose(recall[-n:], r_ref[:-1][::-1])
    np.testing.assert_allclose(precision[-n:], p_ref[:-1][::-1])
    assert len(recall) == len(np.unique(scores))  # one point per distinct threshold
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx(positive.mean())


def test_precision_at_recalls_gives_back_slc_metrics():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 6, 300)
    scores = rng.normal(size=(300, 6)) + 2.0 * np.eye(6)[target]
    scores[:, 2] = np.round(scores[:, 2])  # ties in one column
    table = precision_at_recalls(scores, target, [0.9, 0.99])
    metrics = slc_metrics(scores, target)
    assert np.nanmean(table[:, 0]) == pytest.approx(metrics["precision@0.9"], abs=1e-12)
    assert np.nanmean(table[:, 1]) == pytest.approx(metrics["precision@0.99"], abs=1e-12)
    # brute force for one class and one level: the highest threshold whose recall reaches 0.9
    c, pos = 3, target == 3
    best = max(t for t in scores[:, c] if (scores[pos, c] >= t).mean() >= 0.9)
    assert table[c, 0] == pytest.approx(pos[scores[:, c] >= best].mean(), abs=1e-12)


def test_pr_helpers_refuse_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        pr_curve(np.zeros((3, 2)), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="positive"):
        pr_curve(np.arange(4.0), np.zeros(4, bool))
    with pytest.raises(ValueError, match="NaN"):
        pr_curve(np.array([0.0, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        precision_at_recalls(np.zeros(5), np.zeros(5, int), [0.5])


def test_table1_layout_with_the_papers_mnist_numbers():
    """Groups in the paper's order, the paper's numbers beside ours, "—" where it has none (binary CE)."""
    fake = [{"loss": name, "pols_aligned": aligned, "lr": 0.1, "auprc": 0.99, "precision@0.9": 0.98,
             "precision@0.99": 0.8, "pooled_auprc": 0.99, "pooled_auroc": 0.999, "accuracy": 0.98}
            for name, aligned in (("batch_ce", True), ("ce", False), ("bce", True), ("max_margin", False))]
    fake[0]["auprc"] = 0.995
    cells = _md_rows(table1_markdown(fake, PAPER_TABLE1["mnist"], PAPER_IMPROVEMENT["mnist"]))
    names = [row[0] for row in cells]
    assert names == ["loss", "**not PoLS-aligned**", "ce", "max_margin", "**PoLS-aligned**", "batch_ce", "bce",
                     "mean relative improvement"]
    ce = cells[names.index("ce")]
    assert ce[1:7] == ["0.0100", "0.008", "0.0200", "0.005", "0.2000", "0.203"]
    assert cells[names.index("bce")][2] == "—"
    assert cells[-1][1:7] == ["25.0%", "82.0%", "0.0%", "91.3%", "0.0%", "88.4%"]  # (.01 − .0075) / .01


def test_table2_layout_with_the_papers_mnist_numbers():
    metrics = {"auprc": 0.99, "precision@0.9": 0.995, "precision@0.99": 0.9}
    summary = [{"method": "batch CE (SLC)", **metrics}, {"method": "CE with all logits", **metrics}]
    per_loss = [{"loss": "ce", "pols_aligned": False, "lr": 0.1, "single_logit": metrics,
                 "all_logits": {**metrics, "auprc": 0.999}}]
    cells = _md_rows(table2_markdown(summary, per_loss, PAPER_TABLE2["mnist"]))
    assert cells[2] == ["CE with all logits", "0.0100", "0.001", "0.0050", "0.000", "0.1000", "0.020"]
    assert cells[4][:5] == ["ce", "no", "0.1", "0.0100", "0.0010"]  # single logit, then all logits


# ---------------------------------------------------------------------------------------------------------
# the commands, end to end on digits
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def table1_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    assert main(["reproduce", "table1", *ARGS, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_table1_files(table1_dir):
    rows = json.loads((table1_dir / "table1.json").read_text())
    assert [r["loss"] for r in rows] == LOSSES
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["lr"] in (0.1, 0.01) and r["steps"] == 20 and r["dataset"] == "digits"
        assert all(0.0 <= r[k] <= 1.0 for k in ROW_KEYS)  # metric values, not 1 − metric
        assert r["accuracy"] > 0.5  # trained (chance is 0.1)
    assert {r["loss"]: r["pols_aligned"] for r in rows} == {"ce": False, "batch_ce": True, "bce": True}

    with open(table1_dir / "table1.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["loss"] for r in csv_rows] == LOSSES
    for c, j in zip(csv_rows, rows, strict=True):
        assert float(c["auprc"]) == pytest.approx(j["auprc"], abs=1e-12)
        assert float(c["all_logits.auprc"]) == pytest.approx(j["all_logits"]["auprc"], abs=1e-12)

    labels = np.load(table1_dir / "scores" / "labels.npy", allow_pickle=False)
    for r in rows:  # the saved test scores are the selected run's: they give back its metrics
        s = np.load(table1_dir / "scores" / f"{r['loss']}.npy", allow_pickle=False)
        assert s.shape == (len(labels), 10) and s.dtype == np.float32
        assert slc_metrics(s, labels)["auprc"] == pytest.approx(r["auprc"], abs=1e-12)
    for name in ("table1.png", "table1_logits.png", "table1_pr.png"):
        data = (table1_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not list(table1_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_table1_markdown_layout_and_improvement_row(table1_dir):
    rows = json.loads((table1_dir / "table1.json").read_text())
    text = (table1_dir / "table1.md").read_text()
    cells = _md_rows(text)
    names = [row[0] for row in cells]
    assert names == ["loss", "**not PoLS-aligned**", "ce", "**PoLS-aligned**", "batch_ce", "bce",
                     "mean relative improvement"]
    header = cells[0]
    assert header[1:7] == ["1−AUPRC", "paper", "1−P@0.9", "paper", "1−P@0.99", "paper"]
    by_loss = {r["loss"]: r for r in rows}
    for row in cells:
        if row[0] in by_loss:
            r = by_loss[row[0]]
            assert row[1] == f"{1 - r['auprc']:.4f}" and row[5] == f"{1 - r['precision@0.99']:.4f}"
            assert row[2] == row[4] == row[6] == "—"  # the paper has no digits numbers
            assert row[-1] == f"{r['lr']:g}"
    improvement = cells[-1]
    for column, key in zip((1, 3, 5), ("auprc", "precision@0.9", "precision@0.99"), strict=True):
        assert improvement[column] == f"{100 * _hand_improvement(rows, key):.1f}%", key
    # how it was made
    command = re.search(r"Command: `([^`]+)`", text).group(1)
    assert command.startswith("logitsep reproduce table1 --dataset digits")
    parsed = build_parser().parse_args(shlex.split(command)[1:])
    assert (parsed.steps, parsed.lrs, parsed.losses) == (20, "0.1,0.01", ",".join(LOSSES))
    assert "Steps: 20 per run" in text and "Learning-rate grid: 0.1, 0.01" in text
    assert "Chosen: " + ", ".join(f"{r['loss']}={r['lr']:g}" for r in rows) in text
    assert "Machine: " in text and "Date: 20" in text
    for name in ("table1_logits.png", "table1_pr.png", "table1.png"):
        assert f"]({name})" in text


@pytest.mark.slow
def test_table2_reuses_table1_runs_and_retrains_a_stale_one(table1_dir):
    rows1 = {r["loss"]: r for r in json.loads((table1_dir / "table1.json").read_text())}
    assert main(["reproduce", "table2", *ARGS, "--out", str(table1_dir)]) == 0
    text = (table1_dir / "table2.md").read_text()
    assert "Runs: reused from table1.json" in text and "trained here" not in text
    rows = json.loads((table1_dir / "table2.json").read_text())
    layout = {r["method"]: r for r in rows if r["group"] == "paper_layout"}
    assert list(layout) == ["Mean PoLS methods (SLC)", "batch CE (SLC)", "CE with all logits"]
    for key in ROW_KEYS:
        assert layout["Mean PoLS methods (SLC)"][key] == pytest.approx(
            (rows1["batch_ce"][key] + rows1["bce"][key]) / 2, abs=1e-12)
        assert layout["batch CE (SLC)"][key] == pytest.approx(rows1["batch_ce"][key], abs=1e-12)
        # softmax over all logits, recomputed from the saved scores = what training measured
        assert layout["CE with all logits"][key] == pytest.approx(rows1["ce"]["all_logits"][key], abs=1e-9)
    per_loss = [r for r in rows if r["group"] == "per_loss"]
    assert [(r["loss"], r["scoring"]) for r in per_loss] == [
        (loss, s) for loss in LOSSES for s in ("single logit", "all logits")]
    assert all(ROW_FIELDS <= set(r) for r in per_loss)
    cells = _md_rows(text)
    assert [c[0] for c in cells[:4]] == ["method", "Mean PoLS methods (SLC)", "batch CE (SLC)", "CE with all logits"]
    assert cells[3][1] == f"{1 - rows1['ce']['all_logits']['auprc']:.4f}" and cells[3][2] == "—"
    assert "Command: `logitsep reproduce table2 --dataset digits" in text and "Machine: " in text
    assert (table1_dir / "table2.png").read_bytes()[:4] == b"\x89PNG"
    with open(table1_dir / "table2.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)

    # scores that do not give back table1.json's metrics are not trusted: that loss is trained again
    labels = np.load(table1_dir / "scores" / "labels.npy")
    np.save(table1_dir / "scores" / "ce.npy", np.eye(10, dtype=np.float32)[(labels + 1) % 10])
    assert main(["reproduce", "table2", *ARGS, "--out", str(table1_dir)]) == 0
    text = (table1_dir / "table2.md").read_text()
    assert "reused from table1.json (same settings; its saved test scores give back its metrics) for " \
           "batch_ce, bce; trained here for ce." in text


def test_reusable_runs_skips_other_settings_and_corrupt_files(tmp_path):
    target = np.array([0, 1, 2, 1])
    scores = np.eye(3, dtype=np.float32)[target] + 0.1
    settings = {"dataset": "digits", "model": "mlp", "steps": 30, "lr_grid": [0.1], "batch_size": 128, "seed": 0,
                "train_split": "train"}
    row = {"loss": "ce", "pols_aligned": False, "lr": 0.1, **slc_metrics(scores, target), **settings}
    (tmp_path / "scores").mkdir()
    np.save(tmp_path / "scores" / "labels.npy", target)
    np.save(tmp_path / "scores" / "ce.npy", scores)
    (tmp_path / "table1.json").write_text(json.dumps([row]))
    logs: list[str] = []
    # a row written before weight decay was recorded was made without it
    settings = {**settings, "weight_decay": 0.0}
    assert set(reusable_runs(tmp_path, settings, ["ce"], target, log=logs.append)) == {"ce"}
    assert reusable_runs(tmp_path, {**settings, "weight_decay": 5e-4}, ["ce"], target, log=logs.append) == {}
    assert reusable_runs(tmp_path, {**settings, "steps": 31}, ["ce"], target, log=logs.append) == {}
    assert reusable_runs(tmp_path, settings, ["bce"], target, log=logs.append) == {}
    assert reusable_runs(tmp_path, settings, ["ce"], target[::-1].copy(), log=logs.append) == {}
    (tmp_path / "scores" / "ce.npy").write_bytes(b"not an npy file")
    assert reusable_runs(tmp_path, settings, ["ce"], target, log=logs.append) == {}
    (tmp_path / "table1.json").write_text("[{")
    assert reusable_runs(tmp_path, settings, ["ce"], target, log=logs.append) == {}
    assert any("table1.json" in line for line in logs)
    assert reusable_runs(tmp_path / "nothing", settings, ["ce"], target) == {}


def test_reproduce_command_round_trips_through_the_parser():
    settings = {"dataset": "fashion_mnist", "model": "mlp", "steps": 4000, "lr_grid": [1.0, 0.1, 0.01, 0.001],
                "batch_size": 128, "seed": 0}
    command = reproduce_command("table2", settings, ["ce", "nce"], "results/fashion-mnist")
    assert command == ("logitsep reproduce table2 --dataset fashion_mnist --model mlp --losses ce,nce --steps 4000 "
                       "--lrs 1,0.1,0.01,0.001 --batch-size 128 --seed 0 --out results/fashion-mnist")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.table, args.dataset, args.out) == ("table2", "fashion_mnist", "results/fashion-mnist")


def test_reproduce_command_names_weight_decay_and_jobs_only_when_set():
    settings = {"dataset": "mnist", "model": "mlp", "steps": 100, "lr_grid": [0.1], "batch_size": 128, "seed": 1,
                "weight_decay": 5e-4}
    command = reproduce_command("table1", settings, ["ce"], "out", jobs=2)
    assert "--seed 1 --weight-decay 0.0005 --jobs 2 --out out" in command
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert (args.weight_decay, args.jobs) == (5e-4, 2)
    plain = reproduce_command("table1", {**settings, "weight_decay": 0.0}, ["ce"], "out")
    assert "--weight-decay" not in plain and "--jobs" not in plain


@pytest.mark.slow
def test_grid_in_worker_processes_equals_the_grid_in_one_process():
    import torch

    from logitsep.data import load_dataset
    from logitsep.experiments import Grid, run_losses

    data = load_dataset("digits")
    grid = Grid(dataset="digits", losses=("ce", "batch_ce"), steps=15, lrs=(0.1, 0.01), weight_decay=1e-3)
    kwargs = {"grid": grid, "data": data, "log": lambda s: None}
    labels_view, labels_copy = data.test_y.numpy(), data.test_y.numpy().copy()  # a view taken before, as table2 does
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # each of the two workers then gets one thread, like the single process below
    try:
        scores_pool: dict = {}
        pooled = run_losses(**kwargs, test_scores=scores_pool, jobs=2)
        # sending the data to the workers leaves the parent's tensors where they were
        assert not data.test_y.is_shared() and np.array_equal(labels_view, labels_copy)
        torch.set_num_threads(1)
        scores_one: dict = {}
        single = run_losses(**kwargs, test_scores=scores_one, jobs=1)
    finally:
        torch.set_num_threads(threads)
    assert [r["loss"] for r in pooled] == ["ce", "batch_ce"]
    for a, b in zip(pooled, single, strict=True):
        assert a["lr"] == b["lr"] and a["weight_decay"] == b["weight_decay"] == 1e-3
        assert a["valid_accuracy"] == b["valid_accuracy"]
        for key in ROW_KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-9)
        np.testing.assert_allclose(scores_pool[a["loss"]], scores_one[a["loss"]], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        run_losses(**kwargs, jobs=0)


def test_reproduce_refuses_bad_weight_decay_and_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "table1", *ARGS, "--weight-decay", "-1", "--out", str(tmp_path)])
    assert "--weight-decay must be a non-negative number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "table2", *ARGS, "--jobs", "0", "--out", str(tmp_path)])
    assert "--jobs must be >= 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_reproduce_refuses_unknown_losses_and_bad_rates(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "table1", "--dataset", "digits", "--losses", "ce,nope", "--out", str(tmp_path)])
    assert "unknown loss 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "table2", "--dataset", "digits", "--lrs", "0.1,-1", "--out", str(tmp_path)])
    assert "--lrs must be positive" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_alignment_still_works(tmp_path):
    assert main(["reproduce", "alignment", "--dataset", "digits", "--losses", "ce,bce", "--steps", "20",
                 "--lrs", "0.1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "alignment.json").read_text())
    assert [r["loss"] for r in rows] == ["ce", "bce"]
    assert (tmp_path / "alignment.md").is_file() and (tmp_path / "alignment_logits.png").is_file()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_killed_grid_leaves_no_worker_training(tmp_path):
    """``reproduce --jobs 2`` killed with SIGKILL: its worker processes end too (they would train on otherwise)."""
    script = ("from logitsep.experiments import Grid, run_losses\n"
              "run_losses(Grid('digits', ('ce', 'bce'), 10**6, (0.1,)), log=lambda s: None, jobs=2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while len(workers := [c for c in _children(parent.pid)]) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(workers) >= 2, "the grid's workers did not start"
        time.sleep(3)  # they are training now
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.time() + 20
        while any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().rsplit(")", 1)[1][:3]
                  for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        alive = [w for w in workers if os.path.exists(f"/proc/{w}")
                 and "Z" not in open(f"/proc/{w}/stat").read().rsplit(")", 1)[1][:3]]
        assert alive == []
    finally:
        if parent.poll() is None:
            parent.kill()
