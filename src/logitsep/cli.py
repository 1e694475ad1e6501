"""The ``logitsep`` command. Every command prints a readable table, or JSON with ``--json``.

    logitsep losses                      the loss registry with PoLS alignment
    logitsep train ...                   train one model, checkpoint + log.csv + metrics.json in --out
                                         (data-parallel: torchrun --nproc-per-node N -m logitsep train ...)
    logitsep evaluate DIR                SLC metrics of a trained run
    logitsep calibrate RUN [--precision P | --recall R]   per-class + global thresholds -> RUN/thresholds.json
    logitsep query RUN --class C --input FILE   one class's logit for images (.npy/.png): score, match
    logitsep reproduce table1|table2|alignment --dataset D --out DIR
    logitsep summarize DIR... --out DIR  table2 over seeds: mean ± sd of several reproduce runs
    logitsep index RUN --out DIR         embed a dataset split with a run's model: an index for class search
    logitsep bench NAME                  speed benchmarks (ratios to a baseline timed in the same run)
    logitsep demo                        MNIST: ce vs batch_ce, the paper-style table
    logitsep serve RUN | --demo          web service + live page: class search over ingested images
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .data import DATASETS, DatasetNotFoundError, dataset_name


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
    from .distributed import rank
    from .report import text_table
    from .train import TrainConfig, train

    config = TrainConfig(dataset=args.dataset, model=args.model, loss=args.loss, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, device=args.device,
                         loss_kwargs=_loss_kwargs(args.parser, args.loss_arg), train_split=args.train_split,
                         momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule)
    _, result = train(config, out=args.out, resume=args.resume, eval_splits=("valid", "test"),
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, tensorboard=args.tensorboard)
    if rank() != 0:  # under torchrun only rank 0 reports
        return 0
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
    from . import experiments as ex
    from .report import paper_table, table1_markdown

    default = sorted(_losses()) if args.table == "alignment" else ex.PAPER_LOSSES
    losses = _loss_list(args.parser, args.losses, default)
    lrs = _float_list(args.parser, args.lrs)
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        args.parser.error(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if args.jobs < 1:
        args.parser.error(f"--jobs must be >= 1, got {args.jobs}")
    common = {"dataset": args.dataset, "losses": losses, "steps": args.steps, "lrs": lrs,
              "batch_size": args.batch_size, "model": args.model, "seed": args.seed, "log": log,
              "weight_decay": args.weight_decay, "jobs": args.jobs}
    if args.table in ("table1", "table2"):
        rows, paths = (ex.reproduce_table1 if args.table == "table1" else ex.reproduce_table2)(args.out, **common)
        if args.json:
            _print_json({"rows": rows, "files": {k: str(v) for k, v in paths.items()}})
        else:
            if args.table == "table1":
                print(table1_markdown(rows, ex.PAPER_TABLE1.get(args.dataset), ex.PAPER_IMPROVEMENT.get(args.dataset),
                                      markdown=False))
            else:
                print(paths["md"].read_text(encoding="utf-8").split("\n## ")[0])
            print(f"wrote {paths['md']}, {paths['json']}, {paths['csv']} and the figures in {args.out}")
        return 0
    settings = {"dataset": args.dataset, "model": args.model, "steps": args.steps, "lrs": lrs,
                "batch_size": args.batch_size, "seed": args.seed,
                "optimizer": f"SGD momentum 0.9, cosine decay, weight decay {args.weight_decay:g}"}
    from .data import load_dataset

    data = load_dataset(args.dataset)
    scores: dict[str, Any] = {}
    rows = ex.run_losses(args.dataset, losses, args.steps, lrs, batch_size=args.batch_size, model=args.model,
                         seed=args.seed, log=log, data=data, test_scores=scores, weight_decay=args.weight_decay,
                         jobs=args.jobs)
    verdicts = ex.measured_alignment(rows)
    title = f"Measured logit separation of every registered loss on {args.dataset}"
    paths = ex.write_report(args.out, args.table, rows, title, settings, verdicts, test_scores=scores,
                            test_target=data.test_y.numpy())
    if args.json:
        _print_json({"rows": rows, "verdicts": verdicts, "files": {k: str(v) for k, v in paths.items()}})
    else:
        print(paper_table(rows))
        for loss, verdict in verdicts.items():
            print(f"{loss}: {verdict}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# Learning rates of the demo, chosen by validation accuracy from {1, 0.3, 0.1, 0.03} with
# `logitsep reproduce table1 --dataset mnist --losses ce,batch_ce --steps 1500 --lrs 1,0.3,0.1,0.03 --out DIR`
# (batch_ce diverges at 1 and 0.3 with momentum SGD; ce is best at 0.1).
DEMO_LRS = {"ce": 0.1, "batch_ce": 0.03}


def cmd_summarize(args: argparse.Namespace) -> int:
    import shlex

    from .report import text_table
    from .seeds import HEADERS, METRICS, write_summary

    command = " ".join(shlex.quote(p) for p in ["logitsep", "summarize", *args.dirs, "--out", args.out])
    result = write_summary(args.dirs, args.out, command)
    if args.json:
        _print_json(result)
        return 0
    body = [[f"{r['loss']} ({r['scoring']})", len(r["seeds"]),
             *(f"{r[k]['mean']:.4f} ± {r[k]['std']:.4f}" for k in METRICS)] for r in result["methods"]]
    print(text_table(body, ["method", "seeds", *(HEADERS[k] for k in METRICS)]))
    comparison = result["comparison"]
    if comparison is not None:
        num, den = (f"{loss} {scoring}" for loss, scoring in (comparison["numerator"], comparison["denominator"]))
        print(f"{num} / {den}, ratio of mean 1 − metric: "
              + ", ".join(f"x{comparison[k]['ratio_of_means']:.2f}" for k in METRICS))
    print(f"wrote {args.out}/table2_seeds.{{json,csv,md,png}}")
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.main import run

    return run(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .classifier import calibrate_run, format_thresholds

    th = calibrate_run(args.run, precision=args.precision, recall=args.recall, split=args.split, device=args.device)
    if args.json:
        _print_json(th.to_dict())
    else:
        print(format_thresholds(th))
        print(f"wrote {args.run}/thresholds.json")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from .classifier import format_query, query

    result = query(args.run, args.class_, args.input, threshold=args.threshold, device=args.device)
    if args.json:
        _print_json(result)
    else:
        print(format_query(result))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .search import build_index

    index = build_index(args.run, args.out, dataset=args.dataset, split=args.split, batch_size=args.batch_size,
                        device=args.device, progress=None if not args.json else False, overwrite=args.overwrite)
    info = {"out": args.out, "count": len(index), "dim": index.dim, **index.meta}
    info.pop("class_names", None)
    if args.json:
        _print_json(info)
    else:
        print(f"indexed {len(index)} items of {info['dataset']}/{info['split']} ({index.dim}-dim vectors: "
              f"embedding + bias) with {args.run} into {args.out}")
    return 0


# Each benchmark is a module of logitsep.bench with ``add_arguments(parser)`` and ``cli(args) -> int``.
BENCHMARKS = {
    "metrics": "slc_metrics against np.sort of the same scores",
    "losses": "forward+backward of every loss against cross-entropy",
    "train": "steps/s of the trainer (logitsep.train.train) against a bare PyTorch loop, same model/loss/data",
    "speed": "paper Table III / Figure 1: forward time with 1 output unit (SLC) vs k units, per backbone",
    "head": "the head alone: all k logits against one class's logit (all_ms, slc_ms, speedup)",
    "search": "exact class search scan rate vs memory bandwidth and torch.mv; FAISS IVF recall and speed-up",
    "zscore": "z-score of one class from cached O(d^2) statistics against the z-score of all k logits",
    "load": "the web service under concurrent ingest/search/query clients on loopback (p50/p99 latency)",
}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(f"logitsep.bench.{args.what}").cli(args)


MODEL_HELP = ("mlp or cnn (the paper's networks), or a torchvision classification model as torchvision:NAME "
              "(needs torchvision; checked when the model is built)")


TRAINING_COMMANDS = ("train", "reproduce", "demo")


def _apply_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", 0) if args.command in TRAINING_COMMANDS else 0
    if threads < 0:
        args.parser.error(f"--threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(threads)


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
        if name in TRAINING_COMMANDS:
            default = 1 if name == "demo" else 0  # the demo's small MLP: one thread is fastest and steadiest
            p.add_argument("--threads", type=int, default=default,
                           help=f"torch CPU threads (default {default}; 0: torch's choice; 1 is often faster for "
                                "the small paper models on a busy machine)")
        return p

    add("losses", "list the registered losses with their PoLS alignment", cmd_losses)

    p = add("train", "train one model and write a checkpoint and metrics.json", cmd_train)
    p.add_argument("--dataset", required=True, type=dataset_name, choices=datasets)
    p.add_argument("--model", default="mlp", help=MODEL_HELP)
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
    p.add_argument("--momentum", type=float, default=0.9, help="SGD heavy-ball momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning rate: cosine decay from --lr to 0 over --steps (default), or constant")
    p.add_argument("--out", required=True, help="run folder (checkpoint, log.csv, metrics.json)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (same settings; --steps may grow)")
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="N", help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=50, metavar="N", help="a row of --out/log.csv every N steps")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to --out/tensorboard (needs the tensorboard package)")

    p = add("evaluate", "SLC metrics of a trained run", cmd_evaluate)
    p.add_argument("dir")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--device", default="cpu")

    p = add("reproduce", "the paper's tables (and the alignment table of every loss)", cmd_reproduce)
    p.add_argument("table", choices=["table1", "table2", "alignment"])
    p.add_argument("--dataset", required=True, type=dataset_name, choices=datasets)
    p.add_argument("--model", default="mlp", help=MODEL_HELP)
    p.add_argument("--losses", help="comma-separated registry names (default: the paper's seven; all for alignment)")
    p.add_argument("--steps", type=int, default=2000,
                   help="SGD steps per run (default 2000: what results/mnist and results/fashion-mnist used)")
    p.add_argument("--lrs", default="1,0.1,0.01,0.001", help="learning-rate grid, chosen by validation accuracy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay of every run (default 0; the paper states none)")
    p.add_argument("--jobs", type=int, default=1,
                   help="train this many runs of the grid at once, in worker processes that share --threads "
                        "(default 1)")
    p.add_argument("--out", required=True)

    p = add("summarize", "mean and spread over seeds of several `reproduce table2` runs", cmd_summarize)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders holding a table2.json (one setting, several seeds)")
    p.add_argument("--out", required=True, help="folder for table2_seeds.{json,csv,md,png}")

    p = add("calibrate", "calibrate per-class and global thresholds on the validation split", cmd_calibrate)
    p.add_argument("run", help="run folder written by logitsep train")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--precision", type=float, help="target precision (default 0.99)")
    target.add_argument("--recall", type=float, help="target recall instead of a precision")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--device", default="cpu")

    p = add("query", "is each image of class C? one logit per image against a threshold", cmd_query)
    p.add_argument("run", help="run folder written by logitsep train")
    p.add_argument("--class", dest="class_", required=True, metavar="C", help="class index or class name")
    p.add_argument("--input", required=True, metavar="FILE", help=".npy array of images / inputs, or a .png")
    p.add_argument("--threshold", type=float, help="decision threshold (default: the calibrated one)")
    p.add_argument("--device", default="cpu")

    p = add("index", "embed a dataset split with a run's model and store it for class search", cmd_index)
    p.add_argument("run", help="run folder written by logitsep train")
    p.add_argument("--dataset", type=dataset_name, choices=datasets, help="default: the run's dataset")
    p.add_argument("--split", default="test", choices=["train", "valid", "test", "train_full"])
    p.add_argument("--out", required=True, help="index folder to create (header.json + vectors.f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")

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

    from .serve.main import add_arguments as serve_arguments

    p = add("serve", "serve a trained run: JSON API (OpenAPI at /docs), live page at /, class search over "
                     "ingested images; --demo feeds MNIST test images", cmd_serve)
    serve_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_threads(args)
    try:
        return args.func(args)
    except DatasetNotFoundError as err:
        print(f"logitsep: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"logitsep: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged: the message names the step
        print(f"logitsep: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
