"""torchvision and timm backbones: torchvision's CUDA build imports on a CPU torch (the two operator schemas its
fake kernels need are defined only when its own extension cannot load), and their models train with our heads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from logitsep import backbones
from logitsep.models import build_model


def test_torchvision_imports_through_the_shim_only_where_needed() -> None:
    """In a fresh process: a plain ``import torchvision`` fails on this CPU torch without the schemas; through
    logitsep it imports; the schemas exist afterwards and calling nms has no kernel (no classifier needs one)."""
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=120)
    loads = backbones._extension_loads()
    if not loads:
        assert plain.returncode != 0 and "torchvision::nms does not exist" in plain.stderr
    code = ("from logitsep import backbones\nimport torch\nbackbones.import_torchvision()\n"
            "print(len(backbones._SHIM), backbones._operator_exists('nms'), backbones._operator_exists('qnms'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0" if loads else "1", "True", "True"]


def test_no_schema_is_defined_when_the_extension_loads_or_they_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "_extension_loads", lambda: True)
    assert backbones.define_missing_schemas() == []
    monkeypatch.setattr(backbones, "_extension_loads", lambda: False)
    backbones.import_torchvision()  # defined here already, if this torch needed them
    assert backbones.define_missing_schemas() == []  # both exist now: nothing is defined twice


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18"])
def test_a_backbone_trains_with_our_head_on_grayscale_images(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, (1, 32, 32), 5)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 5
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert model.head.k == 5 and model.head.d == 512 and losses[-1] < losses[0]
    h = model.eval().embed(x)
    torch.testing.assert_close(model.head.logit(h, 3), model.head(h)[:, 3], rtol=1e-5, atol=1e-5)


def test_unknown_timm_models_are_refused() -> None:
    with pytest.raises(ValueError, match="timm has no model 'nonsense_net'"):
        build_model("timm:nonsense_net", (3, 32, 32), 5)
