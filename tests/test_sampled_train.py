"""Sampled training (TrainConfig.sampled, --sampled): exact at full coverage, resumable, refused where undefined."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from logitsep.cli import main
from logitsep.data import Splits
from logitsep.train import TrainConfig, train

K, D = 300, 12


@pytest.fixture(scope="module")
def many() -> Splits:
    """300 classes of Gaussian blobs in 12 dimensions: features for --model linear."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(K, D, generator=g) * 2

    def split(n):
        y = torch.randint(K, (n,), generator=g)
        return centres[y] + torch.randn(n, D, generator=g), y

    (tx, ty), (vx, vy), (sx, sy) = split(3000), split(600), split(600)
    return Splits("blobs", tx, ty, vx, vy, sx, sy, K, input_kind="features")


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def test_full_coverage_trains_as_the_exact_loss(many):
    exact = TrainConfig(dataset="blobs", model="linear", loss="bce", steps=15, lr=0.2, batch_size=64, seed=1)
    m1, _ = train(exact, data=many, progress=False, eval_splits=())
    m2, _ = train(dataclasses.replace(exact, sampled=K), data=many, progress=False, eval_splits=())
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_sampled_training_moves_only_sampled_rows_per_step(many):
    config = TrainConfig(dataset="blobs", model="linear", loss="nce", steps=1, lr=0.5, batch_size=8, seed=2,
                         sampled=5)
    torch.manual_seed(config.seed)
    from logitsep.models import build_model

    before = build_model("linear", (D,), K, head="linear").head.weight.detach().clone()
    model, _ = train(config, data=many, progress=False, eval_splits=())
    moved = int((model.head.weight.detach() != before).any(dim=1).sum())
    assert 0 < moved <= 8 + 5  # the batch's classes and the drawn ones, not all 300


@pytest.mark.parametrize("loss", ["nce", "batch_ce"])
def test_sampled_resume_is_exact(many, tmp_path, loss):
    config = TrainConfig(dataset="blobs", model="linear", loss=loss, steps=16, lr=0.1, batch_size=32, seed=3,
                         sampled=40, schedule="constant")
    kwargs = dict(data=many, progress=False, eval_splits=())
    train(config, out=tmp_path / "once", **kwargs)
    train(dataclasses.replace(config, steps=8), out=tmp_path / "two", **kwargs)
    train(config, out=tmp_path / "two", resume=True, **kwargs)
    a, b = _weights(tmp_path / "once"), _weights(tmp_path / "two")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_old_checkpoints_without_the_field_still_resume(many, tmp_path):
    config = TrainConfig(dataset="blobs", model="linear", loss="bce", steps=4, lr=0.1, batch_size=32)
    train(config, data=many, out=tmp_path, progress=False, eval_splits=())
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["config"]["sampled"] == 0
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "checkpoint.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["config"])
    del saved["sampled"]  # as written before the field existed
    meta["config"] = json.dumps(saved)
    save_file(tensors, str(tmp_path / "checkpoint.safetensors"), metadata=meta)
    train(dataclasses.replace(config, steps=6), data=many, out=tmp_path, resume=True, progress=False, eval_splits=())


def test_sampled_is_refused_where_undefined():
    with pytest.raises(ValueError, match="loss 'ce' has no sampled form"):
        TrainConfig(loss="ce", sampled=10).validate()
    with pytest.raises(ValueError, match="sampled must be"):
        TrainConfig(loss="nce", sampled=-1).validate()


def test_cli_trains_sampled_on_an_arrays_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(K, D)).astype(np.float32) * 2
    y = rng.integers(0, K, 2000)
    np.save(tmp_path / "train_x.npy", centres[y] + rng.normal(size=(2000, D)).astype(np.float32))
    np.save(tmp_path / "train_y.npy", y.astype(np.int64))
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), "--model", "linear", "--loss", "batch_ce", "--sampled", "64",
                 "--steps", "30", "--warmup", "5", "--batch-size", "64", "--out", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["sampled"] == 64 and result["config"]["warmup"] == 5
    assert result["test"]["accuracy"] > 1 / K


def test_training_brings_the_candidate_rows_up_to_date_before_each_forward(many, tmp_path, monkeypatch):
    from logitsep.losses.sampled import SampledLoss
    from logitsep.optim import RowSparseSGD

    events: list[tuple[str, tuple[int, ...], list[int]]] = []
    catch_up, forward = RowSparseSGD.catch_up, SampledLoss.forward

    def logged_catch_up(self, param, rows=None):
        events.append(("catch_up", tuple(param.shape), [] if rows is None else sorted(rows.tolist())))
        return catch_up(self, param, rows)

    def logged_forward(self, h, weight, bias, target, candidates=None):
        events.append(("forward", tuple(weight.shape), sorted(candidates.classes.tolist())))
        return forward(self, h, weight, bias, target, candidates=candidates)

    monkeypatch.setattr(RowSparseSGD, "catch_up", logged_catch_up)
    monkeypatch.setattr(SampledLoss, "forward", logged_forward)
    config = TrainConfig(dataset="blobs", model="linear", loss="nce", steps=6, lr=0.1, batch_size=16, seed=4,
                         sampled=30)
    train(config, data=many, out=tmp_path, progress=False, eval_splits=(), checkpoint_every=3)
    forwards = [i for i, e in enumerate(events) if e[0] == "forward"]
    assert len(forwards) == config.steps
    for i in forwards:  # the head's weight and bias rows of exactly these candidates, just before
        assert events[i - 2] == ("catch_up", (K, D), events[i][2])
        assert events[i - 1] == ("catch_up", (K,), events[i][2])
    # model.safetensors holds the caught-up head (dense SGD's); the checkpoint the head as the optimizer left it
    # (its rows touched at the last step agree, the others still wait for their momentum)
    checkpoint, model = load_file(str(tmp_path / "checkpoint.safetensors")), _weights(tmp_path)
    last = next(v for key, v in checkpoint.items() if key.startswith("optimizer/") and key.endswith("/last_step")
                and v.shape == (K,))
    current = last == config.steps - 1
    assert 0 < int(current.sum()) < K
    saved, kept = model["head.weight"], checkpoint["model/head.weight"]
    assert torch.equal(saved[current], kept[current])
    assert not torch.equal(saved[~current], kept[~current])
