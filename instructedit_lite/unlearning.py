"""Unlearning: an edit that removes a fact instead of replacing it (chapter 9).

Two ways to drive the true answer's probability down, for facts the model knows:

* a **refusal target**: edit ``prompt → "unknown"`` (:func:`forget_record`) with any method of the
  book: FT-M, IKE (the refusal is the "new fact" in the context), InstructEdit's trained editor as
  it is (no "forget" task was trained: the record keeps its own task's instruction);
* an **unlikelihood objective** (:class:`~instructedit_lite.editors.unlikelihood.Unlikelihood`): FT-M-style fine-tuning of one MLP output
  matrix (named by the model's architecture profile) on ``−mean log(1 − p(old answer token))``,
  teacher forced, no target at all.

:func:`evaluate_unlearning` measures, before and inside each edit, the old answer's probability
(whole answer, teacher forced) on the edit prompt and on its rephrases, whether greedy generation
still starts with the old answer, whether it gives the refusal, and the locality cost (argmax
agreement with the unedited model on the locality probes, with the method's context for IKE).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .editors import Editor, MendMethod
from .editors.finetune import FTM
from .editors.ike import IKE, Retriever, answer_logits, locality_scores
from .editors.unlikelihood import Unlikelihood, UnlikelihoodConfig
from .evaluate import locality_rows
from .sampling import greedy_text
from .progress import bar_disabled
from .records import EditRecord, RecordError
from .text import target_logprob, teacher_forced

__all__ = ["REFUSAL", "forget_record", "known_facts", "unlearning_methods", "evaluate_unlearning",
           "summarize_unlearning"]

#: The refusal target of a forget edit.
REFUSAL = "unknown"


def forget_record(record: EditRecord, target: str = REFUSAL) -> EditRecord:
    """``record`` as a forget edit: its old answer (``ground_truth[0]``) is to go, ``target`` replaces it."""
    if not record.ground_truth:
        raise RecordError(record.source or "<memory>", record.index, "ground_truth",
                          "a forget edit needs the old answer to remove")
    return replace(record, target_new=target)


def known_facts(model, tokenizer, records: Sequence[EditRecord], *, limit: int | None = None,
                chunk: int = 32) -> list[EditRecord]:
    """The records whose old answer the model gives (teacher-forced exact match): only those can be forgotten.

    ``limit``: stop once that many are found, scanning ``records`` in order, ``chunk`` records at a
    time (a small model knows few of the test facts: SmolLM2-135M a few in a hundred, so chapter 9
    scans only as far as it needs); the result is the first ``limit`` of the full scan's (up to
    rounding: the chunks are batched apart).
    """
    with_old = [r for r in records if r.ground_truth]
    if limit is None:
        if not with_old:
            return []
        em = teacher_forced(model, tokenizer, [r.prompt for r in with_old],
                            [r.ground_truth[0] for r in with_old]).exact_match
        return [r for r, known in zip(with_old, em) if known]
    if limit < 0 or chunk < 1:
        raise ValueError(f"known_facts: limit must be >= 0 and chunk >= 1, got {limit}, {chunk}")
    found: list[EditRecord] = []
    for start in range(0, len(with_old), chunk):
        if len(found) >= limit:
            break
        found += known_facts(model, tokenizer, with_old[start:start + chunk])
    return found[:limit]


def _old_answer_logprob(model, tokenizer, prompts: Sequence[str], old: str) -> list[float]:
    return target_logprob(model, tokenizer, list(prompts), [old] * len(prompts), reduction="sum") if prompts else []


def _greedy_starts_with(model, tokenizer, prompt: str, answer: str) -> bool:
    n = len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return greedy_text(model, tokenizer, prompt, n).strip().casefold().startswith(answer.strip().casefold())


def _probe_case(model, tokenizer, rec: EditRecord, old: str) -> dict[str, float]:
    rel = _old_answer_logprob(model, tokenizer, [rec.prompt], old)[0]
    gen = _old_answer_logprob(model, tokenizer, rec.rephrase, old)
    return {"old_prob": math.exp(rel), "old_prob_rephrase": float(np.mean(np.exp(gen))) if gen else math.nan,
            "greedy_old": float(_greedy_starts_with(model, tokenizer, rec.prompt, old)),
            "greedy_old_rephrase": float(np.mean([_greedy_starts_with(model, tokenizer, q, old) for q in rec.rephrase]))
            if rec.rephrase else math.nan,
            "greedy_refusal": float(_greedy_starts_with(model, tokenizer, rec.prompt, rec.target_new))}


def unlearning_methods(config: UnlikelihoodConfig, editor, instructions, pool: Sequence[EditRecord], *,
                       tokenizer, k: int, max_tokens: int, retriever: str | Retriever = "minilm") -> list[Editor]:
    """The four ways of forgetting that chapter 9 compares, on either model: FT-M towards the refusal
    on the unlikelihood editor's matrix, steps and learning rate (``config``, no norm box), so that
    the two differ only in the loss; the unlikelihood editor; IKE with the refusal as the new fact
    (``k`` demonstrations from ``pool``); and InstructEdit's trained ``editor`` towards the refusal
    (``instructions``: its task descriptions)."""
    ftm = FTM(layer=config.layer, module=config.module, steps=config.steps, lr=config.lr, eps=None)
    ftm.name = "FT-M (refusal)"
    ike = IKE(pool, k=k, tokenizer=tokenizer, max_tokens=max_tokens, retriever=retriever, name="IKE (refusal)")
    return [ftm, Unlikelihood(config), ike, MendMethod(editor, "InstructEdit (refusal)", instructions=instructions)]


def evaluate_unlearning(methods: Sequence[Editor], model, tokenizer, records: Sequence[EditRecord], *,
                        target: str = REFUSAL, progress: bool = True) -> pd.DataFrame:
    """Each method forgets each record's old answer (one edit on the original model, undone after).

    One row per method × record and phase (``before``: the unedited model on the plain probes, the
    same for every method; ``after``: inside the edit, on the method's prepared probes), columns from the probes (see module docstring) plus
    ``locality`` and ``drawdown`` (after only) and ``edit_seconds``.
    """
    rows = []
    for record in tqdm(records, desc="unlearning", disable=bar_disabled(progress)):
        forget = forget_record(record, target)
        old = record.ground_truth[0]
        pre_loc = answer_logits(model, tokenizer, locality_rows(record))
        before = _probe_case(model, tokenizer, forget, old)
        for method in methods:
            rec = method.prepare(forget)
            base = {"method": method.name, "task": record.task, "case": record.index}
            rows.append({**base, "phase": "before", **before})
            start = time.perf_counter()
            with method.edited(model, tokenizer, rec) as info:
                seconds = time.perf_counter() - start
                after = _probe_case(model, tokenizer, rec, old)
                locality, drawdown = locality_scores(pre_loc, answer_logits(model, tokenizer, locality_rows(rec)))
            rows.append({**base, "phase": "after", **after, "locality": locality, "drawdown": drawdown,
                         "edit_seconds": info.seconds or seconds})
    return pd.DataFrame(rows)


def summarize_unlearning(cases: pd.DataFrame) -> pd.DataFrame:
    """Per method and phase: the mean of every probe and of the locality (a wide table)."""
    columns = [c for c in ("old_prob", "old_prob_rephrase", "greedy_old", "greedy_old_rephrase", "greedy_refusal",
                           "locality", "drawdown") if c in cases]
    out = cases.groupby(["method", "phase"], sort=False)[columns].mean()
    out.insert(0, "n", cases.groupby(["method", "phase"], sort=False).size())
    return out
