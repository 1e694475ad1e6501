"""The trainer: cached batch order, log.csv, exact resume (also after a SIGKILL), non-finite losses, TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

from logitsep import train as train_module
from logitsep.cli import main
from logitsep.data import Splits, load_dataset
from logitsep.train import TrainConfig, batch_indices, learning_rate, read_log, train


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits")


def _fresh_batch(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The reference: a new permutation of the epoch at every call (the trainer's behaviour before caching)."""
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[offset * batch_size:(offset + 1) * batch_size]


@pytest.mark.parametrize("n,batch_size,seed", [(1000, 64, 0), (97, 10, 5), (50, 64, 2), (128, 128, 1)])
def test_cached_batches_equal_fresh_permutations(n, batch_size, seed):
    per_epoch = max(n // batch_size, 1)
    for step in range(3 * per_epoch + 2):  # several epochs, so the cache is refilled
        assert torch.equal(batch_indices(n, batch_size, step, seed), _fresh_batch(n, batch_size, step, seed)), step


def test_cached_batches_are_copies():
    a = batch_indices(300, 30, 4, seed=9)
    expected = a.clone()
    a.fill_(-1)  # a caller writing into its batch must not change the cached epoch
    assert torch.equal(batch_indices(300, 30, 4, seed=9), expected)


def _same_weights(a_path, b_path, atol=1e-6):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def _log_rows(run):
    return [(r["step"], r["loss"], r["lr"]) for r in read_log(run)]


def test_log_rows_are_window_means(digits, tmp_path):
    """Rows every log_every steps and one at the end; each row's loss is the mean of that window's step losses
    (checked against a run that logs every step), lr the rate of the row's last step."""
    config = TrainConfig(dataset="digits", loss="ce", steps=23, lr=0.05, batch_size=32, seed=2)
    train(config, data=digits, out=tmp_path / "every", progress=False, eval_splits=(), log_every=1)
    train(config, data=digits, out=tmp_path / "five", progress=False, eval_splits=(), log_every=5)
    per_step = {r["step"]: r["loss"] for r in read_log(tmp_path / "every")}
    assert sorted(per_step) == list(range(1, 24))
    rows = read_log(tmp_path / "five")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 23]
    first = 1
    for row in rows:
        window = [per_step[s] for s in range(first, row["step"] + 1)]
        assert row["loss"] == pytest.approx(sum(window) / len(window), rel=1e-12, abs=0)
        assert row["lr"] == learning_rate(config, row["step"] - 1)
        first = row["step"] + 1
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(rows, rows[1:], strict=False))
    header = (tmp_path / "five" / "log.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,elapsed_s"


def test_cosine_schedule_is_the_formula_at_each_step():
    """η_s = lr·(1 + cos(π·s/steps))/2 for the 0-based step s (float64 reference written out), lr at step 0, half
    of it at the middle, 0 at ``steps``; constant stays lr."""
    config = TrainConfig(steps=8, lr=0.4)
    expected = [0.4 * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(9)]
    assert [learning_rate(config, s) for s in range(9)] == pytest.approx(expected, rel=1e-15, abs=1e-15)
    assert learning_rate(config, 0) == 0.4 and learning_rate(config, 4) == pytest.approx(0.2, rel=1e-15)
    assert learning_rate(config, 8) == pytest.approx(0.0, abs=1e-16)
    constant = TrainConfig(steps=8, lr=0.4, schedule="constant")
    assert {learning_rate(constant, s) for s in range(9)} == {0.4}


def test_warmup_is_linear_then_the_schedule():
    """η_s·(s + 1)/warmup for s < warmup (written out), the schedule's rate from step ``warmup`` on."""
    cosine = TrainConfig(steps=10, lr=0.3, warmup=4)
    plain = TrainConfig(steps=10, lr=0.3)
    rates = [learning_rate(cosine, s) for s in range(10)]
    assert rates[:4] == pytest.approx([learning_rate(plain, s) * (s + 1) / 4 for s in range(4)], rel=1e-15)
    assert rates[4:] == [learning_rate(plain, s) for s in range(4, 10)]
    assert learning_rate(cosine, 0) == pytest.approx(0.3 / 4, rel=1e-15)
    constant = TrainConfig(steps=10, lr=0.3, schedule="constant", warmup=3)
    assert [learning_rate(constant, s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3], rel=1e-15)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        TrainConfig(warmup=-1).validate()
    with pytest.raises(ValueError, match="longer than the run"):
        TrainConfig(steps=5, warmup=6).validate()


def test_each_step_uses_the_rate_of_its_own_index(digits, tmp_path, monkeypatch):
    """The optimizer steps with η_0, η_1, …, η_{steps-1} (read from the optimizer at each step, not from the log)."""
    used = []
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    config = TrainConfig(dataset="digits", loss="ce", steps=6, lr=0.3, batch_size=32, seed=1)
    train(config, data=digits, progress=False, eval_splits=())
    assert used == pytest.approx([0.3 * (1 + math.cos(math.pi * s / 6)) / 2 for s in range(6)], rel=1e-15)


class _Stop(Exception):
    pass


def test_resume_after_interrupt_matches_uninterrupted_log_and_weights(digits, tmp_path, monkeypatch):
    """Interrupted after the row of step 20 with the last checkpoint at 14: the resumed run drops rows 15 and 20
    (and a line cut short), rewrites them, and ends with the log and weights of an uninterrupted run."""
    config = TrainConfig(dataset="digits", loss="batch_ce", steps=30, lr=0.05, batch_size=32, seed=4)
    kwargs = dict(data=digits, progress=False, eval_splits=(), log_every=5, checkpoint_every=7)
    train(config, out=tmp_path / "once", **kwargs)

    append = train_module.RunLog.append

    def append_then_stop(self, row):
        append(self, row)
        if row["step"] == 20:
            raise _Stop

    monkeypatch.setattr(train_module.RunLog, "append", append_then_stop)
    with pytest.raises(_Stop):
        train(config, out=tmp_path / "resumed", **kwargs)
    monkeypatch.undo()
    run = tmp_path / "resumed"
    assert json.loads((run / "state.json").read_text())["step"] == 14
    assert [r[0] for r in _log_rows(run)] == [5, 10, 15, 20]
    with (run / "log.csv").open("a") as f:
        f.write("25,0.3")  # a line a kill cut short
    train(config, out=run, resume=True, **kwargs)
    assert _log_rows(run) == _log_rows(tmp_path / "once")
    _same_weights(tmp_path / "once" / "model.safetensors", run / "model.safetensors")


def test_extending_a_finished_run_matches_one_longer_run(digits, tmp_path):
    """A run of 12 steps resumed to 20 (constant rate) == 20 steps at once, log included: the final row of the
    short run (step 12, a partial window) is dropped and its window continued."""
    config = TrainConfig(dataset="digits", loss="ce", steps=20, lr=0.05, batch_size=32, seed=1, schedule="constant")
    kwargs = dict(data=digits, progress=False, eval_splits=(), log_every=5)
    train(config, out=tmp_path / "once", **kwargs)
    train(dataclasses.replace(config, steps=12), out=tmp_path / "ext", **kwargs)
    assert [r[0] for r in _log_rows(tmp_path / "ext")] == [5, 10, 12]
    train(config, out=tmp_path / "ext", resume=True, **kwargs)
    assert _log_rows(tmp_path / "ext") == _log_rows(tmp_path / "once")
    _same_weights(tmp_path / "once" / "model.safetensors", tmp_path / "ext" / "model.safetensors")


def test_resume_restores_the_random_state(digits, tmp_path):
    """nce with sampled noise draws from torch's generator: resume must continue the same random stream."""
    config = TrainConfig(dataset="digits", loss="nce", loss_kwargs={"sampled": True, "num_noise": 3}, steps=16,
                         lr=0.05, batch_size=32, seed=6, schedule="constant")
    kwargs = dict(data=digits, progress=False, eval_splits=())
    train(config, out=tmp_path / "once", **kwargs)
    train(dataclasses.replace(config, steps=8), out=tmp_path / "two", **kwargs)
    train(config, out=tmp_path / "two", resume=True, **kwargs)
    _same_weights(tmp_path / "once" / "model.safetensors", tmp_path / "two" / "model.safetensors")


def test_resume_refuses_another_run_and_a_corrupt_checkpoint(digits, tmp_path):
    config = TrainConfig(dataset="digits", loss="ce", steps=5, batch_size=32)
    train(config, data=digits, out=tmp_path, progress=False, eval_splits=())
    other = dataclasses.replace(config, loss="bce", lr=0.3)
    with pytest.raises(ValueError, match=r"different run: loss='ce' in the checkpoint, 'bce' now; lr="):
        train(other, data=digits, out=tmp_path, resume=True, progress=False, eval_splits=())
    with pytest.raises(ValueError, match="at step 5, beyond steps=3"):
        train(dataclasses.replace(config, steps=3), data=digits, out=tmp_path, resume=True, progress=False)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train(config, data=digits, out=tmp_path, resume=True, progress=False, eval_splits=())


def test_bad_intervals_are_refused(digits, tmp_path, capsys):
    config = TrainConfig(dataset="digits", steps=5, batch_size=32)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        train(config, data=digits, out=tmp_path, checkpoint_every=0, progress=False)
    with pytest.raises(ValueError, match="log_every must be a positive integer"):
        train(config, data=digits, out=tmp_path, log_every=-3, progress=False)
    with pytest.raises(ValueError, match="momentum must be in"):
        TrainConfig(momentum=1.0).validate()
    assert main(["train", "--dataset", "digits", "--loss", "ce", "--steps", "5", "--checkpoint-every", "0",
                 "--out", str(tmp_path)]) == 2
    assert "logitsep: error: checkpoint_every must be a positive integer" in capsys.readouterr().err


def _with_nan_example(data: Splits, row: int) -> Splits:
    x = data.train_x.clone()
    x[row] = float("nan")
    return dataclasses.replace(data, train_x=x)


def _first_step_with(row: int, n: int, batch_size: int, seed: int) -> int:
    return next(s for s in range(10_000) if row in _fresh_batch(n, batch_size, s, seed).tolist())


def test_non_finite_logits_name_their_step_and_no_later_checkpoint_is_written(digits, tmp_path):
    """An input row of NaN: the logits of the first batch that holds it are NaN, the loss refuses them, and the
    trainer turns that into FloatingPointError naming that step."""
    data = _with_nan_example(digits, row=123)
    bad = _first_step_with(123, len(digits.train_x), 32, seed=0)
    config = TrainConfig(dataset="digits", loss="ce", steps=bad + 20, lr=0.05, batch_size=32)
    with pytest.raises(FloatingPointError, match=rf"logits became non-finite at step {bad} \(steps count from 0"):
        train(config, data=data, out=tmp_path, progress=False, eval_splits=(), checkpoint_every=3, log_every=50)
    if bad >= 3:
        assert json.loads((tmp_path / "state.json").read_text())["step"] == 3 * (bad // 3)
    assert not (tmp_path / "metrics.json").exists()


def test_a_non_finite_loss_is_found_at_the_next_flush_and_named_by_its_step(digits, tmp_path, monkeypatch):
    """Losses are copied to the host only every log_every steps or before a checkpoint; a NaN loss at step 7 is
    still reported as step 7, and the checkpoint due at step 9 is not written (the one at 6 is)."""
    calls = []
    batch_loss = train_module.distributed.batch_loss

    def nan_at_step_7(loss_fn, logits, target):
        calls.append(1)
        loss = batch_loss(loss_fn, logits, target)
        return loss * float("nan") if len(calls) == 8 else loss

    monkeypatch.setattr(train_module.distributed, "batch_loss", nan_at_step_7)
    config = TrainConfig(dataset="digits", loss="ce", steps=30, lr=0.05, batch_size=32)
    with pytest.raises(FloatingPointError, match=r"loss ce became nan at step 7 \(steps count from 0; lr="):
        train(config, data=digits, out=tmp_path, progress=False, eval_splits=(), checkpoint_every=3, log_every=50)
    assert len(calls) == 9  # found at the flush before the checkpoint of step 9
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 6
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_cli_reports_a_non_finite_loss_without_a_traceback(digits, tmp_path, monkeypatch, capsys):
    data = _with_nan_example(digits, row=7)
    bad = _first_step_with(7, len(digits.train_x), 64, seed=0)
    monkeypatch.setattr(train_module, "load_dataset", lambda name: data)
    code = main(["train", "--dataset", "digits", "--loss", "ce", "--steps", str(bad + 5), "--batch-size", "64",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"logitsep: error: the logits became non-finite at step {bad} ")
    assert "Traceback" not in err


def test_tensorboard_missing_is_a_clear_error(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    with pytest.raises(ValueError, match="needs the tensorboard package.*pip install tensorboard"):
        train(TrainConfig(dataset="digits", steps=3, batch_size=32), data=digits, out=tmp_path, tensorboard=True)
    assert main(["train", "--dataset", "digits", "--loss", "ce", "--steps", "3", "--tensorboard",
                 "--out", str(tmp_path)]) == 2
    assert "logitsep: error: --tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "state.json").exists()  # refused before training


def test_tensorboard_gets_the_logged_scalars(digits, tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train(TrainConfig(dataset="digits", steps=7, batch_size=32), data=digits, out=tmp_path, tensorboard=True,
          log_every=3, progress=False, eval_splits=())
    assert calls[0] == ("init", str(tmp_path / "tensorboard"), None) and calls[-1] == ("close",)
    rows = read_log(tmp_path)
    assert [c for c in calls if c[0] == "train/loss"] == [("train/loss", r["loss"], r["step"]) for r in rows]
    assert [c[2] for c in calls if c[0] == "train/lr"] == [3, 6, 7]


def _wait_for_checkpoint(proc: subprocess.Popen, run, total: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            step = json.loads((run / "state.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            step = 0
        if 0 < step < total:
            return step
        if proc.poll() is not None:
            pytest.fail(f"the training process ended (code {proc.returncode}) before it could be killed")
        time.sleep(0.005)
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_weights_of_an_uninterrupted_run(digits, tmp_path):
    """A real ``python -m logitsep train`` process is killed with SIGKILL after its first checkpoint; ``--resume``
    finishes the run; every tensor and every log row equals a run that was never interrupted."""
    total = 600
    config = TrainConfig(dataset="digits", loss="batch_ce", steps=total, lr=0.05, batch_size=32, seed=7)
    run = tmp_path / "killed"
    argv = [sys.executable, "-m", "logitsep", "train", "--dataset", "digits", "--loss", "batch_ce",
            "--steps", str(total), "--lr", "0.05", "--batch-size", "32", "--seed", "7",
            "--checkpoint-every", "40", "--log-every", "10", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels as the in-process reference below
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        step = _wait_for_checkpoint(proc, run, total)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert step < total and not (run / "metrics.json").exists()
    done = subprocess.run([*argv, "--resume", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == total
    assert json.loads((run / "state.json").read_text())["step"] == total

    once = tmp_path / "once"  # one thread here too (fixture one_thread): the same kernels, the same sums
    train(config, data=digits, out=once, progress=False, eval_splits=(), checkpoint_every=40, log_every=10)
    _same_weights(once / "model.safetensors", run / "model.safetensors")
    assert _log_rows(run) == _log_rows(once)


def test_bench_train_runs_and_writes_its_files(digits, tmp_path):
    """A smoke run of ``logitsep bench train`` (no timing is asserted: the figure is the benchmark's job)."""
    from logitsep.bench.train import run

    result = run(dataset="digits", losses=["ce"], steps=3, batch_size=16, rounds=1, data=digits,
                 out=tmp_path / "train_speed", log=lambda s: None)  # sets 1 thread; the fixture restores it
    (row,) = result["rows"]
    assert row["loss"] == "ce" and row["trainer_steps_per_s"] > 0 and row["bare_steps_per_s"] > 0
    assert sorted(p.rsplit(".", 1)[1] for p in result["files"]) == ["csv", "json", "png"]
    saved = json.loads((tmp_path / "train_speed.json").read_text())
    assert saved["rows"][0]["ratio"] == row["ratio"] and "environment" in saved
