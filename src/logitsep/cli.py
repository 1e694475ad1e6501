"""The ``logitsep`` command. Every command prints a readable table, or JSON with ``--json``.

    logitsep losses                      the loss registry with PoLS alignment
    logitsep train ...                   train one model, checkpoint + metrics.json in --out
    logitsep evaluate DIR                SLC metrics of a trained run
    logitsep reproduce table1|table2|alignment --dataset D --out DIR
    logitsep bench NAME                  speed benchmarks (ratios to a baseline timed in the same run)
    logitsep demo                        MNIST: ce vs batch_ce, the paper-style table
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .data import DATASETS, DatasetNotFoundError


def _losses() -> dict[str, Any]:
    from .losses import LOSSES

    return LOSSES


def _print_json(obj: Any) -> None:
    from ._io import _json_default

    print(json.dumps(obj, indent=2, default=_json_default))


def _loss_list(parser: argparse.ArgumentParser, text: str | None, default: Sequence[str]) -> list[str]:
    if not text:
        return list(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _losses()]
    if unknown:
        parser.error(f"unknown loss {', '.join(map(repr, unknown))}; valid names: {', '.join(sorted(_losses()))}")
    return names


def _float_list(parser: argparse.ArgumentParser, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        parser.error(f"--lrs must be positive numbers, got {text!r}")
    return values


def _loss_kwargs(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--loss-arg takes key=value, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def cmd_losses(args: argparse.Namespace) -> int:
    from .report import text_table

    losses = _losses()
    rows = [{"name": n, "pols_aligned": losses[n].pols_aligned, "class": losses[n].__name__,
             "summary": (losses[n].__doc__ or "").strip().splitlines()[0]} for n in sorted(losses)]
    if args.json:
        _print_json(rows)
    else:
        word = {True: "yes", False: "no", None: "not established"}
        print(text_table([[r["name"], word[r["pols_aligned"]], r["class"]] for r in rows],
                         ["name", "PoLS-aligned", "module"]))
    return 0


def _summary_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    keys = ["accuracy", "auprc", "precision@0.9", "precision@0.99", "pooled_auprc", "pooled_auroc"]
    rows = [[k, metrics[k], metrics.get("all_logits", {}).get(k)] for k in keys]
    return rows


def cmd_train(args: argparse.Namespace) -> int:
    from .report import text_table
    from .train import TrainConfig, train

    config = TrainConfig(dataset=args.dataset, model=args.model, loss=args.loss, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, device=args.device,
                         loss_kwargs=_loss_kwargs(args.parser, args.loss_arg), train_split=args.train_split)
    _, result = train(config, out=args.out, resume=args.resume, eval_splits=("valid", "test"))
    if args.json:
        _print_json(result)
    else:
        print(f"trained {config.loss} on {config.dataset} for {config.steps} steps "
              f"({result['train_seconds']:.0f}s); run folder: {args.out}")
        print(text_table(_summary_rows(result["test"]), ["test metric", "single logit", "all logits"]))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .report import text_table
    from .train import evaluate_model, load_run, softmax_scale

    model, config, step = load_run(args.dir, device=args.device)
    x, y = load_dataset(config.dataset).split(args.split)
    metrics = evaluate_model(model, x, y, device=args.device, softmax_scale=softmax_scale(config))
    if args.json:
        _print_json({"dir": args.dir, "split": args.split, "step": step, "loss": config.loss, **metrics})
    else:
        print(f"{args.dir}: {config.loss} on {config.dataset}, step {step}, split {args.split}")
        print(text_table(_summary_rows(metrics), [f"{args.split} metric", "single logit", "all logits"]))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments import PAPER_LOSSES, measured_alignment, run_losses, table2_rows, write_report
    from .report import paper_table

    default = sorted(_losses()) if args.table == "alignment" else PAPER_LOSSES
    losses = _loss_list(args.parser, args.losses, default)
    lrs = _float_list(args.parser, args.lrs)
    settings = {"dataset": args.dataset, "model": args.model, "steps": args.steps, "lrs": lrs,
                "batch_size": args.batch_size, "seed": args.seed, "optimizer": "SGD momentum 0.9, cosine decay"}
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    from .data import load_dataset

    data = load_dataset(args.dataset)
    scores: dict[str, Any] = {}
    rows = run_losses(args.dataset, losses, args.steps, lrs, batch_size=args.batch_size, model=args.model,
                      seed=args.seed, log=log, data=data, test_scores=scores)
    verdicts = measured_alignment(rows) if args.table == "alignment" else None
    title = {"table1": f"SLC metrics per loss on {args.dataset} (paper Table I protocol)",
             "table2": f"SLC vs all logits on {args.dataset} (paper Table II protocol)",
             "alignment": f"Measured logit separation of every registered loss on {args.dataset}"}[args.table]
    paths = write_report(args.out, args.table, rows, title, settings, verdicts, test_scores=scores,
                         test_target=data.test_y.numpy())
    if args.table == "table2":
        from ._io import write_json

        paths["table2_rows"] = write_json(f"{args.out}/table2_rows.json", table2_rows(rows))
    if args.json:
        _print_json({"rows": rows, "verdicts": verdicts, "files": {k: str(v) for k, v in paths.items()}})
    else:
        print(paper_table(rows))
        for loss, verdict in (verdicts or {}).items():
            print(f"{loss}: {verdict}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# Learning rates of the demo, chosen by validation accuracy from {1, 0.3, 0.1, 0.03} with
# `logitsep reproduce table1 --dataset mnist --losses ce,batch_ce --steps 1500 --lrs 1,0.3,0.1,0.03 --out DIR`
# (batch_ce diverges at 1 and 0.3 with momentum SGD; ce is best at 0.1).
DEMO_LRS = {"ce": 0.1, "batch_ce": 0.03}


def cmd_demo(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .experiments import run_losses
    from .report import paper_table

    data = load_dataset("mnist")
    log = (lambda s: None) if args.json else print
    log(f"logitsep demo: the paper's MNIST MLP (2 x 500, batch norm, ReLU) trained on the 60k MNIST training "
        f"images, {args.steps} SGD steps of {args.batch_size} per loss, scored on the 10k test images.")
    rows = []
    for loss, lr in DEMO_LRS.items():
        rows += run_losses("mnist", [loss], args.steps, [lr], batch_size=args.batch_size, data=data,
                           train_split="train_full", seed=args.seed, log=log)
    if args.json:
        _print_json(rows)
        return 0
    print()
    print("Single logit classification on the MNIST test set (1 − metric, lower is better):")
    print(paper_table(rows))
    ce = next(r for r in rows if r["loss"] == "ce")
    print(f"\nFor reference, CE with all 10 logits (softmax): 1−AUPRC {1 - ce['all_logits']['auprc']:.4f}, "
          f"1−P@0.9 {1 - ce['all_logits']['precision@0.9']:.4f}, "
          f"1−P@0.99 {1 - ce['all_logits']['precision@0.99']:.4f}")
    print("Paper (Table I, MNIST, 10^5 steps): ce .008/.005/.203, batch_ce .002/.001/.022; all logits .001/.000/.020")
    return 0


# Each benchmark is a module of logitsep.bench with ``add_arguments(parser)`` and ``cli(args) -> int``.
BENCHMARKS = {
    "metrics": "slc_metrics against np.sort of the same scores",
    "losses": "forward+backward of every loss against cross-entropy",
}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"logitsep.bench.{args.what}").cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logitsep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    loss_names = sorted(_losses())
    datasets = sorted(DATASETS)

    def add(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=func, parser=p)
        return p

    add("losses", "list the registered losses with their PoLS alignment", cmd_losses)

    p = add("train", "train one model and write a checkpoint and metrics.json", cmd_train)
    p.add_argument("--dataset", required=True, choices=datasets)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--loss", required=True, choices=loss_names, metavar="LOSS",
                   help="one of: " + ", ".join(loss_names))
    p.add_argument("--loss-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a keyword argument of the loss, e.g. --loss-arg alpha=0.1 (repeatable)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-split", default="train", choices=["train", "train_full"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="run folder (checkpoint, metrics.json)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")

    p = add("evaluate", "SLC metrics of a trained run", cmd_evaluate)
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--device", default="cpu")

    p = add("reproduce", "the paper's tables (and the alignment table of every loss)", cmd_reproduce)
    p.add_argument("table", choices=["table1", "table2", "alignment"])
    p.add_argument("--dataset", required=True, choices=datasets)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--losses", help="comma-separated registry names (default: the paper's seven; all for alignment)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lrs", default="1,0.1,0.01,0.001", help="learning-rate grid, chosen by validation accuracy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)

    p = sub.add_parser("bench", help="speed benchmarks; CSV/JSON and a plot in results/bench",
                       description="speed benchmarks; each reports ratios to a baseline timed in the same run")
    bench_sub = p.add_subparsers(dest="what", required=True)
    for name, text in BENCHMARKS.items():
        import importlib

        q = bench_sub.add_parser(name, help=text, description=text)
        q.add_argument("--json", action="store_true", help="print JSON instead of a table")
        q.set_defaults(func=cmd_bench, parser=q, what=name)
        importlib.import_module(f"logitsep.bench.{name}").add_arguments(q)

    p = add("demo", "train ce and batch_ce on MNIST and print the paper-style table", cmd_demo)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DatasetNotFoundError as err:
        print(f"logitsep: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"logitsep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
