"""The ``instructedit-lite`` command: pretrain the base model, meta-train an editor, time an edit.

    instructedit-lite pretrain [--retrain]
    instructedit-lite train --regime instruct --tasks counterfact,wikirecent,convsent [--steps N]
                            [--seed S] [--out DIR] [--smoke] [--no-cache] [--threads T]
    instructedit-lite bench [--out FILE] [--repeats N] [--threads T]

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
    from .train import REGIMES, TRAINABLE_TASKS

    parser = argparse.ArgumentParser(prog="instructedit-lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain (or load) the embedded base model; print its recall as JSON")
    p.add_argument("--retrain", action="store_true", help="discard the cached model and pretrain again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="meta-train an editor (single-task MEND, multi-task MEND or InstructEdit)")
    t.add_argument("--regime", choices=REGIMES, default="instruct")
    t.add_argument("--tasks", type=_tasks, default=None,
                   help=f"comma-separated training tasks (default: {','.join(TRAINABLE_TASKS)}; 'single' needs one)")
    t.add_argument("--steps", type=int, default=None, help="meta-training edits (default: the scale's default)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--out", type=Path, default=None,
                   help="output folder (resumable); default: the editor cache under $INSTRUCTEDIT_CACHE")
    t.add_argument("--smoke", action="store_true", help="a few dozen edits only")
    t.add_argument("--no-cache", action="store_true", help="train again even if a cached editor exists")
    t.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the embedded model's matrices are too small to gain from more)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    b = sub.add_parser("bench", help="time one edit against one forward+backward of the base model")
    bench.add_arguments(b)
    return parser


def _print_json(data: Any, stream) -> None:
    print(json.dumps(data, indent=1, default=str), file=stream)


def cmd_pretrain(args, stream) -> int:
    from .base_model import load_base_model

    base = load_base_model(progress=not args.quiet, retrain=args.retrain)
    info = {k: v for k, v in base.info.items() if k not in ("losses", "config")}
    _print_json({"path": str(base.path), "key": base.config.key(), **info}, stream)
    return 0


def train_config_from_args(args):
    from .train import default_config

    changes = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    return default_config(args.regime, args.tasks, smoke=args.smoke, **changes)


def cmd_train(args, stream) -> int:
    from .base_model import load_base_model
    from .train import records_for, train, train_editor

    import torch

    config = train_config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base_model(progress=not args.quiet)
    if args.out is not None:
        train_records, val_records = records_for(config, base.world)
        result = train(config, base.model, base.tokenizer, train_records=train_records, val_records=val_records,
                       out_dir=args.out, progress=not args.quiet)
        summary, path = result.summary, args.out
    else:
        trained = train_editor(config, base, cache=not args.no_cache, progress=not args.quiet)
        summary, path = trained.summary, trained.path
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

    bench.run(args.out, repeats=args.repeats, threads=args.threads, stream=stream)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "train": cmd_train, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None, *, stream=None) -> int:
    """Entry point of the ``instructedit-lite`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, stream or sys.stdout)
    except ValueError as err:  # a bad configuration: one line, not a traceback
        print(f"instructedit-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
