"""--shard-head: the training loop with the head's rows split over 2 gloo processes ends with the weights, log and
files of one process, and its checkpoint resumes in one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from logitsep.data import load_dataset
from logitsep.train import TrainConfig, read_log, train

LOSSES = ("ce", "batch_ce", "nce")


def _config(loss: str) -> TrainConfig:
    return TrainConfig(dataset="digits", model="mlp", loss=loss, steps=6, lr=0.1, batch_size=32, seed=5,
                       weight_decay=1e-3, shard_head=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str, data) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for loss in LOSSES:
            kwargs = dict(data=data, progress=False, eval_splits=("test",), log_every=2, checkpoint_every=4)
            train(_config(loss), out=f"{root}/{loss}", **kwargs)
        linear = dataclasses.replace(_config("ce"), model="linear")  # a head alone: nothing for DDP to average
        train(linear, out=f"{root}/linear", data=data, progress=False, eval_splits=())
        short = dataclasses.replace(_config("ce"), steps=4, schedule="constant")
        train(short, out=f"{root}/short", data=data, progress=False, eval_splits=(), log_every=2)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def sharded_runs(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    mp.spawn(_worker, args=(_free_port(), str(root), digits), nprocs=2, join=True)
    return root


def _same(a, b, atol=1e-5):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("rng/"):  # the random state: other processes draw other numbers (none in these losses)
            continue
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("loss", LOSSES)
def test_sharded_head_equals_one_process(loss, sharded_runs, digits, tmp_path):
    one = dataclasses.replace(_config(loss), shard_head=False)
    train(one, data=digits, out=tmp_path, progress=False, eval_splits=("test",), log_every=2, checkpoint_every=4)
    run = sharded_runs / loss
    _same(tmp_path / "model.safetensors", run / "model.safetensors")
    # the checkpoint holds the full head's momentum, as one process's does
    _same(tmp_path / "checkpoint.safetensors", run / "checkpoint.safetensors")
    for a, b in zip(read_log(tmp_path), read_log(run), strict=True):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    state = json.loads((run / "state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["shard_head"] is True
    assert (run / "thresholds.json").is_file() and (run / "metrics.json").is_file()


def test_a_sharded_head_on_features_alone_equals_one_process(sharded_runs, digits, tmp_path):
    """``--model linear`` (the head on the inputs, the 10⁵-class feature arrays' model): the backbone has no
    parameters, so there is no data-parallel wrapper to build (DDP refuses such a module)."""
    one = dataclasses.replace(_config("ce"), model="linear", shard_head=False)
    train(one, data=digits, out=tmp_path, progress=False, eval_splits=())
    _same(tmp_path / "model.safetensors", sharded_runs / "linear" / "model.safetensors")


def test_a_sharded_checkpoint_resumes_in_one_process(sharded_runs, digits, tmp_path):
    short = sharded_runs / "short"
    resumed = dataclasses.replace(_config("ce"), shard_head=False, schedule="constant")
    train(resumed, data=digits, out=short, resume=True, progress=False, eval_splits=(), log_every=2)
    train(resumed, data=digits, out=tmp_path, progress=False, eval_splits=(), log_every=2)
    _same(tmp_path / "model.safetensors", short / "model.safetensors")


def test_shard_head_refuses_losses_without_a_sharded_form(digits):
    with pytest.raises(ValueError, match="--shard-head: loss 'max_margin' has no sharded form"):
        train(dataclasses.replace(_config("ce"), loss="max_margin"), data=digits, progress=False, eval_splits=())
    with pytest.raises(ValueError, match="shard_head and sampled"):
        dataclasses.replace(_config("nce"), sampled=5).validate()


@pytest.mark.slow
def test_torchrun_cli_trains_with_a_sharded_head(digits, tmp_path):
    """``torchrun --nproc-per-node 2 -m logitsep train ... --shard-head``: one JSON document, the weights of one
    process."""
    import subprocess
    import sys

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "logitsep", "train", "--dataset", "digits", "--loss", "batch_ce", "--steps", "6",
            "--batch-size", "32", "--lr", "0.1", "--seed", "5", "--weight-decay", "1e-3", "--shard-head",
            "--out", str(out), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["world_size"] == 2 and result["config"]["shard_head"] is True
    one = dataclasses.replace(_config("batch_ce"), shard_head=False)
    train(one, data=digits, out=tmp_path / "one", progress=False, eval_splits=())
    _same(tmp_path / "one" / "model.safetensors", out / "model.safetensors")
