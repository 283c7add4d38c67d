"""The book's experiments as functions: which editors, which methods, which test cases.

The chapters and ``instructedit-lite reproduce`` call the same functions, so the command line
reproduces exactly what the book shows:

* :func:`editor_configs`: the meta-trained editors (InstructEdit, multi-task MEND, KE, and one
  single-task MEND per training task);
* :func:`scaling_configs` and :func:`balance_configs` (declared in ``figure4.py``):
  the editors of the task-scaling and data-balance analyses (chapter 6);
* :func:`build_methods`: every method of the comparison behind the one
  :class:`~instructedit_lite.editors.Editor` interface;
* :func:`evaluation_records`: the first ``n`` test records of each task (the same for every method);
* :func:`main_evaluation`: every method on every task in one pass; the paper's three experiments
  (multi-task, hold-out, unseen instructions) are views of its table (:func:`multitask_table`,
  :func:`holdout_table`, :func:`unseen_table`).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from . import methods as _methods
from . import tasks as _tasks
from .atomic import atomic_write_text
from .claims import claim_rows, claims_json, experiment_claims
from .config import jsonable as _jsonable
from .editors import Editor
from .editors.baselines import baseline_options
from .engine import lowest_block
from .evaluate import average_over_tasks, evaluate_plan, summarize
from .figure4 import (ANALYSIS_STEPS, BALANCE_STEPS, BALANCED, UNBALANCED, balance_configs, fact_edits,  # noqa: F401
                      paper_weights, scaling_configs)
from .generation import WILD_MAX_TOKENS
from .instructions import InstructionSet, default_instructions
from .methods import SINGLE, UNSEEN, MethodContext
from .models import load_model
from .parallel import cores
from .records import EditRecord, Probe
from .tables import nested
from .train import TrainConfig, TrainedEditor, learning_problem, train_editors

__all__ = ["editor_configs", "scaling_configs", "balance_configs", "ANALYSIS_STEPS", "BALANCE_STEPS", "fact_edits",
           "paper_weights", "UNBALANCED", "BALANCED",
           "build_methods", "methods_not_learned", "not_learned_among",
           "evaluation_records", "evaluation_models", "main_evaluation", "multitask_table", "holdout_table", "unseen_table",
           "EVALUATION", "N_CASES", "N_CASES_SMOKE", "SMOKE_RESPONSES", "FLUENCY_CASES", "UNSEEN", "SINGLE", "COMPARED", "GENERATION_COLUMNS"]

#: What ``reproduce`` (and the chapters) evaluate on each scale: test records per task by default
#: and in smoke mode, cases per task scored for fluency, and the responses a smoke run's ConvSent
#: records keep.  Embedded: 50 per task; smoke two (a paired difference and its interval need two
#: cases; each more costs every method one edit per task); fluency on 5 (generation is the slow
#: part).  Real (SmolLM2): all methods take about 19 s of one core per fact record and 54 s per
#: ConvSent record (chapter 8), so five per task keep chapter 8 near its 10-minute budget (``full``:
#: 100); fluency is not a column of the paper's Table 3 and 100 generated tokens cost about 4.6 s
#: of one core per case and method, so none by default (``reproduce --fluency-cases N``).
EVALUATION: dict[str, dict[str, Any]] = {
    "embedded": {"n_cases": 50, "n_cases_smoke": 2, "fluency_cases": 5, "smoke_responses": None},
    "real": {"n_cases": 5, "n_cases_smoke": 1, "fluency_cases": 0, "smoke_responses": 2},
}
N_CASES = EVALUATION["embedded"]["n_cases"]
N_CASES_SMOKE = EVALUATION["embedded"]["n_cases_smoke"]
FLUENCY_CASES = EVALUATION["embedded"]["fluency_cases"]


def __getattr__(name: str):
    # ``COMPARED`` (the methods of the multi-task comparison, in table order) is read from the
    # registry on every access (PEP 562).
    if name == "COMPARED":
        return _methods.compared_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def editor_configs(seed: int = 0, smoke: bool = False, *, size: str | None = None,
                   model: Any = "embedded") -> dict[str, TrainConfig]:
    """The meta-trained editors of chapters 4 and 5 (``model="smollm2"`` or a loaded real model:
    chapter 7), by name: those the registered methods need."""
    return _methods.editor_configs(seed, smoke, size=size, model=model)


def methods_not_learned(trained: Mapping[str, TrainedEditor]) -> dict[str, str]:
    """Method → why one of its editors did not learn (:func:`~instructedit_lite.train.learning_problem`),
    for every registered method whose editors are all in ``trained``; a method whose editors
    learned is not listed."""
    problems = {name: learning_problem(t) for name, t in trained.items()}
    out = {}
    for method in _methods.registered():
        names = list(method.editor_configs())
        if names and all(n in trained for n in names):
            found = [problems[n] for n in names if problems[n]]
            if found:
                out[method.name] = "; ".join(found)
    return out


def not_learned_among(trained: Mapping[str, TrainedEditor], names: Sequence[str]) -> dict[str, str]:
    """Editor name → why it did not learn (the name first), for the ``names`` of ``trained`` that
    did not (a rule of Figure 4 is not decided on them)."""
    problems = {n: learning_problem(trained[n]) for n in names}
    return {n: f"{n}: {p}" for n, p in problems.items() if p}


def build_methods(trained: Mapping[str, TrainedEditor], *, instructions: InstructionSet | None = None,
                  baselines: Sequence[str] | None = None, base=None,
                  options: Mapping[str, Mapping[str, Any]] | None = None, smoke: bool = False,
                  in_context: Sequence[str] = ()) -> dict[str, Editor]:
    """Every registered method that can be built, by name, in registry order: the compared set
    (``COMPARED``), InstructEdit with the held-out instruction (``UNSEEN``) and the
    single-task editors (``SINGLE``).  Meta-trained methods are built only when their editors
    are in ``trained`` (the CLI trains only what it evaluates); ``baselines`` limits the baselines
    (default: all).  ``instructions`` default to ``base``'s (its data's own); ``options`` (method →
    config overrides) default to :func:`~instructedit_lite.editors.baselines.baseline_options` for ``base``
    and the editors' weights (``smoke``: the baselines' smoke settings).  In-context methods (IKE)
    are scored differently (:func:`~instructedit_lite.editors.ike.evaluate_in_context`) and built only when
    named in ``in_context``."""
    if instructions is None:
        instructions = base.instructions() if base is not None else default_instructions()
    if options is None:
        weights = next(iter(trained.values())).config.mend.weight_names if trained else None
        options = baseline_options(base, weights, smoke=smoke)
    ctx = MethodContext(base=base, trained=trained, instructions=instructions, options=options)
    out: dict[str, Editor] = {}
    for method in _methods.registered():
        if method.family == "baseline" and baselines is not None and method.name not in baselines:
            continue
        if method.family == "in-context" and method.name not in in_context:
            continue
        editor = method.build(ctx)
        if editor is not None:
            out[method.name] = editor
    return out


def evaluation_records(source, n: int, tasks: Sequence[str] | None = None, *,
                       responses: int | None = None) -> dict[str, list[EditRecord]]:
    """The first ``n`` records of each task's test split (default: every registered task ``source`` has).

    ``responses``: a ConvSent record keeps at most that many responses of each sentiment and of its
    locality probe (smoke runs: :data:`~instructedit_lite.experiments.SMOKE_RESPONSES`; the same code on fewer
    rows: a real
    ConvSent record has about 20 responses and 10 locality answers, most of an evaluation's cost)."""
    if tasks is None:
        have = set(getattr(source, "tasks", _tasks.task_names()))
        tasks = tuple(t for t in _tasks.task_names() if t in have)
    out = {t: source.records(t, "test")[:n] for t in tasks}
    if responses is not None:
        out = {t: [_fewer_responses(r, responses) if _tasks.is_sentiment(t) else r for r in recs]
               for t, recs in out.items()}
    return out


#: Responses per sentiment that a smoke run's ConvSent records keep (:func:`evaluation_records`).
SMOKE_RESPONSES = 2


def _fewer_responses(record: EditRecord, k: int) -> EditRecord:
    locality = {kind: tuple(Probe(p.prompt, p.answers[:k]) for p in probes) for kind, probes in record.locality.items()}
    return replace(record, pos_responses=record.pos_responses[:k], neg_responses=record.neg_responses[:k],
                   locality=locality)


def evaluation_models(methods: Mapping[str, Editor], base) -> list[tuple[Any, dict[str, Editor]]]:
    """The model each method is evaluated on, as ``[(model, {name: method})]``.

    On the embedded scale: ``base`` for all.  On the real scale one frozen-prefix engine per cut
    (:meth:`~instructedit_lite.base_model.BaseModel.for_editing`): each method runs on the engine
    whose cached blocks end at the lowest block it edits or hooks
    (:meth:`~instructedit_lite.editors.Editor.edits_at`), so that a baseline placed lower than the
    meta-trained editors (FT-L at block 21) is evaluated exactly; a method that changes no weight
    (the unedited model, IKE) joins the engine of the default edited weights."""
    if base.scale != "real":
        return [(base, dict(methods))]
    plain = replace(base, model=getattr(base.model, "full_model", base.model))
    default = plain.weight_names()
    groups: dict[int, tuple[set[str], dict[str, Editor]]] = {}
    for name, method in methods.items():
        names = method.edits_at(plain.model) or default
        names_of, group = groups.setdefault(lowest_block(names, plain.profile.blocks), (set(), {}))
        names_of.update(names)
        group[name] = method
    return [(plain.for_editing(sorted(names_of)), group) for _, (names_of, group) in sorted(groups.items(), reverse=True)]


def main_evaluation(methods: Mapping[str, Editor], base, records: Mapping[str, list[EditRecord]], *,
                    fluency_cases: int = FLUENCY_CASES, progress: bool = True, **options) -> pd.DataFrame:
    """One pass: every method on every record, except the single-task editors on the held-out
    task (there is no single-task ZsRE editor).  One row per method × case.  Each method runs on
    its model (:func:`evaluation_models`), all of them in one
    :func:`~instructedit_lite.evaluate.evaluate_plan` (one set of worker processes, each record's
    unedited answers decoded once); ``options`` (``generation``, ``fluency``, ``seed``,
    ``processes``, ...) reach it."""
    def held_out(name: str) -> bool:  # unregistered methods are evaluated everywhere
        return name not in _methods.method_names() or _methods.get_method(name).held_out

    trainable = _tasks.trainable_tasks()
    fact_records = {t: r for t, r in records.items() if t in trainable}
    parts = []
    for evaluator, group in evaluation_models(methods, base):
        single = [m for name, m in group.items() if not held_out(name)]
        others = [m for name, m in group.items() if held_out(name)]
        parts += [(subset, evaluator.model, evaluator.tokenizer, recs)
                  for subset, recs in ((others, records), (single, fact_records)) if subset]
    return evaluate_plan(parts, fluency_cases=fluency_cases, progress=progress, **options)


def _table(cases: pd.DataFrame, methods: Sequence[str], tasks: Sequence[str]) -> pd.DataFrame:
    subset = cases[cases.method.isin(methods) & cases.task.isin(tasks)]
    summary = summarize(subset).reindex([(m, t) for m in methods for t in tasks
                                         if ((subset.method == m) & (subset.task == t)).any()])
    return summary


def multitask_table(cases: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Experiment 1 (the paper's Table 3): per method and training task, and the average over the
    training tasks (``task = "average"``).  Default methods: the compared set and single-task MEND."""
    methods = _methods.table_methods("multitask") if methods is None else tuple(methods)
    trainable = _tasks.trainable_tasks()
    per_task = _table(cases, methods, trainable)
    average = average_over_tasks(per_task)
    average.index = pd.MultiIndex.from_tuples([(m, "average") for m in average.index], names=["method", "task"])
    combined = pd.concat([per_task.drop(columns="n"), average])
    order = [(m, t) for m in methods for t in (*trainable, "average") if (m, t) in combined.index]
    return combined.reindex(order)


def holdout_table(cases: pd.DataFrame, methods: Sequence[str] | None = None, task: str | None = None) -> pd.DataFrame:
    """Experiment 2: every compared method on the held-out task (ZsRE), which no editor was trained on."""
    methods = _methods.compared_methods() if methods is None else tuple(methods)
    if task is None:
        held = _tasks.held_out_tasks()
        if not held:
            raise ValueError("holdout_table: no task has role 'held_out'")
        task = held[0]
    return _table(cases, methods, (task,)).droplevel("task")


def unseen_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Experiment 3: InstructEdit with a seen vs the held-out instruction, per task."""
    return _table(cases, _methods.table_methods("unseen"), _tasks.task_names())


def headline(cases: pd.DataFrame) -> dict[str, Any]:
    """The numbers the chapter and ``reproduce`` state, as plain floats."""
    multi = multitask_table(cases)
    hold = holdout_table(cases)
    unseen = unseen_table(cases)

    def avg(method: str, metric: str = "reliability") -> float:
        return float(multi.loc[(method, "average"), metric])

    out = {
        "multitask_reliability": {m: avg(m) for m in multi.index.get_level_values("method").unique()},
        "instructedit_minus_multitask_mend": avg("InstructEdit") - avg("MEND (multi-task)"),
        "instructedit_minus_best_baseline": avg("InstructEdit") - max(
            avg(m) for m in multi.index.get_level_values("method").unique() if m not in ("InstructEdit", SINGLE)),
        "holdout_reliability": {m: float(hold.loc[m, "reliability"]) for m in hold.index},
        "unseen_minus_seen_reliability": {
            t: float(unseen.loc[(UNSEEN, t), "reliability"] - unseen.loc[("InstructEdit", t), "reliability"])
            for t in unseen.index.get_level_values("task").unique()},
    }
    return out


# ---------------------------------------------------------------------------------------------
# End to end: ``instructedit-lite reproduce``
# ---------------------------------------------------------------------------------------------


def _markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    frame = table.reset_index()
    head = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"

    def cell(v):
        if isinstance(v, float):
            return "–" if v != v else f"{v:.{digits}f}"
        return str(v)

    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _held_out_label() -> str:
    held = _tasks.held_out_tasks()
    return (_tasks.get_task(held[0]).label or held[0]) if held else "none"


def _claims_markdown(claims: Mapping[str, Any]) -> str:
    why = [f"- {key}: not decided. {c['why']}" for key, c in claims.items() if c.get("why")]
    return "\n\n".join([_markdown(claim_rows(claims)), *(["Editors that did not learn:", "\n".join(why)] if why else [])])


RESULT_COLUMNS = ["reliability", "generalization", "locality", "portability", "fluency"]
#: Teacher-forced columns beside their generation-success and WILD counterparts (results.md).
GENERATION_COLUMNS = ["reliability", "reliability_em", "gen_reliability", "wild_reliability", "generalization",
                      "gen_generalization", "wild_generalization", "portability", "gen_portability", "wild_portability",
                      "locality", "gen_locality", "wild_locality"]


def reproduce(out_dir, *, model: Any = "embedded", data=None, smoke: bool = False, seed: int = 0,
              n_cases: int | None = None, processes: int | None = None, progress: bool = True,
              fluency_cases: int | None = None, fluency: str = "easyedit", generation: bool = True,
              wild_tokens: int = WILD_MAX_TOKENS, base=None, trained: Mapping[str, TrainedEditor] | None = None,
              methods: Mapping[str, Editor] | None = None,
              records: Mapping[str, list[EditRecord]] | None = None) -> dict[str, Any]:
    """The book's editors and experiments end to end for ``model`` (``"embedded"``, ``"smollm2"``, a
    Hugging Face name or folder: :func:`~instructedit_lite.models.load_model`, with ``data`` and
    ``seed``; or a loaded ``base``): train (or load) every editor a registered method needs,
    evaluate every registered method on the first test records of each task (:data:`EVALUATION`),
    and write ``out_dir/results.json``, ``out_dir/results.md`` and the per-case table
    ``out_dir/cases.csv`` (each written atomically), with the teacher-forced, the
    generation-success and the WILD columns (``generation``; WILD answers of at most
    ``wild_tokens`` tokens), fluency by the ``fluency`` convention
    (``instructedit_lite.evaluate.FLUENCY_MODES``) and the verdicts of experiments 1-3
    (:func:`~instructedit_lite.claims.experiment_claims`).  ``processes``: editors trained that
    many at a time (default: the cores); on the real scale the cases are shared out over as many
    processes.  ``trained``, ``methods`` and ``records``: given by a caller that prepared them
    (e.g. a test with an editor that cannot learn).  Returns the results dictionary."""
    out = Path(out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if base is None:
        base = load_model(model, data=data, seed=seed, size="smoke" if smoke else "default", progress=progress)
        timings["base_model_s"] = time.perf_counter() - start
    sizes = EVALUATION[base.scale]
    n_cases = n_cases or (sizes["n_cases_smoke"] if smoke else sizes["n_cases"])
    start = time.perf_counter()
    if trained is None:
        trained = train_editors(editor_configs(seed, smoke, model=base), base, processes=processes,
                                progress=progress)
        timings["editors_s"] = time.perf_counter() - start
    torch.set_num_threads(1)  # evaluation edits one case at a time: small matrices, one thread is fastest

    start = time.perf_counter()
    if methods is None:
        methods = build_methods(trained, base=base, smoke=smoke)
    if records is None:
        records = evaluation_records(base.world, n_cases, responses=sizes["smoke_responses"] if smoke else None)
    if fluency_cases is None:  # generation is the slow part: at most one case per task in smoke mode
        fluency_cases = min(sizes["fluency_cases"], 1 if smoke else n_cases)
    parallel = {"processes": processes or cores()} if base.scale == "real" else {}
    weights = next(iter(trained.values())).config.mend.weight_names if trained else None
    cases = main_evaluation(methods, base.for_editing(weights), records,
                            fluency_cases=fluency_cases, progress=progress, fluency=fluency, generation=generation,
                            wild_tokens=wild_tokens, seed=seed, **parallel)
    timings["evaluation_s"] = time.perf_counter() - start
    per_method_seconds = cases.groupby("method")["edit_seconds"].mean()

    multi = multitask_table(cases)
    hold = holdout_table(cases)
    unseen = unseen_table(cases)
    not_learned = methods_not_learned(trained)
    claims = experiment_claims(cases, seed=seed, not_learned=not_learned)
    results = {
        "settings": {"smoke": smoke, "seed": seed, "cases_per_task": n_cases, "base_model": base.key, "model": base.info.get("name", "embedded"),
                     "fluency": fluency, "fluency_cases": fluency_cases, "generation_success": generation,
                     "wild_tokens": wild_tokens if generation else 0,
                     "editors": {name: {"config_key": t.config.key(), "train_seconds": t.summary["train_seconds"],
                                        "loaded_from_cache": t.loaded, "best_step": t.summary["best_step"],
                                        "did_not_learn": learning_problem(t)} for name, t in trained.items()},
                     "methods_not_learned": not_learned,
                     "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "multitask": nested(multi),
        "holdout": _jsonable({m: row.to_dict() for m, row in hold.iterrows()}),
        "unseen_instructions": nested(unseen),
        "headline": _jsonable(headline(cases)),
        "claims": _jsonable(claims_json(claims)),
        "timings": _jsonable({**timings, "mean_edit_seconds": per_method_seconds.to_dict()}),
    }
    markdown = "\n\n".join([
        f"# instructedit-lite reproduce ({base.info.get('name', 'embedded')}, {'smoke' if smoke else 'full'}: "
        f"{n_cases} test cases per task, seed {seed})",
        f"Fluency: {fluency} convention on {fluency_cases} case(s) per task "
        f"({'top-5 sampling, 100 tokens counting the prompt' if fluency == 'easyedit' else '100 greedy tokens'}).",
        "## Multi-task editing (Table 3 analogue)", _markdown(multi[RESULT_COLUMNS]),
        f"## Hold-out editing ({_held_out_label()}, no editor trained on it)", _markdown(hold[RESULT_COLUMNS]),
        "## Teacher-forced against generation success and WILD (multi-task editing)",
        "`gen_*`: the greedy answer begins with the target (locality: the greedy answer is unchanged); "
        f"`wild_*`: the answer decoded until a stop (at most {wild_tokens} tokens) is the target after "
        "normalisation (locality: unchanged); ConvSent has none. ConvSent's reliability is its ES; `token_accuracy` is the paper's ConvSent column.",
        _markdown(multi[GENERATION_COLUMNS + ["token_accuracy"]]),
        f"## Hold-out editing, generation success and WILD ({_held_out_label()})", _markdown(hold[GENERATION_COLUMNS]),
        "## Unseen instructions", _markdown(unseen[["reliability", "generalization", "locality"]]),
        "## The paper's claims (tests: instructedit_lite.claims; the interval is 95% for a gain, 90% for "
        "an equivalence; mde: the smallest effect found with 80% power)", _claims_markdown(claims),
        "## Timings (seconds)", _markdown(pd.Series(timings, name="seconds").to_frame()),
    ]) + "\n"
    atomic_write_text(out / "cases.csv", cases.to_csv(index=False))
    atomic_write_text(out / "results.md", markdown)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    return results
