"""Evaluation: every test case is one edit on the original model, scored, then undone exactly.

For each record and each method (:class:`~instructedit_lite.editors.Editor`):

1. ``rec = method.prepare(record)``: InstructEdit prefixes the edit prompt, the rephrases and the
   portability probes with the task instruction; locality probes are never prefixed.
2. Before the edit (once per record, shared by all methods): the locality rows' logits and the
   greedy answers to the locality prompts; for ConvSent (per method: the rows carry its
   instruction) the scoring rows' logits, for ES's topic factor.
3. Inside ``with method.edited(model, tokenizer, rec)``: one batched forward pass over all scoring
   rows (edit prompt, rephrases, portability), one over the locality rows, one batched greedy
   decoding of all of them read as generation success and as WILD
   (:func:`~instructedit_lite.answers.said_scores`), and, for the first ``fluency_cases`` records
   of each task, the text scored for fluency.  Decoding runs through ``model``'s forward like the scores
   (:mod:`~instructedit_lite.generation`), so an engine or a hook-based edit is seen the same way.
4. On leaving the block the model is the original again; the next case starts from it.

Scores per case (columns of the tidy table, one row per method × case):

==================  ========================================  ==========================================
column              fact tasks (counterfact, wikirecent, zsre) convsent
==================  ========================================  ==========================================
reliability         token accuracy of ``target_new``           ES on the edit question
reliability_em      exact match of ``target_new``              1 if the wanted sentiment wins there
token_accuracy      token accuracy of ``target_new``           the same: the paper's ConvSent column
generalization      token accuracy on the rephrases (mean)     ES on the rephrased question
generalization_em   exact match on the rephrases (mean)        1 if the wanted sentiment wins there
generalization_ref  ``generalization``, or without a rephrase  the same
                    ``reliability`` (the reference's fallback)
portability         token accuracy of the portability answers  (none)
portability_em      exact match of the portability answers     (none)
locality            argmax agreement pre/post, locality rows   agreement on another topic's responses
drawdown            KL(pre ‖ post) on the locality rows        DD: the same, the ConvSent metric
gen_reliability     greedy answer begins with ``target_new``   (none: NaN)
gen_generalization  the same after each rephrase (mean)        (none: NaN)
gen_portability     greedy answer begins with an alias         (none: NaN)
gen_locality        greedy locality answer unchanged           (none: NaN)
wild_reliability    WILD answer is ``target_new`` (exact)      (none: NaN)
wild_generalization the same after each rephrase (mean)        (none: NaN)
wild_portability    WILD answer is an alias (exact)            (none: NaN)
wild_locality       WILD locality answer unchanged             (none: NaN)
wild_contains_*     WILD answer contains the answer            (none: NaN)
fluency             n-gram entropy of generated text           the same
==================  ========================================  ==========================================

``generalization_ref`` is the reference's convention for tables set beside the paper's: EasyEdit
scores a record without a rephrase on the edit prompt itself, so on KnowEdit CounterFact and
Recent its Generalization equals its Reliability (chapter 7).

**Teacher-forced** scores (the paper's) hand the model the answer's earlier tokens; **generation
success** (``gen_*``, chapter 5) asks what the edited model actually says: the greedy
continuation of the (instructed) prompt, as many tokens as the answer has plus
``GEN_EXTRA_TOKENS``, normalised (case, spacing, surrounding punctuation), counts when it
begins with an acceptable answer (``target_new``; a probe's aliases), a plain prefix test.  ``gen_locality`` is the
share of locality prompts whose greedy answer (as many tokens as the probe's answer) is the same
token for token after the edit.  A greedy answer whose tokens are the target's is exactly a
teacher-forced exact match, so ``gen_reliability ≥ reliability_em`` up to ties in the argmax;
it is higher when the model says the answer in other tokens or letter case.  ConvSent's
answers are free text with a sentiment, which no cheap rule judges honestly: its ``gen_*`` and
``wild_*`` are NaN.

**WILD** (``wild_*``, "The Mirage of Model Editing", Yang et al. 2025, as EasyEdit runs it) is the
field's current protocol and the strictest view: the model decodes greedily until it writes a
stop (``.``, a newline, an end token) or :data:`~instructedit_lite.generation.WILD_MAX_TOKENS`
tokens; the text before the stop is its answer, which counts only when it *equals* an acceptable
answer after SQuAD's normalisation (:func:`~instructedit_lite.generation.exact_answer`): "Paris,
the capital" does not count for "Paris".  ``wild_contains_*`` is the lenient secondary (the answer
contains one as whole words); ``wild_locality`` the share of locality prompts whose WILD answer is
unchanged by the edit, token for token through its stop.  WILD runs with ``generation`` and
``wild_tokens`` (the cap; 0 turns it off).

ES (edit success) is the reference's (EasyEdit ``evaluate_utils.es``):
``σ(ℓ⁺ − ℓ⁻) · min(1, exp(ℓ⁺ − ℓ⁺_pre))``, with ``ℓ⁺``/``ℓ⁻`` the mean log-probability per token
pooled over all responses of the wanted/other sentiment after the question, and ``ℓ⁺_pre`` the
same for the unedited model (:func:`~instructedit_lite.metrics.edit_success`,
:func:`~instructedit_lite.metrics.topic_factor`).  The paper's ConvSent *columns* are plain token
accuracy of ``target_new`` after the question (``token_accuracy``); the tables' averages over
tasks use ``reliability``, i.e. ES for ConvSent.

**Fluency** follows EasyEdit's ``generate_fast`` by default (``fluency="easyedit"``): top-5
sampling from a generator seeded per case (:func:`~instructedit_lite.sampling.case_generator`,
the same for every method), until prompt and continuation hold 100 tokens, scored on the whole
text with case-sensitive words (:func:`~instructedit_lite.metrics.fluency_easyedit`).
``fluency="greedy"``: 100 greedy tokens after the prompt, the continuation alone, lower-cased.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics
from .answers import GEN_EXTRA_TOKENS, locality_answers, locality_greedy, locality_wild, said_scores
from .editors import Editor
from .engine import PrefixEngine, scored_batch
from .generation import WILD_MAX_TOKENS
from .sampling import case_generator, greedy_text, sample_text
from .parallel import map_in_processes
from .progress import bar_disabled
from .records import EditRecord
# The tables, files and intervals made from the per-case table live in :mod:`.tables`; the names stay
# importable from here, where the chapters import them.
from .tables import (GEN_METRICS, METRICS, WILD_METRICS, average_over_tasks, nested, paired_difference,  # noqa: F401
                     summarize, timed, write_results)
from .tasks import is_sentiment, task_names
from .text import model_inputs, prompt_target_batch

__all__ = ["METRICS", "GEN_METRICS", "WILD_METRICS", "locality_wild", "FLUENCY_MODES", "GEN_EXTRA_TOKENS", "evaluate_case", "evaluate_methods", "evaluate_plan",
           "summarize", "average_over_tasks", "write_results", "locality_rows", "score_rows", "locality_greedy",
           "nested", "timed", "paired_difference"]

#: How fluency text is produced and scored: EasyEdit's ``generate_fast`` convention, or greedy.
FLUENCY_MODES = ("easyedit", "greedy")


def locality_rows(record: EditRecord) -> list[tuple[str, str]]:
    """The locality ``(prompt, answer)`` rows: the first answer of each probe; for ConvSent every
    response of the other topic (the drawdown is measured on all of them)."""
    if is_sentiment(record.task):
        return [(p.prompt, a) for p in record.locality_probes for a in p.answers]
    return [(p.prompt, p.answer) for p in record.locality_probes]


@torch.no_grad()
def _forward(model, tokenizer, rows: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of the rows; through a :class:`~instructedit_lite.engine.PrefixEngine`
    only at the scored positions (compact logits and labels, which every metric here reads the
    same way: the vocabulary head on a ConvSent record's 21 response rows is most of its cost)."""
    device = next(model.parameters()).device
    prompts, answers = zip(*rows)
    batch = prompt_target_batch(tokenizer, list(prompts), list(answers), device)
    if isinstance(model, PrefixEngine):
        batch = scored_batch(batch)
    return model(**model_inputs(batch)).logits, batch["labels"]


@torch.no_grad()
def _fact_rows(rec: EditRecord) -> list[tuple[str, str, str]]:
    rows = [("reliability", rec.prompt, rec.target_new)]
    rows += [("generalization", r, rec.target_new) for r in rec.rephrase]
    rows += [("portability", p.prompt, p.answer) for p in rec.portability_probes]
    return rows


def _convsent_rows(rec: EditRecord) -> list[tuple[str, str, str]]:
    rows = [("token_accuracy", rec.prompt, rec.target_new)]
    for kind, questions in (("reliability", [rec.prompt]), ("generalization", list(rec.rephrase))):
        for q_index, question in enumerate(questions):
            rows += [(f"{kind}/{q_index}/wanted", question, r) for r in rec.wanted_responses]
            rows += [(f"{kind}/{q_index}/unwanted", question, r) for r in rec.unwanted_responses]
    return rows


def _fact_scores(kinds: list[str], logits, labels, pre_logits=None) -> dict[str, float]:
    acc = metrics.token_accuracy(logits, labels).tolist()
    out: dict[str, float] = {}
    for kind in ("reliability", "generalization", "portability"):
        values = [a for k, a in zip(kinds, acc) if k == kind]
        out[kind] = float(np.mean(values)) if values else math.nan
        out[f"{kind}_em"] = float(np.mean([a == 1.0 for a in values])) if values else math.nan
    out["token_accuracy"] = out["reliability"]
    return out


def _convsent_scores(kinds: list[str], logits, labels, pre_logits) -> dict[str, float]:
    """ES with the reference's pooling and topic factor, per question, then averaged."""
    out: dict[str, float] = {"token_accuracy": float(metrics.token_accuracy(logits[:1], labels[:1])[0])}
    for kind in ("reliability", "generalization"):
        es, wins = [], []
        questions = sorted({k.split("/")[1] for k in kinds if k.startswith(kind + "/")})
        for q in questions:
            w = [i for i, k in enumerate(kinds) if k == f"{kind}/{q}/wanted"]
            u = [i for i, k in enumerate(kinds) if k == f"{kind}/{q}/unwanted"]
            wanted = metrics.pooled_logprob(logits[w], labels[w])
            unwanted = metrics.pooled_logprob(logits[u], labels[u]) if u else None
            if unwanted is None:  # no response of the other sentiment: nothing to contrast
                es.append(math.nan)
                wins.append(math.nan)
                continue
            es.append(metrics.edit_success(wanted, unwanted, metrics.pooled_logprob(pre_logits[w], labels[w])))
            wins.append(float(wanted.item() > unwanted.item()))
        out[kind] = float(np.mean(es)) if es else math.nan
        out[f"{kind}_em"] = float(np.mean(wins)) if wins else math.nan
    out["portability"] = out["portability_em"] = math.nan
    return out


def score_rows(rec: EditRecord) -> list[tuple[str, str, str]]:
    """The ``(kind, prompt, answer)`` rows a case scores on the edited model: reliability,
    generalization and portability for a fact task, ConvSent's response rows for a sentiment one."""
    return _convsent_rows(rec) if is_sentiment(rec.task) else _fact_rows(rec)


def _fluency(model, tokenizer, rec: EditRecord, record: EditRecord, tokens: int, mode: str, seed: int):
    if mode == "easyedit":
        text = sample_text(model, tokenizer, rec.prompt, max_out_len=tokens,
                           generator=case_generator(seed, record.task, record.source, record.index))
        return text, metrics.fluency_easyedit(text)
    text = greedy_text(model, tokenizer, rec.prompt, tokens)
    return text, metrics.fluency(text)


def evaluate_case(method: Editor, model, tokenizer, record: EditRecord, *, pre_locality=None,
                  pre_greedy=None, pre_wild=None, fluency_tokens: int = 0, fluency: str = "easyedit", generation: bool = True,
                  wild_tokens: int = WILD_MAX_TOKENS, seed: int = 0, pre_cache: dict | None = None) -> dict[str, Any]:
    """One test case: edit, score, undo.

    ``pre_locality`` / ``pre_greedy`` / ``pre_wild``: the unedited model's logits on
    :func:`locality_rows`, its :func:`~instructedit_lite.answers.locality_greedy` and its
    :func:`~instructedit_lite.answers.locality_wild` answers
    (computed here if not given).  ``generation``: also score what the edited model says, by
    generation success (``gen_*``) and WILD (``wild_*``; its answer to the edit prompt in the
    ``wild_answer`` column), whose answers stop after at most ``wild_tokens`` new tokens (0: no
    WILD columns).  ``fluency_tokens > 0`` also scores fluency on text generated
    after the edit prompt: ``fluency="easyedit"`` samples until prompt and text hold that many
    tokens, from a generator seeded by ``seed`` and the case; ``"greedy"`` adds that many greedy
    tokens.  ``pre_cache``: a dict shared by the methods of one record, where the unedited
    model's logits on ConvSent's score rows are kept (keyed by the rows).
    """
    if fluency not in FLUENCY_MODES:
        raise ValueError(f"fluency must be one of {FLUENCY_MODES}, got {fluency!r}")
    rec = method.prepare(record)
    loc_rows = locality_rows(record)
    if pre_locality is None:
        pre_locality = _forward(model, tokenizer, loc_rows)[0]
    wild = generation and wild_tokens > 0
    if generation and (pre_greedy is None or (wild and pre_wild is None)):
        pre_greedy, pre_wild = locality_answers(model, tokenizer, record, max_tokens=wild_tokens if wild else 0)
    sentiment = is_sentiment(record.task)
    rows = score_rows(rec)
    kinds = [k for k, _, _ in rows]
    score_pairs = [(p, a) for _, p, a in rows]
    pre_scores = None
    if sentiment:  # ES's topic factor; methods that score the same rows share the unedited logits
        pre_cache = {} if pre_cache is None else pre_cache
        key = tuple(score_pairs)
        if key not in pre_cache:
            pre_cache[key] = _forward(model, tokenizer, score_pairs)[0]
        pre_scores = pre_cache[key]
    with method.edited(model, tokenizer, rec) as info:
        logits, labels = _forward(model, tokenizer, score_pairs)
        post_locality, loc_labels = _forward(model, tokenizer, loc_rows)
        # what the edited model says: every answer of the case from one batched decoding
        gen, wild_cols, said = (said_scores(model, tokenizer, rec, pre_greedy, pre_wild, wild_tokens if wild else 0)
                                if generation else (dict.fromkeys(GEN_METRICS, math.nan),
                                                    dict.fromkeys(WILD_METRICS, math.nan), None))
        text, fluency_score = (_fluency(model, tokenizer, rec, record, fluency_tokens, fluency, seed)
                               if fluency_tokens else (None, math.nan))
    scores = (_convsent_scores if sentiment else _fact_scores)(kinds, logits, labels, pre_scores)
    # The reference scores a record without a rephrase on the (instructed) edit prompt, so its
    # Generalization equals Reliability there; ``generalization`` stays NaN, honestly undefined.
    scores["generalization_ref"] = (scores["reliability"] if math.isnan(scores["generalization"])
                                    else scores["generalization"])
    scores["locality"] = float(metrics.agreement(pre_locality, post_locality, loc_labels).mean())
    scores["drawdown"] = float(metrics.drawdown(pre_locality, post_locality, loc_labels).mean())
    scores.update(gen)
    scores.update(wild_cols)
    scores["fluency"] = fluency_score
    return {"method": method.name, "task": record.task, "case": record.index, "subject": record.subject,
            **{m: scores[m] for m in METRICS}, "edit_seconds": info.seconds, "generated": text, "wild_answer": said,
            **{f"detail:{k}": v for k, v in info.details.items()}}


def evaluate_methods(methods: Sequence[Editor], model, tokenizer, records: Mapping[str, Sequence[EditRecord]] | Sequence[EditRecord],
                     *, fluency_cases: int = 0, fluency_tokens: int = 100, fluency: str = "easyedit",
                     generation: bool = True, wild_tokens: int = WILD_MAX_TOKENS, seed: int = 0,
                     progress: bool = True, processes: int = 1) -> pd.DataFrame:
    """Every method on every record (task → records, or a flat list), one row per method × case.

    Records are the outer loop so that the unedited model's locality logits and greedy answers
    are computed once per record and shared by all methods.  The model's weights are checked to
    be the original ones after every case (a leaked edit would corrupt every later number).
    ``generation`` (generation success and WILD, on by default), ``wild_tokens``, ``fluency`` and
    ``seed``: as in :func:`evaluate_case`; fluency is scored on the first ``fluency_cases`` records of each task.
    ``processes > 1``: the records are shared out over that many worker processes of one thread
    each (:func:`~instructedit_lite.parallel.map_in_processes`); every case depends only on the
    record, the method and the seed, so the table is the same, row for row.
    """
    return evaluate_plan([(methods, model, tokenizer, records)], fluency_cases=fluency_cases,
                         fluency_tokens=fluency_tokens, fluency=fluency, generation=generation,
                         wild_tokens=wild_tokens, seed=seed, progress=progress, processes=processes)


#: One part of an evaluation plan: ``(methods, model, tokenizer, records)``, as
#: :func:`evaluate_methods` takes them.
Part = tuple[Sequence[Editor], Any, Any, "Mapping[str, Sequence[EditRecord]] | Sequence[EditRecord]"]


def evaluate_plan(parts: Sequence[Part], *, fluency_cases: int = 0, fluency_tokens: int = 100,
                  fluency: str = "easyedit", generation: bool = True, wild_tokens: int = WILD_MAX_TOKENS,
                  seed: int = 0, progress: bool = True, processes: int = 1) -> pd.DataFrame:
    """Several :func:`evaluate_methods` calls in one pass: the table of each part, one after the
    other, row for row (options as there).

    A record that several parts evaluate (the same object) is one piece of work: the unedited
    model's greedy locality answers are decoded once where the parts decode with the same model
    (an engine decodes with the model it wraps), and with ``processes > 1`` each worker receives
    every part's model once and takes the next record when it is free, the most expensive records
    first, instead of one fixed share of one part's records per process and a new set of processes
    for every part (chapter 8 evaluates its methods on three engines).
    """
    if fluency not in FLUENCY_MODES:
        raise ValueError(f"fluency must be one of {FLUENCY_MODES}, got {fluency!r}")
    shared, jobs = [], {}  # shared: (methods, model, tokenizer) per part; jobs: id(record) -> (record, entries)
    for k, (methods, model, tokenizer, records) in enumerate(parts):
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            where = "evaluate_methods" if len(parts) == 1 else f"evaluate_plan, part {k}"
            raise ValueError(f"{where}: method names must be distinct, got {names}")
        shared.append((list(methods), model, tokenizer))
        if isinstance(records, Mapping):
            records = [r for recs in records.values() for r in recs]
        seen_per_task: dict[str, int] = {}
        for position, record in enumerate(records):
            n_task = seen_per_task.get(record.task, 0)
            seen_per_task[record.task] = n_task + 1
            jobs.setdefault(id(record), (record, []))[1].append((k, position, n_task < fluency_cases))
    options = dict(fluency_tokens=fluency_tokens, fluency=fluency, generation=generation, wild_tokens=wild_tokens,
                   seed=seed)
    work = list(jobs.values())
    weights = [sum(len(shared[k][0]) for k, _, _ in entries) for _, entries in work]
    if processes > 1 and len(work) > 1:
        # a ConvSent record scores a few dozen response rows: about three fact records' work
        cost = [w * (3 if is_sentiment(record.task) else 1) for w, (record, _) in zip(weights, work)]
        order = sorted(range(len(work)), key=lambda i: -cost[i])
        found = map_in_processes(_evaluate_record, [(work[i][0], work[i][1], options, True) for i in order],
                                 processes, desc="evaluating", weights=[weights[i] for i in order],
                                 progress=progress, shared=(shared,))
        rows = [row for part in found for row in part]
    else:
        rows = []
        with tqdm(total=sum(weights), desc="evaluating", disable=bar_disabled(progress)) as bar:
            for record, entries in work:
                rows += _evaluate_record(shared, record, entries, options, bar=bar)
    rows.sort(key=lambda r: r[:3])
    return pd.DataFrame([row for *_, row in rows])


def _evaluate_record(shared, record: EditRecord, entries, options: dict, in_worker: bool = False,
                     bar=None) -> list[tuple[int, int, int, dict[str, Any]]]:
    """The cases of one record in the parts of ``entries`` (part, position, with fluency):
    ``(part, position, method index, row)``."""
    if in_worker and record.task not in task_names():  # a fresh process knows the built-in tasks only
        raise ValueError(f"evaluate_methods: task {record.task!r} ({record.source}, record {record.index}) was "
                         "registered at run time and is unknown to worker processes; evaluate it with processes=1")
    models = {id(m): m for m in (getattr(model, "full_model", model) for _, model, _ in shared)}  # engines: their model
    fingerprints = {key: _fingerprint(model) for key, model in models.items()}
    answers: dict[tuple[int, int], tuple] = {}  # the unedited greedy locality answers, per decoding model and tokenizer
    rows = []
    for k, position, with_fluency in entries:
        methods, model, tokenizer = shared[k]
        pre = _forward(model, tokenizer, locality_rows(record))[0]
        decoder = (id(getattr(model, "full_model", model)), id(tokenizer))
        if options["generation"] and decoder not in answers:
            answers[decoder] = locality_answers(model, tokenizer, record, max_tokens=options["wild_tokens"])
        pre_greedy, pre_wild = answers.get(decoder, (None, None))
        pre_cache: dict = {}
        for i, method in enumerate(methods):
            row = evaluate_case(method, model, tokenizer, record, pre_locality=pre, pre_greedy=pre_greedy,
                                pre_wild=pre_wild, pre_cache=pre_cache,
                                **{**options, "fluency_tokens": options["fluency_tokens"] if with_fluency else 0})
            rows.append((k, position, i, row))
            if bar is not None:
                bar.update(1)
    for key, model in models.items():
        if _fingerprint(model) != fingerprints[key]:
            raise RuntimeError(f"the model was not restored after editing {record.source}, record {record.index}")
    return rows


def _fingerprint(model) -> float:
    """A cheap checksum of all weights (the sum of every |w|), to catch edits that leak.

    In float32: the same weights give the same sum bit for bit, and it takes 0.15 s for SmolLM2's
    135 M weights against 0.37 s in float64 (one thread)."""
    return float(sum(torch.linalg.vector_norm(p.detach(), 1) for p in model.parameters()))
