"""The run folder describes itself (``model.json``): a run is loaded, queried, calibrated, indexed and served where
its dataset cannot be loaded; old runs without ``model.json`` load where their dataset does, and otherwise say how
to upgrade them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from logitsep.core.images import encode_png
from logitsep.data import load_dataset
from logitsep.runs import MODEL, ModelSpec, load_run, read_spec
from logitsep.serve.service import dataset_images
from logitsep.train import TrainConfig, train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(dataset="digits", loss="batch_ce", steps=60, lr=0.03, batch_size=64), out=out, progress=False,
          eval_splits=())
    return out


def test_model_json_describes_the_model(run: Path) -> None:
    spec = read_spec(run)
    obj = json.loads((run / MODEL).read_text())
    assert obj["format"] == "logitsep-model" and obj["version"] == 1
    assert (spec.architecture, spec.input_shape, spec.input_kind, spec.num_classes) == ("mlp", (64,), "image", 10)
    assert spec.class_names == tuple(str(i) for i in range(10)) and spec.dataset == "digits"
    assert (spec.head, spec.head_scale, spec.embedding_dim, spec.loss) == ("linear", 1.0, 500, "batch_ce")
    assert spec.pixel_scale == 1 / 256 and obj["image"] == {"channels": 1, "height": 8, "width": 8}
    assert ModelSpec.from_dict(spec.to_dict(), "here") == spec
    loaded = load_run(run)
    assert loaded.spec == spec and loaded.step == 60 and len(loaded.fingerprint["sha256"]) == 64


@pytest.mark.parametrize(("edit", "message"), [
    (lambda o: "{", "corrupt JSON"),
    (lambda o: json.dumps({**o, "format": "x"}), 'expected a JSON object with "format"'),
    (lambda o: json.dumps({**o, "version": 9}), "unsupported version 9"),
    (lambda o: json.dumps({k: v for k, v in o.items() if k != "input_shape"}), "KeyError"),
    (lambda o: json.dumps({**o, "class_names": ["a"]}), "1 class names for 10 classes"),
    (lambda o: json.dumps({**o, "head": "square"}), "head linear or cosine"),
])
def test_a_broken_model_json_is_a_clear_error(run: Path, tmp_path: Path, edit, message: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / MODEL).write_text(edit(json.loads((run / MODEL).read_text())))
    with pytest.raises(ValueError, match=f"model.json: not a valid model spec.*{message}"):
        load_run(copy)


def test_an_old_run_loads_where_its_dataset_does_and_calibrate_upgrades_it(run: Path, tmp_path: Path) -> None:
    from logitsep.classifier import calibrate_run

    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / MODEL).unlink()
    assert load_run(old).spec == read_spec(run)  # derived from the dataset, which loads here
    calibrate_run(old)
    assert read_spec(old) == read_spec(run)  # calibrate wrote it


HIDE_DATASETS = """
import logitsep.data as data
data.DATASETS.clear()  # no dataset can be loaded on this "other machine"
"""


def _elsewhere(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "elsewhere.py"
    path.write_text(HIDE_DATASETS + textwrap.dedent(script))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)


def test_a_run_is_queried_calibrated_indexed_and_served_without_its_dataset(run: Path, tmp_path: Path) -> None:
    """On a machine where no dataset loads (the registry is emptied in a fresh process): ``query`` on PNG and
    .npy inputs, calibration on held-out arrays the user has, an index filled through the service's ``/ingest``
    and searched over HTTP and with ``ClassSearch``; ``evaluate``, which needs the dataset, says so."""
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    digits = load_dataset("digits")
    images = dataset_images("digits", "test", (64,))
    (tmp_path / "img.png").write_bytes(encode_png(images[0]))
    np.save(tmp_path / "test_x.npy", digits.test_x.numpy()[:20])
    np.save(tmp_path / "valid_x.npy", digits.valid_x.numpy())
    np.save(tmp_path / "valid_y.npy", digits.valid_y.numpy())
    (tmp_path / "pngs.json").write_text(json.dumps([encode_png(img).hex() for img in images[:30]]))
    r = _elsewhere(f"""
        import json, torch, numpy as np, warnings
        from pathlib import Path
        from logitsep.cli import main
        from logitsep.classifier import SingleLogitClassifier, query
        from logitsep.search import ClassSearch
        from logitsep.serve.app import create_app
        from logitsep.serve.service import Service
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fastapi.testclient import TestClient
        run, tmp = Path({str(moved)!r}), Path({str(tmp_path)!r})
        assert main(["evaluate", str(run)]) == 2  # needs the dataset: a clear error, no traceback
        # calibrate on the held-out arrays the user has
        clf = SingleLogitClassifier.from_run(run, load_thresholds=False)
        x, y = (torch.from_numpy(np.load(tmp / f"valid_{{k}}.npy")) for k in ("x", "y"))
        th = clf.calibrate(x, y)
        th.save(run / "thresholds.json")
        assert main(["query", str(run), "--class", "3", "--input", str(tmp / "img.png")]) == 0
        answers = query(run, "7", tmp / "test_x.npy")
        assert answers["threshold_source"] == "calibrated" and len(answers["results"]) == 20
        # served, and indexed through /ingest
        clf = SingleLogitClassifier.from_run(run)
        with TestClient(create_app(Service(clf, tmp / "served"))) as client:
            pngs = [bytes.fromhex(h) for h in json.loads((tmp / "pngs.json").read_text())]
            import base64
            reply = client.post("/ingest", json={{"images": [base64.b64encode(p).decode() for p in pngs]}})
            assert reply.status_code == 200, reply.text
            top = client.get("/search", params={{"class_id": 4, "top_k": 3}}).json()["items"]
            client.app.state.service.close()
        found = ClassSearch.from_run(run, tmp / "served").search(4, top_k=3)
        assert found.ids.tolist() == [item["id"] for item in top]
        print("OK", len(top))
    """, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK 3" in r.stdout
    assert "unknown dataset 'digits'" in r.stderr  # what evaluate said
    assert "class 3 (3) of" in r.stdout  # the query's table


def test_an_old_run_without_its_dataset_says_how_to_upgrade(run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / MODEL).unlink()
    r = _elsewhere(f"""
        from logitsep.runs import load_run
        try:
            load_run({str(old)!r})
        except ValueError as err:
            print(err)
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "has no model.json" in r.stdout and f"logitsep calibrate {old}" in r.stdout
