"""``instructedit-lite optimize-instructions``: the search of :mod:`~instructedit_lite.optimize` end to end (chapter 10)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from .base_model import base_config, cache_dir, load_base_model
from .experiments import editor_configs
from .instructions import InstructionSet, default_instructions
from .optimize import SearchConfig, TrialEditor, optimize_instructions, search_records, write_instruction_file
from .proposers import HTTPChatProposer, LocalChatProposer, Proposer, load_smollm2_chat
from .real_editors import real_editor_configs, train_real_editors
from .real_experiments import evaluator
from .real_model import load_real_model, missing
from .tasks import is_sentiment, task_names
from .train import train_editor


#: The tasks the real-model search covers by default: a ConvSent record costs about ten fact
#: records to score on SmolLM2 (21 response rows through the vocabulary head; chapter 10 measures
#: it), so it joins only with ``--tasks`` (and chapter 10's ``full = True``).
def _fact_tasks() -> tuple[str, ...]:
    return tuple(t for t in task_names() if not is_sentiment(t))


REAL_TASKS = _fact_tasks()  # from the task registry: counterfact, wikirecent, zsre


def embedded_trial(base, trained, config: SearchConfig, start: InstructionSet | None = None, *,
                   progress: bool = True) -> TrialEditor:
    """A :class:`~instructedit_lite.optimize.TrialEditor` for a trained InstructEdit editor
    (:class:`~instructedit_lite.train.TrainedEditor`)
    of the embedded base model, scoring on :func:`~instructedit_lite.optimize.search_records`; its scores are
    cached under
    :func:`~instructedit_lite.base_model.cache_dir`."""
    key = f"{base.config.key()}-{trained.config.key()}"
    return TrialEditor(trained.editor, base.model, base.tokenizer, search_records(base.world, config),
                       start or default_instructions(), key=key,
                       cache_file=cache_dir() / f"instruction-search-{key}" / "scores.json", progress=progress)


def real_trial(real, trained, config: SearchConfig, start: InstructionSet | None = None, *,
               progress: bool = True) -> TrialEditor:
    """A :class:`~instructedit_lite.optimize.TrialEditor` for chapter 7's InstructEdit editor on SmolLM2 (``real``: a
    :class:`~instructedit_lite.real_model.RealModel`), editing through the frozen-prefix engine;
    the search records are the val split of the published files after the editor's own validation
    records (``config.skip`` must not be smaller: checked).  Start: the data's instructions."""
    if config.skip < trained.config.n_val:
        raise ValueError(f"real_trial: config.skip={config.skip} would search on the {trained.config.n_val} val "
                         "records that picked the editor's checkpoint; use skip >= the editor's n_val")
    engine = evaluator(real, trained.config).model
    key = f"{real.key}-{trained.config.key()}"
    return TrialEditor(trained.editor, engine, real.tokenizer, search_records(real.world, config),
                       start or real.source.instructions(), key=key,
                       cache_file=cache_dir() / f"instruction-search-{key}" / "scores.json", progress=progress)


def make_proposer(kind: str = "smollm2", *, url: str | None = None, model: str | None = None) -> Proposer:
    """``"smollm2"``: :class:`~instructedit_lite.proposers.LocalChatProposer` on SmolLM2-135M-Instruct
    (loaded on its first proposal, so a fully cached rerun never loads it); ``"http"``: an
    OpenAI-compatible endpoint (``url``, ``model``)."""
    if kind == "smollm2":
        return LocalChatProposer(loader=load_smollm2_chat, name="SmolLM2-135M-Instruct")
    if kind == "http":
        if not url or not model:
            raise ValueError("the http proposer needs --url (API base, e.g. https://api.openai.com/v1) and --api-model")
        return HTTPChatProposer(url, model)
    raise ValueError(f"unknown proposer {kind!r}; expected 'smollm2' or 'http'")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``optimize-instructions`` on a ``argparse`` sub-parser collection."""
    p = subparsers.add_parser("optimize-instructions",
                              help="search better task descriptions with a proposer LM and a trial editor")
    p.add_argument("--model", choices=("embedded", "smollm2"), default="embedded",
                   help="the edited model whose InstructEdit editor is the trial editor")
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
                   help=f"tasks to search (default: all four on embedded, {' '.join(REAL_TASKS)} on smollm2)")
    p.add_argument("--data", type=Path, default=None, help="the published files (default: $INSTRUCTEDIT_DATA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the smoke-trained editor")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def cmd_optimize_instructions(args, stream=None) -> int:
    """Body of ``instructedit-lite optimize-instructions``: search, write ``--out``, print a JSON summary."""
    torch.set_num_threads(1)
    tasks = tuple(args.tasks) if args.tasks else (REAL_TASKS if args.model == "smollm2" else SearchConfig.tasks)
    config = SearchConfig(rounds=args.rounds, candidates=args.candidates, patience=args.patience,
                          n_val=args.n_val, seed=args.seed, tasks=tasks)
    if args.model == "smollm2":
        if missing(args.data):
            raise ValueError("--model smollm2 needs: " + " | ".join(missing(args.data)))
        real = load_real_model(args.data, args.seed, progress=not args.quiet)
        ie = real_editor_configs(args.seed, "smoke" if args.smoke else "default")["InstructEdit"]
        trained = train_real_editors({"InstructEdit": ie}, real, progress=not args.quiet)["InstructEdit"]
        trial = real_trial(real, trained, config, progress=not args.quiet)
    else:
        base = load_base_model(base_config(args.seed, smoke=args.smoke), progress=not args.quiet)
        trained = train_editor(editor_configs(args.seed, args.smoke)["InstructEdit"], base, progress=not args.quiet)
        trial = embedded_trial(base, trained, config, progress=not args.quiet)
    start = time.perf_counter()
    result = optimize_instructions(trial, make_proposer(args.proposer, url=args.url, model=args.api_model), config,
                                   proposal_cache=cache_dir() / f"instruction-search-{trial.key}" / "proposals.json",
                                   progress=not args.quiet)
    path = write_instruction_file(args.out, result)
    first, last = result.incumbents.groupby("task").first(), result.incumbents.groupby("task").last()
    summary = {"out": str(path), "log": str(path.with_name(path.stem + ".log.csv")),
               "seconds": round(time.perf_counter() - start, 1), "stopped": result.stopped,
               "validation_score": {t: {"start": float(first.loc[t, "score"]), "final": float(last.loc[t, "score"])}
                                    for t in first.index},
               "rejections": result.rejections.groupby("reason")["count"].sum().to_dict()}
    print(json.dumps(summary, indent=1), file=stream or sys.stdout)
    return 0


def optimize_instructions_main(argv: Sequence[str] | None = None) -> int:
    """The command on its own (``python -m instructedit_lite.optimize --out FILE ...``)."""
    parser = argparse.ArgumentParser(prog="instructedit-lite")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["optimize-instructions", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_optimize_instructions(args)
    except ValueError as err:
        print(f"instructedit-lite optimize-instructions: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(optimize_instructions_main())
