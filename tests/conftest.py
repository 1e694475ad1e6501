"""Shared fixtures: one torch thread, the ``device`` parametrisation (CUDA skipped when unavailable), a seeded
generator."""

from __future__ import annotations

import pytest
import torch

_CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device a loss must run on: cpu always, cuda when one is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The whole suite runs on one torch thread: its models are tiny, and on a busy 2-vCPU machine a second
    OpenMP thread made training up to 20x slower (threads spinning and stalling), never faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(20180705)
