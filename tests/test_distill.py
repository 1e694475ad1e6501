"""Distillation (losses.distill, train.distill, ``logitsep distill``): each objective against a slow float64 loop,
gradcheck, the discriminator's sign and targets pinned, zero loss where the teacher equals the student, exact
resume (with meal_v2's discriminator) and head-only refits that leave the features bit for bit."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from logitsep.cli import main
from logitsep.losses.distill import (
    Discriminator,
    discriminator_loss,
    kd_loss,
    logit_match_loss,
    meal_v2_soft_loss,
    objective_loss,
)
from logitsep.train import TrainConfig, distill, train


def softmax_row(z: list[float], t: float = 1.0) -> list[float]:
    m = max(v / t for v in z)
    e = [math.exp(v / t - m) for v in z]
    return [v / sum(e) for v in e]


def kd_loop(s: torch.Tensor, teachers: list[torch.Tensor], t: float) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        ps = [softmax_row(tt[i].tolist(), t) for tt in teachers]
        p = [sum(col) / len(ps) for col in zip(*ps, strict=True)]
        q = softmax_row(s[i].tolist(), t)
        total += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q, strict=True) if pj > 0)
    return t * t * total / s.shape[0]


def soft_ce_loop(s: torch.Tensor, teachers: list[torch.Tensor]) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        ps = [softmax_row(tt[i].tolist()) for tt in teachers]
        p = [sum(col) / len(ps) for col in zip(*ps, strict=True)]
        q = softmax_row(s[i].tolist())
        total -= sum(pj * math.log(qj) for pj, qj in zip(p, q, strict=True))
    return total / s.shape[0]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(5, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    teachers = [3 * torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    return s, teachers


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_against_a_loop(logits, t: float) -> None:
    s, teachers = logits
    assert float(kd_loss(s, teachers, t).detach()) == pytest.approx(kd_loop(s.detach(), teachers, t), rel=1e-12)
    assert torch.autograd.gradcheck(lambda z: kd_loss(z, teachers, t), (s,))


def test_logit_match_and_soft_ce_against_loops(logits) -> None:
    s, teachers = logits
    mean = [[sum(tt[i, j].item() for tt in teachers) / 3 for j in range(7)] for i in range(5)]
    mse = sum((s[i, j].item() - mean[i][j]) ** 2 for i in range(5) for j in range(7)) / 35
    assert float(logit_match_loss(s, teachers).detach()) == pytest.approx(mse, rel=1e-12)
    assert float(meal_v2_soft_loss(s, teachers)) == pytest.approx(soft_ce_loop(s.detach(), teachers), rel=1e-12)
    assert torch.autograd.gradcheck(lambda z: logit_match_loss(z, teachers), (s,))
    assert torch.autograd.gradcheck(lambda z: meal_v2_soft_loss(z, teachers), (s,))


def test_discriminator_sign_and_targets_pinned() -> None:
    """Student logits are labelled [1, 0], the teachers' mean logits [0, 1]; BCE with logits, mean over 2n×2."""
    d = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        d[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    s = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    t1, t2 = torch.tensor([[0.0, 3.0, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64)

    def bce(x: float, y: float) -> float:
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    # student row -> outputs (2, -1), targets (1, 0); teachers' mean (1, 2, 1) -> outputs (1, 2), targets (0, 1)
    expected = (bce(2, 1) + bce(-1, 0) + bce(1, 0) + bce(2, 1)) / 4
    assert float(discriminator_loss(d, s, [t1, t2])) == pytest.approx(expected, rel=1e-12)
    swapped = (bce(2, 0) + bce(-1, 1) + bce(1, 1) + bce(2, 0)) / 4
    assert float(discriminator_loss(d, s, [t1, t2])) != pytest.approx(swapped)
    disc = Discriminator(10)
    assert disc(torch.randn(4, 10)).shape == (4, 2) and (disc(torch.randn(4, 10)) >= 0).all()  # MEAL V2's last ReLU


def test_teacher_equal_to_student(logits) -> None:
    s, _ = logits
    same = [s.detach().clone()]
    for loss in (kd_loss(s, same, 4.0), logit_match_loss(s, same)):
        assert float(loss) == pytest.approx(0.0, abs=1e-12)
        (g,) = torch.autograd.grad(loss, s)
        assert float(g.abs().max()) < 1e-12
    soft = meal_v2_soft_loss(s, same)  # its minimum: the entropy of the soft label, with zero gradient
    p = torch.softmax(s.detach(), -1)
    assert float(soft) == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-12)
    assert float(torch.autograd.grad(soft, s)[0].abs().max()) < 1e-12
    with pytest.raises(ValueError, match="discriminator"):
        objective_loss("meal_v2", s, same)
    with pytest.raises(ValueError, match="unknown distillation"):
        objective_loss("fitnet", s, same)
    with pytest.raises(ValueError, match="teacher logits must be"):
        kd_loss(s, [torch.zeros(5, 6)])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = []
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"teacher{seed}")
        train(TrainConfig(dataset="digits", loss="ce", steps=120, lr=0.1, batch_size=64, seed=seed), out=d,
              progress=False, eval_splits=())
        out.append(d)
    return out


def test_meal_v2_resume_is_exact(teachers: list[Path], tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    kw = {"objective": "meal_v2", "steps": 60, "lr": 0.05, "batch_size": 32, "progress": False,
          "schedule": "constant"}  # a run of 30 steps, resumed to 60, takes the steps of one run of 60
    distill([str(t) for t in teachers], "batch_ce", out=whole, **kw)
    distill([str(t) for t in teachers], "batch_ce", out=split, **{**kw, "steps": 30})
    ckpt = load_file(str(split / "checkpoint.safetensors"))
    assert any(k.startswith("disc/") for k in ckpt) and not any("disc" in k for k in load_file(
        str(split / "model.safetensors")))
    distill([str(t) for t in teachers], "batch_ce", out=split, resume=True, **kw)
    a, b = load_file(str(whole / "checkpoint.safetensors")), load_file(str(split / "checkpoint.safetensors"))
    for key in a:
        if not key.startswith("rng/"):
            assert torch.equal(a[key], b[key]), key
    config = json.loads((whole / "state.json").read_text())["config"]
    assert config["teachers"] == [str(t) for t in teachers] and config["objective"] == "meal_v2"


def test_head_only_keeps_the_features(teachers: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "head"
    distill(str(teachers[0]), "batch_ce", out=out, head_only=True, steps=40, lr=0.01, batch_size=32, progress=False)
    before, after = load_file(str(teachers[0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key in before:
        if key.startswith("head."):
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key  # weights and batch-norm statistics


def test_distill_refuses_bad_settings(teachers: list[Path], tmp_path: Path) -> None:
    t = str(teachers[0])
    for kwargs, err, match in [
        ({"objective": "fitnet"}, ValueError, "unknown distillation"),
        ({"objective": "kd", "alpha": -1.0}, ValueError, "alpha"),
        ({"objective": "", "alpha": 0.0, "head_only": True}, ValueError, "no loss"),
        ({"objective": "kd", "temperature": 0.0}, ValueError, "temperature"),
        ({"objective": "kd", "dataset": "mnist"}, ValueError, "teacher"),
        ({"objective": "kd", "head_only": True, "model": "linear"}, ValueError, "teacher's"),
    ]:
        with pytest.raises(err, match=match):
            distill(t, "batch_ce", out=tmp_path / "x", steps=2, progress=False, **kwargs)
    with pytest.raises(ValueError, match="without an objective"):
        TrainConfig(teachers=[t]).validate()
    with pytest.raises(ValueError, match="needs at least one teacher"):
        TrainConfig(objective="kd").validate()


def test_cli_distill(teachers: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "student"
    args = ["distill", "--teacher", str(teachers[0]), "--teacher", str(teachers[1]), "--loss", "batch_ce",
            "--objective", "kd", "--steps", "20", "--lr", "0.05", "--out", str(out), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["objective"] == "kd" and result["steps"] == 20 and "test" in result
    assert (out / "thresholds.json").is_file() and (out / "model.json").is_file()
    shutil.rmtree(out)
    assert main(["distill", "--teacher", str(tmp_path / "nope"), "--loss", "batch_ce", "--objective", "kd",
                 "--out", str(out)]) == 2
