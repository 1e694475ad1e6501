"""Training loop, checkpoints, resume, and the command line (on the small bundled digits data)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from logitsep.cli import main
from logitsep.data import load_dataset
from logitsep.losses import LOSSES
from logitsep.runs import load_run
from logitsep.train import TrainConfig, batch_indices, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_batches_are_a_function_of_seed_and_step():
    a = batch_indices(1000, 64, 37, seed=3)
    assert torch.equal(a, batch_indices(1000, 64, 37, seed=3))
    assert not torch.equal(a, batch_indices(1000, 64, 37, seed=4))
    epoch = torch.cat([batch_indices(1000, 100, s, seed=0) for s in range(10)])
    assert sorted(epoch.tolist()) == list(range(1000))  # one epoch visits every example once


def test_training_learns_digits(digits, tmp_path):
    config = TrainConfig(dataset="digits", loss="batch_ce", steps=150, lr=0.1, batch_size=64)
    _, result = train(config, data=digits, out=tmp_path, progress=False, eval_splits=("valid", "test"))
    assert result["test"]["accuracy"] > 0.85  # chance is 0.1
    assert result["test"]["pooled_auroc"] > 0.95
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"]["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 150
    assert not list(tmp_path.glob("*.tmp")), "temporary files must be renamed, never left behind"


def test_resume_gives_the_same_weights_as_one_run(digits, tmp_path):
    """20 steps, stop, resume to 40 == 40 steps at once (constant schedule: the same rate either way)."""
    config = TrainConfig(dataset="digits", loss="ce", steps=40, lr=0.05, batch_size=32, seed=1, schedule="constant")
    train(config, data=digits, out=tmp_path / "once", progress=False, eval_splits=())
    short = TrainConfig(**{**config.__dict__, "steps": 20})
    train(short, data=digits, out=tmp_path / "resumed", progress=False, eval_splits=())
    half = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    train(config, data=digits, out=tmp_path / "resumed", resume=True, progress=False, eval_splits=())
    one = load_file(str(tmp_path / "once" / "model.safetensors"))
    two = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.allclose(half["head.weight"], two["head.weight"])  # the resumed run did train further


def test_resume_without_checkpoint_is_refused(digits, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TrainConfig(dataset="digits", steps=5), data=digits, out=tmp_path, resume=True, progress=False)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'cross_entropy'; valid names"):
        TrainConfig(loss="cross_entropy").validate()
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0).validate()
    with pytest.raises(ValueError, match="lr must be a positive"):
        TrainConfig(lr=-1.0).validate()


def test_cli_losses_lists_the_registry(capsys):
    assert main(["losses", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(LOSSES)
    assert {r["name"]: r["pols_aligned"] for r in rows}["batch_ce"] is True
    assert main(["losses"]) == 0
    table = capsys.readouterr().out
    assert "batch_max_margin" in table and "PoLS-aligned" in table


@pytest.mark.parametrize("argv", [
    ["train", "--dataset", "digits", "--loss", "softmax", "--out", "x"],
    ["train", "--dataset", "imagenet", "--loss", "ce", "--out", "x"],
    ["reproduce", "table1", "--dataset", "digits", "--losses", "ce,hinge", "--out", "x"],
])
def test_cli_unknown_names_exit_2_with_the_valid_names(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "batch_ce" in err or "mnist" in err


def test_cli_train_then_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--loss", "bce", "--steps", "60", "--batch-size", "64",
                 "--lr", "0.1", "--out", str(out)]) == 0
    assert "single logit" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    assert evaluated["auprc"] == pytest.approx(saved["test"]["auprc"])  # the checkpoint is the trained model
    run = load_run(out)
    assert run.config.loss == "bce" and run.step == 60 and run.spec.loss == "bce"


def test_cli_reproduce_writes_table_files(tmp_path, capsys):
    assert main(["reproduce", "table1", "--dataset", "digits", "--losses", "ce,batch_ce", "--steps", "40",
                 "--lrs", "0.1,0.01", "--batch-size", "64", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "table1.json").read_text())
    assert [r["loss"] for r in rows] == ["ce", "batch_ce"]
    keys = {"loss", "pols_aligned", "lr", "auprc", "precision@0.9", "precision@0.99", "pooled_auprc",
            "pooled_auroc", "accuracy"}
    assert all(keys <= set(r) for r in rows)
    assert all(r["lr"] in (0.1, 0.01) for r in rows)
    md = (tmp_path / "table1.md").read_text()
    assert "mean relative improvement" in md and "Command:" in md
    assert (tmp_path / "table1.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_prints_the_paper_table_on_real_mnist(capsys):
    assert main(["demo", "--steps", "150"]) == 0
    out = capsys.readouterr().out
    assert "1−AUPRC" in out and "mean relative improvement" in out
    assert "batch_ce" in out and "ce with all" in out.lower()


def test_threads_option_sets_torch_threads(tmp_path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the suite runs on one thread: start elsewhere so the option has to act
        assert main(["train", "--dataset", "digits", "--loss", "ce", "--steps", "3", "--threads", "1",
                     "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["demo", "--threads", "-1"])
