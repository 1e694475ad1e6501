"""Shared fixtures: the ``device`` parametrisation (CUDA skipped when unavailable) and a seeded generator."""

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


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(20180705)
