"""``logitsep index RUN``: embed a dataset split with a trained run and store the item vectors for class search."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.checks import check_positive_int
from ..core.files import fsync_dir
from ..data import load_dataset
from ..runs import load_run
from .storage import EmbeddingIndex


@torch.no_grad()
def build_index(run_dir: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None, split: str = "test",
                batch_size: int = 1024, device: str = "cpu", progress: bool | None = None,
                overwrite: bool = False) -> EmbeddingIndex:
    """Embed ``split`` of ``dataset`` (default: the run's) with the run's model (eval mode, batches) and store
    ``head.item_vectors(h)`` as an :class:`~.storage.EmbeddingIndex` at ``out``; item ``i`` is example ``i`` of the
    split. The header records the run, dataset, split, class names and the head's fingerprint. The folder is
    built beside ``out`` and renamed into place, so ``out`` is never half-written; an existing ``out`` is
    refused unless ``overwrite``. Returns the index, opened read-only."""
    check_positive_int(batch_size, "batch_size")
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
    run = load_run(run_dir, device, enrolled=False)  # the fingerprint of the trained rows: enrollments keep it valid
    spec = run.spec
    data = load_dataset(dataset or run.config.dataset)
    if tuple(data.input_shape) != spec.input_shape:
        raise ValueError(f"{data.name} inputs have shape {data.input_shape} but the run was trained on "
                         f"{spec.dataset} inputs of shape {spec.input_shape}")
    x, _ = data.split(split)
    model, head = run.model, run.model.head
    names = list(spec.class_names)  # the model's classes (the items may come from other data)
    meta = {"run": str(Path(run_dir).resolve()), "dataset": data.name, "split": split, "model": spec.architecture,
            "loss": spec.loss, "step": run.step, "head": type(head).__name__, "num_classes": head.k,
            "embedding_dim": head.d, "head_sha256": head.fingerprint(), "head_rows": head.k,
            "class_names": names if len(names) <= 1000 else None}  # the header stays small
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".build", dir=out.parent))
    try:
        index = EmbeddingIndex.create(tmp / "index", head.d + 1, meta=meta)
        model.eval()
        pending: list[torch.Tensor] = []
        rows = 0
        bar = tqdm(range(0, len(x), batch_size), desc=f"embedding {data.name}/{split}", unit="batch", leave=False,
                   disable=(None if progress is None else not progress), dynamic_ncols=True)
        for start in bar:
            pending.append(head.item_vectors(model.embed(x[start:start + batch_size].to(device))).cpu())
            rows += len(pending[-1])
            if rows >= 65536:
                index.append(torch.cat(pending))
                pending, rows = [], 0
        if pending:
            index.append(torch.cat(pending))
        index.close()
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "index")
            os.replace(tmp / "index", out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "index", out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddingIndex.open(out)
