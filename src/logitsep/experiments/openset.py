"""Classes the model never saw: ``logitsep reproduce openset`` (rejection) and ``logitsep reproduce enroll``
(classes added from a few examples, :mod:`logitsep.enrollment`).

**Open set** (the protocol of Neal et al., ECCV 2018): in each of ``splits`` seeded splits, ``K`` classes are
*known* (drawn at random, or given), the others *unknown*. Every loss is trained on the known classes only; on the
whole test set (known and unknown examples) the score of an example is its **maximum single logit** over the
known classes. Reported per loss, mean ± sd over the splits:

* ``auroc``: area under the ROC of known (positive) vs unknown test examples by that score (ties count half);
* ``fpr95``: the fraction of unknown examples accepted at the highest threshold that accepts ≥ 95% of the known;
* ``oscr``: open-set classification rate (Dhamija, Günther & Boult, NeurIPS 2018): the area under the curve of
  the correct-classification rate of the known examples (arg-max right *and* score ≥ θ) against the fraction of
  unknown examples with score ≥ θ, over every θ;
* at the run's **calibrated global threshold** ``T`` (precision 0.99 on the known classes' validation data,
  :mod:`logitsep.thresholds`): ``rejected_at_global``, the fraction of unknown examples whose every known logit
  is below ``T``, and ``known_recall_at_global``, the fraction of known examples whose true logit is ``≥ T`` —
  what an SLC user with one threshold lives with.

Baselines in the same table, from the ``ce`` runs: the maximum softmax probability (``score: max_softmax``; its
global threshold calibrated the same way on the probabilities) beside ``ce``'s maximum logit (Vaze et al., ICLR
2022). Published MNIST 6/4 AUROC
anchors are printed beside (:data:`ANCHORS`).

**Enrollment** (``reproduce enroll``): train on the known classes of one split; enroll each unknown class from
``n`` examples of its training data (``draws`` seeded draws per ``n``; ``n = 0``, "all": every training example
of the class, once: the best a row can do on these frozen features), by each rule; score the whole test set
with all ``k`` rows (trained + enrolled, columns in the dataset's class order) and report the enrolled classes'
AUPRC and precision@0.9 of their single logit, the pooled AUROC over all classes, and the trained classes'
metrics (their rows are untouched, so only the pooled figures can move). Reference: the same loss trained on all
classes with all their data, the same classes' metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import write_csv, write_json, write_text
from ..core.plots import pyplot, save_figure
from ..core.provenance import command_line, environment
from ..core.ranking import ranked_counts, recall_position
from ..core.tables import text_table
from ..data import Splits, load_dataset
from ..enrollment import RULES, new_row, row_logit
from ..losses import loss_spec
from ..metrics import slc_metrics
from ..thresholds import calibrate_scores
from ..train import TrainConfig, train

__all__ = ["ANCHORS", "OPENSET_KEYS", "auroc", "enrollment_study", "fpr_at_tpr", "known_classes", "oscr",
           "reproduce_openset"]

ANCHORS = {"mnist": {"softmax": 0.978, "OSRCI": 0.988, "max logit": 0.993}}  # AUROC, MNIST 6/4 (Neal; Vaze)
OPENSET_KEYS = ("auroc", "fpr95", "oscr", "rejected_at_global", "known_recall_at_global")
DEFAULT_LOSSES = ("ce", "self_norm", "nce", "bce", "batch_ce")


# ------------------------------------------------------------------------------------------------ the metrics

def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``positive`` items by ``scores`` (tied scores count half), from the ranking
    core's counts at every distinct score."""
    positive = np.asarray(positive, dtype=bool)
    p, n = int(positive.sum()), int((~positive).sum())
    if not p or not n:
        raise ValueError(f"auroc needs positives and negatives, got {p} and {n}")
    _, tp, taken = ranked_counts(np.asarray(scores, dtype=np.float64), positive)
    tpr, fpr = np.concatenate([[0], tp / p]), np.concatenate([[0], (taken - tp) / n])
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def fpr_at_tpr(scores: np.ndarray, positive: np.ndarray, tpr: float = 0.95) -> float:
    """The fraction of negatives with ``score ≥ T`` at the highest ``T`` accepting at least ``tpr`` of the
    positives (the m-th largest positive score, :func:`~logitsep.core.ranking.recall_position`)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos = np.sort(scores[positive])[::-1]
    t = pos[int(recall_position(tpr, np.array([len(pos)]))[0]) - 1]
    return float(np.mean(scores[~positive] >= t))


def oscr(scores: np.ndarray, correct: np.ndarray, known: np.ndarray) -> float:
    """Open-set classification rate: the area under CCR(θ) against FPR(θ), θ over every distinct score;
    CCR = known examples classified correctly with score ≥ θ over all known, FPR = unknown with score ≥ θ over all
    unknown. Tied scores enter together (a straight segment)."""
    scores, correct, known = (np.asarray(a) for a in (scores, correct, known))
    n_known, n_unknown = int(known.sum()), int((~known).sum())
    _, tp, taken = ranked_counts(scores.astype(np.float64), known & correct)
    _, unk, _ = ranked_counts(scores.astype(np.float64), ~known)
    ccr, fpr = np.concatenate([[0], tp / n_known]), np.concatenate([[0], unk / n_unknown])
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


def openset_metrics(logits: np.ndarray, y: np.ndarray, threshold: float | None, score: str = "max_logit",
                    ) -> dict[str, float | None]:
    """The open-set figures of one model on one test set. ``logits [n, K]`` over the known classes, ``y [n]`` the
    known class index or -1 for an unknown example; ``threshold``: the calibrated global threshold (None: no
    global figures); ``score``: ``"max_logit"`` or ``"max_softmax"``."""
    known = y >= 0
    if score == "max_softmax":
        z = torch.as_tensor(logits, dtype=torch.float64)
        s = torch.softmax(z, dim=1).max(dim=1).values.numpy()
    else:
        s = logits.max(axis=1).astype(np.float64)
    correct = np.zeros(len(y), dtype=bool)
    correct[known] = np.argmax(logits[known], axis=1) == y[known]
    out: dict[str, float | None] = {"auroc": auroc(s, known), "fpr95": fpr_at_tpr(s, known), "oscr": oscr(s, correct,
                                                                                                        known)}
    if threshold is None:
        out.update(rejected_at_global=None, known_recall_at_global=None)
    else:
        true = logits[np.flatnonzero(known), y[known]]
        out.update(rejected_at_global=float(np.mean(logits[~known].max(axis=1) < threshold)),
                   known_recall_at_global=float(np.mean(true >= threshold)))
    return out


# ------------------------------------------------------------------------------------------------ the splits

def known_classes(spec: str | int | Sequence[int], num_classes: int, splits: int, seed: int = 0,
                  class_names: Sequence[str] | None = None) -> list[list[int]]:
    """The known classes of each split: ``spec`` an integer ``K`` (``K`` classes drawn by a permutation seeded with
    ``seed + split``, sorted), or a comma-separated list of class indices, ranges ``a-b`` (both included) or names
    (the same in every split; a held-out block of classes: ``--known 0-2464``)."""
    names = list(class_names or [])
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit() and "," not in spec):
        k = int(spec)
        if not 1 <= k < num_classes:
            raise ValueError(f"--known {spec}: the number of known classes must be in [1, {num_classes - 1}]")
        return [sorted(np.random.default_rng(seed + i).permutation(num_classes)[:k].tolist()) for i in range(splits)]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = []
    for item in items:
        item = str(item).strip()
        lo, dash, hi = item.partition("-")
        if dash and lo.isdigit() and hi.isdigit() and item not in names:  # a range a-b of indices, both included
            if not int(lo) <= int(hi) < num_classes:
                raise ValueError(f"--known: range {item!r} must be a-b with a <= b <= {num_classes - 1}")
            chosen.extend(range(int(lo), int(hi) + 1))
        elif item in names:
            chosen.append(names.index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < num_classes:
            chosen.append(int(item))
        else:
            raise ValueError(f"--known: {item!r} is neither a class name nor an index in [0, {num_classes - 1}]")
    if len(set(chosen)) != len(chosen) or not 1 <= len(chosen) < num_classes:
        raise ValueError(f"--known: {len(chosen)} classes (repeats: {len(chosen) - len(set(chosen))}); need 1 to "
                         f"{num_classes - 1} distinct ones")
    return [sorted(chosen)] * splits


def _subset(data: Splits, known: Sequence[int]) -> tuple[Splits, np.ndarray]:
    """The known-class part of train/valid (labels renumbered 0..K-1 in ``known``'s order) and the whole test set,
    its labels mapped to the known index or -1 (returned apart; the Splits' test part holds the known ones)."""
    remap = np.full(data.num_classes, -1, dtype=np.int64)
    remap[list(known)] = np.arange(len(known))

    def part(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        yy = remap[np.asarray(y)]
        keep = np.flatnonzero(yy >= 0)
        return torch.as_tensor(np.asarray(x[torch.as_tensor(keep)])), torch.as_tensor(yy[keep])

    (trx, try_), (vax, vay), (tex, tey) = (part(*data.split(s)) for s in ("train", "valid", "test"))
    sub = Splits(f"{data.name}[{','.join(map(str, known))}]", trx, try_, vax, vay, tex, tey, len(known),
                 [data.class_names[c] for c in known], data.input_kind)
    return sub, remap[np.asarray(data.test_y)]


def _fit(loss: str, sub: Splits, steps: int, lr: float, model: str, batch_size: int, seed: int,
         progress: bool | None) -> tuple[torch.nn.Module, np.ndarray, float]:
    """Train ``loss`` on ``sub``; return the model, its validation logits and its global threshold (precision 0.99
    on them)."""
    config = TrainConfig(dataset=sub.name, model=model, loss=loss, steps=steps, lr=lr, batch_size=batch_size,
                         seed=seed).validate()
    trained, _ = train(config, data=sub, progress=progress, eval_splits=())
    valid = _logits(trained, sub.valid_x)
    return trained, valid, float(calibrate_scores(valid, sub.valid_y).global_threshold)


@torch.no_grad()
def _logits(model: torch.nn.Module, x: Any) -> np.ndarray:
    """Single logits of every class (``head.logits``, the logits a threshold is compared with; a cosine head's
    scaled cosines)."""
    model.eval()
    head = model.head
    outs = [head.logits(model.embed(torch.as_tensor(np.asarray(x[i:i + 2048]))), range(head.k)).float()
            for i in range(0, len(x), 2048)]
    return torch.cat(outs).numpy()


# ------------------------------------------------------------------------------------------------ open set

def reproduce_openset(out: str | Path, dataset: str, known: str | int, splits: int = 5,
                      losses: Sequence[str] = DEFAULT_LOSSES, steps: int = 2000, lr: float = 0.1, model: str = "mlp",
                      batch_size: int = 128, seed: int = 0, progress: bool | None = False,
                      log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run the open-set protocol (module docstring); write ``out/openset.json`` (rows with the means, ``sd`` and
    ``per_split`` values), ``openset.md``, ``openset.csv`` and ``openset.png`` (max-logit histograms of split 0,
    the global threshold drawn)."""
    data = load_dataset(dataset)
    known_sets = known_classes(known, data.num_classes, splits, seed, data.class_names)
    per: dict[tuple[str, str], list[dict[str, Any]]] = {}
    hist: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for i, ks in enumerate(known_sets):
        sub, test_y = _subset(data, ks)
        test_x = data.test_x
        log(f"split {i}: known {ks if len(ks) <= 20 else f'{len(ks)} classes ({ks[0]}..{ks[-1]})'}")
        for loss in losses:
            trained, valid, threshold = _fit(loss, sub, steps, lr, model, batch_size, seed + i, progress)
            z = _logits(trained, test_x)
            for score in ("max_logit", "max_softmax") if loss == "ce" else ("max_logit",):
                if score == "max_logit":
                    m = openset_metrics(z, test_y, threshold, score)
                else:  # the probabilities as scores, with a global threshold calibrated on them the same way
                    t_probs = float(calibrate_scores(_softmax(valid), sub.valid_y).global_threshold)
                    m = openset_metrics(_softmax(z), test_y, t_probs, "max_logit")
                per.setdefault((loss, score), []).append({"split": i, "known": ks, **m})
                log(f"  {loss:>12} {score:<11} " + "  ".join(f"{k}={v:.4f}" for k, v in m.items() if v is not None))
            if i == 0:
                hist[loss] = (z[test_y >= 0].max(axis=1), z[test_y < 0].max(axis=1), threshold)
    rows = []
    for (loss, score), values in per.items():
        row: dict[str, Any] = {"loss": loss if score == "max_logit" else f"{loss} (max softmax)", "score": score,
                               "pols_aligned": loss_spec(loss).pols_aligned}
        for key in OPENSET_KEYS:
            vals = [v[key] for v in values if v[key] is not None]
            row[key] = float(np.mean(vals)) if vals else None
            row[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        row["per_split"] = values
        rows.append(row)
    settings = {"dataset": dataset, "known": str(known), "splits": splits, "steps": steps, "lr": lr, "model": model,
                "batch_size": batch_size, "seed": seed}
    return rows, _write_openset(Path(out), rows, settings, hist, dataset)


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=1).numpy()


def _fmt(row: dict[str, Any], key: str) -> str:
    v, sd = row[key], row.get(f"{key}_sd")
    if v is None:
        return "–"
    return f"{100 * v:.2f} ± {100 * sd:.2f}" if sd is not None else f"{100 * v:.2f}"


def _write_openset(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any],
                   hist: dict[str, tuple[np.ndarray, np.ndarray, float]], dataset: str) -> dict[str, Path]:
    env = environment()
    paths = {"json": write_json(out / "openset.json", rows),  # the list of rows (DESIGN.md); how it was made:
             "run": write_json(out / "openset_run.json", {"settings": settings, "anchors": ANCHORS.get(dataset, {}),
                                                           "command": command_line(), "environment": env})}
    paths["csv"] = write_csv(out / "openset.csv", [{k: v for k, v in r.items() if k != "per_split"} for r in rows])
    header = ["loss", "PoLS", "AUROC %", "FPR@95 %", "OSCR %", "unknown rejected at T %", "known recall at T %"]
    table = [[r["loss"], {True: "yes", False: "no", None: "?"}[r["pols_aligned"]],
              *(_fmt(r, k) for k in OPENSET_KEYS)] for r in rows]
    anchors = ANCHORS.get(dataset, {})
    lines = [f"# Open set: {dataset}, {settings['known']} known classes, {settings['splits']} splits", "",
             text_table(table, header, markdown=True), "",
             "Mean ± sd over the splits. Score: the maximum single logit over the known classes (`max softmax`: "
             "the CE model's maximum softmax probability, its T calibrated the same way on the probabilities). T: "
             "the run's global threshold, calibrated for precision 0.99 on the known classes' validation data.", ""]
    if anchors:
        lines += ["Published AUROC on this protocol: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in anchors.items())
                  + " (Neal et al. 2018; Vaze et al. 2022; larger networks, their own training).", ""]
    lines += [f"Command: `{command_line()}`", "", f"Settings: {settings}", "",
              f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}; {env['date']}.", "",
              "![max logits](openset.png)", ""]
    paths["md"] = write_text(out / "openset.md", "\n".join(lines))
    paths["png"] = _histograms(hist, out / "openset.png")
    return paths


def _histograms(hist: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path) -> Path:
    plt = pyplot()
    n = len(hist)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(n / cols)),
                             squeeze=False)
    for ax, (loss, (k, u, t)) in zip(axes.flat, hist.items(), strict=False):
        lo, hi = float(min(k.min(), u.min())), float(max(k.max(), u.max()))
        bins = np.linspace(lo, hi, 60)
        ax.hist(k, bins=bins, alpha=0.6, density=True, label="known")
        ax.hist(u, bins=bins, alpha=0.6, density=True, label="unknown")
        ax.axvline(t, color="k", linestyle="--", label="global threshold")
        ax.set_title(loss)
        ax.set_xlabel("max single logit")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ enrollment

def _per_class(scores: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> dict[str, float]:
    m = slc_metrics(scores, y, per_class=True)
    pc = m["per_class"]
    return {"auprc": float(np.mean([pc["auprc"][c] for c in classes])),
            "precision@0.9": float(np.mean([pc["precision@0.9"][c] for c in classes])),
            "pooled_auroc": float(m["pooled_auroc"])}


def enrollment_study(out: str | Path, dataset: str, known: str | int, shots: Sequence[int] = (1, 5, 10, 20),
                     draws: int = 10, loss: str = "batch_ce", rules: Sequence[str] = RULES, steps: int = 2000,
                     lr: float = 0.1, model: str = "mlp", batch_size: int = 128, seed: int = 0,
                     progress: bool | None = False, log: Callable[[str], None] = print,
                     ) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Enroll the unknown classes of split 0 from ``shots`` examples each (module docstring); write
    ``out/enroll.json``, ``enroll.md``, ``enroll.csv`` and ``enroll.png``."""
    data = load_dataset(dataset)
    ks = known_classes(known, data.num_classes, 1, seed, data.class_names)[0]
    new = [c for c in range(data.num_classes) if c not in ks]
    sub, _ = _subset(data, ks)
    trained, _, threshold = _fit(loss, sub, steps, lr, model, batch_size, seed, progress)
    log(f"trained {loss} on {ks if len(ks) <= 20 else f'{len(ks)} classes'}; global threshold {threshold:.4f}")
    full_config = TrainConfig(dataset=dataset, model=model, loss=loss, steps=steps, lr=lr, batch_size=batch_size,
                              seed=seed).validate()
    full, _ = train(full_config, data=data, progress=progress, eval_splits=())
    test_y = np.asarray(data.test_y)
    full_logits = _logits(full, data.test_x)
    reference, old_ref = _per_class(full_logits, test_y, new), _per_class(full_logits, test_y, ks)
    log(f"reference (all {data.num_classes} classes trained): new classes {reference}")
    with torch.no_grad():
        trained.eval()
        h_test = trained.embed(torch.as_tensor(np.asarray(data.test_x))).float()
        train_x, train_y = data.split("train")
        train_y = np.asarray(train_y)
        neg = trained.embed(torch.as_tensor(np.asarray(sub.valid_x[:4096]))).float()  # known classes only
        base = trained.head.logits(h_test, range(len(ks))).numpy()  # [n, K] the trained rows
    scores = np.empty((len(test_y), data.num_classes), dtype=np.float32)
    scores[:, ks] = base
    before = _per_class_old(base, test_y, ks)
    rows = []
    for rule in rules:
        for n in shots:
            results = []
            n_draws = draws if n else 1  # n = 0: every training example of the class (the features' ceiling)
            for draw in range(n_draws):
                rng = np.random.default_rng(seed * 7919 + 1000 * n + draw)
                for c in new:
                    pool = np.flatnonzero(train_y == c)
                    pick = np.sort(rng.choice(pool, size=n, replace=False)) if n else pool
                    with torch.no_grad():
                        h = trained.embed(torch.as_tensor(np.asarray(train_x[torch.as_tensor(pick)]))).float()
                    w, b = new_row(rule, trained.head, h, neg, threshold)
                    with torch.no_grad():
                        scores[:, c] = row_logit(trained.head, h_test, w, b).numpy()
                m = _per_class(scores, test_y, new)
                old = _per_class(scores, test_y, ks)
                results.append({**m, "old_auprc": old["auprc"], "old_precision@0.9": old["precision@0.9"],
                                "new_recall_at_global": float(np.mean([np.mean(scores[test_y == c, c] >= threshold)
                                                                       for c in new])),
                                "new_fp_at_global": float(np.mean([np.mean(scores[test_y != c, c] >= threshold)
                                                                   for c in new]))})
            row = {"rule": rule, "shots": n or "all", "draws": n_draws}
            for key in results[0]:
                vals = [r[key] for r in results]
                row[key], row[f"{key}_sd"] = float(np.mean(vals)), float(np.std(vals, ddof=1)) if n_draws > 1 else None
            rows.append(row)
            log(f"  {rule:>8} n={n or 'all':<3} new AUPRC {row['auprc']:.4f}  P@0.9 {row['precision@0.9']:.4f}  "
                f"pooled AUROC {row['pooled_auroc']:.4f}")
    settings = {"dataset": dataset, "known": ks, "enrolled": new, "loss": loss, "shots": list(shots), "draws": draws,
                "steps": steps, "lr": lr, "model": model, "batch_size": batch_size, "seed": seed,
                "global_threshold": threshold}
    summary = {"reference_new": reference, "reference_old": old_ref, "old_before": before}
    return rows, _write_enroll(Path(out), rows, settings, summary)


def _per_class_old(base: np.ndarray, y: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """The trained classes' metrics before any enrollment: their K columns over the whole test set (examples of
    the not-yet-enrolled classes are negatives of every column)."""
    remap = np.full(int(y.max()) + 1, -1)
    remap[list(ks)] = np.arange(len(ks))
    yy = remap[y]
    keep = yy >= 0
    target = np.zeros((len(y), len(ks)), dtype=bool)
    target[np.flatnonzero(keep), yy[keep]] = True
    m = slc_metrics(base, target, per_class=True)
    return {"auprc": float(np.mean(m["per_class"]["auprc"])),
            "precision@0.9": float(np.mean(m["per_class"]["precision@0.9"])), "pooled_auroc": float(m["pooled_auroc"])}


def _write_enroll(out: Path, rows: list[dict[str, Any]], settings: dict[str, Any],
                  summary: dict[str, Any]) -> dict[str, Path]:
    env = environment()
    ref = summary["reference_new"]
    paths = {"json": write_json(out / "enroll.json", {"settings": settings, "rows": rows, **summary,
                                                       "command": command_line(), "environment": env})}
    paths["csv"] = write_csv(out / "enroll.csv", rows)

    def rel(v: float, r: float) -> str:
        return f"{(1 - v) / (1 - r):.2f}×" if r < 1 else "–"

    def pm(r: dict[str, Any], key: str) -> str:
        sd = r[f"{key}_sd"]
        return f"{1 - r[key]:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")

    table = [[r["rule"], r["shots"], pm(r, "auprc"), pm(r, "precision@0.9"), rel(r["precision@0.9"],
                                                                              ref["precision@0.9"]),
              f"{1 - r['pooled_auroc']:.4f}", f"{r['new_recall_at_global']:.3f}", f"{r['new_fp_at_global']:.4f}",
              f"{1 - r['old_auprc']:.4f}"] for r in rows]
    header = ["rule", "n", "1−AUPRC (new)", "1−P@0.9 (new)", "1−P@0.9 vs trained", "1−pooled AUROC",
              "recall at T (new)", "FPR at T (new)", "1−AUPRC (old)"]
    old = summary["old_before"]
    def classes(ids: list[int]) -> str:
        return str(ids) if len(ids) <= 20 else f"{len(ids)} classes ({ids[0]}..{ids[-1]})"

    lines = [f"# Enrollment: {settings['dataset']}, trained on {classes(settings['known'])}, enrolled "
             f"{classes(settings['enrolled'])}",
             "", text_table(table, header, markdown=True), "",
             f"Mean ± sd over {settings['draws']} draws of n examples per enrolled class. Reference, the same loss "
             f"({settings['loss']}) trained on all classes with all their data, the same classes: 1−AUPRC "
             f"{1 - ref['auprc']:.4f}, 1−P@0.9 {1 - ref['precision@0.9']:.4f}; \"vs trained\" is the ratio of "
             "1−P@0.9 to the reference's (1.10× = within 10%). Old classes before any enrollment: 1−AUPRC "
             f"{1 - old['auprc']:.4f}, 1−P@0.9 {1 - old['precision@0.9']:.4f} (their rows are untouched; the "
             "examples of the enrolled classes are negatives for them before and after). T: the global threshold "
             f"{settings['global_threshold']:.4f}, which is every enrolled class's threshold.", "",
             f"Command: `{command_line()}`", "", f"Settings: {settings}", "",
             f"Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}; {env['date']}.", "",
             "![enrollment](enroll.png)", ""]
    paths["md"] = write_text(out / "enroll.md", "\n".join(lines))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("auprc", "precision@0.9"), strict=True):
        for rule in dict.fromkeys(r["rule"] for r in rows):
            rr = [r for r in rows if r["rule"] == rule and r["shots"] != "all"]
            ax.errorbar([r["shots"] for r in rr], [1 - r[key] for r in rr], yerr=[r[f"{key}_sd"] or 0 for r in rr],
                        marker="o", capsize=3, label=rule)
        ax.axhline(1 - ref[key], color="k", linestyle="--", label="trained with all data")
        for r in rows:
            if r["shots"] == "all" and r["rule"] == "fit":
                ax.axhline(1 - r[key], color="grey", linestyle=":", label="fit on every example (frozen features)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("examples per enrolled class")
        ax.set_ylabel(f"1 − {key} (new classes)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths["png"] = save_figure(fig, out / "enroll.png")
    return paths
