"""One table from several run folders: their config and their test metrics (metrics.json), as JSON and markdown.

    python tools/compare_runs.py RUN [RUN ...] --out results/X/compare

writes ``compare.json`` (one row per run) and ``compare.md``; the command line and the machine are recorded in both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from logitsep.core.files import write_json
from logitsep.core.provenance import command_line, environment

METRICS = ("auprc", "precision@0.9", "precision@0.99", "pooled_auprc", "pooled_auroc", "accuracy")


def row(run: Path) -> dict:
    result = json.loads((run / "metrics.json").read_text())
    config = result["config"]
    test = result.get("test", {})
    return {"run": run.name, "loss": config["loss"], "sampled": config.get("sampled", 0),
            "warmup": config.get("warmup", 0), "lr": config["lr"], "steps": config["steps"],
            "batch_size": config["batch_size"], "model": config["model"], "train_seconds": result["train_seconds"],
            **{m: test.get(m) for m in METRICS}, "all_logits_auprc": (test.get("all_logits") or {}).get("auprc")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="path stem: STEM.json and STEM.md")
    args = p.parse_args()
    rows = [row(r) for r in args.runs]
    env = environment()
    write_json(args.out.with_suffix(".json"), {"command": command_line(), "environment": env, "rows": rows})
    cols = ["run", "loss", "sampled", "warmup", "lr", "steps", "train_seconds", *METRICS, "all_logits_auprc"]

    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v)

    lines = [f"Command: `{command_line()}`; machine: {env.get('processor')}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
