"""The names of the metrics and of the recorded settings, and the headers tables print for them: one source
for the metrics, the reports, the seed summaries and the command line (no torch here, so that readers of
result files stay light).

The paper (Keren, Sabato & Schuller, ICDM 2018) prints **1 − metric** (lower is better); :data:`HEADERS` says so.
"""

from __future__ import annotations

from typing import Any

#: The recall levels r of ``precision@r`` (the paper's).
DEFAULT_RECALLS = (0.9, 0.99)
#: The three single-logit metrics of the paper's tables (means over classes).
SLC_KEYS = ("auprc", "precision@0.9", "precision@0.99")
#: The keys of ``slc_metrics`` with the default recall levels (plus ``accuracy``, and ``per_class`` on request).
METRIC_KEYS = (*SLC_KEYS, "pooled_auprc", "pooled_auroc")
#: What a row of a reproduced table records per loss.
ROW_KEYS = (*METRIC_KEYS, "accuracy")
#: Table headers; every metric is printed as 1 − value except accuracy.
HEADERS = {"auprc": "1−AUPRC", "precision@0.9": "1−P@0.9", "precision@0.99": "1−P@0.99",
           "pooled_auprc": "1−pooled AUPRC", "pooled_auroc": "PoLS violations (1−pooled AUROC)",
           "accuracy": "accuracy"}

#: What defines a run of a learning-rate grid; stored in every row, so that table2 can tell whether table1's
#: runs are its own, and ``summarize`` whether runs belong together.
SETTING_KEYS = ("dataset", "model", "steps", "lr_grid", "batch_size", "seed", "train_split", "weight_decay")
#: The value a setting had before it was recorded (rows written without it were made with it).
SETTING_DEFAULTS: dict[str, Any] = {"weight_decay": 0.0}


def is_metric_key(key: str) -> bool:
    """Whether ``key`` names a metric value (one that the tables print as 1 − value)."""
    return key in ("auprc", "pooled_auprc", "pooled_auroc", "accuracy") or key.startswith("precision@")


def recall_key(r: float) -> str:
    """``precision@r`` for a recall level r (``precision@0.9``)."""
    return f"precision@{r:g}"
