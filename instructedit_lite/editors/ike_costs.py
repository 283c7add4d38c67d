"""What an in-context edit costs and whether the model follows it (chapter 9).

:func:`context_cost`: context tokens and seconds per query as stored edits accumulate, with every
stored fact in the context or only the retrieved ones; :func:`context_mediation`: whether the
model still gives the old answer with the new fact in its context.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..records import EditRecord
from ..text import prompt_target_batch, teacher_forced
from .ike import IKE, Retriever, fact_line

__all__ = ["context_cost", "context_mediation"]


def _time_forward(model, tokenizer, prompt: str, answer: str, repeats: int = 3) -> float:
    batch = prompt_target_batch(tokenizer, [prompt], [answer], next(model.parameters()).device)
    best = math.inf
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            best = min(best, time.perf_counter() - start)
    return best


def context_cost(model, tokenizer, edits: Sequence[EditRecord], stored: Sequence[int], *, k: int = 4,
                 max_tokens: int | None = None, retriever: str = "minilm") -> pd.DataFrame:
    """Context tokens, seconds per query and whether the query's own fact is in the context, against
    the number N of stored edits. The query is the latest stored edit; ``all``: every stored fact
    in the context; ``retrieved``: the ``k`` stored facts nearest to the query prompt (retrieval time
    included). Queries that do not fit ``max_tokens`` (the model's context) get NaN seconds."""
    lines = [f"New Fact: {fact_line(r)}\n" for r in edits[:max(stored)]]
    index = Retriever(lines, retriever)
    rows = []
    for n in stored:
        query = edits[n - 1]
        start = time.perf_counter()
        hits = index.search(f"Prompt: {query.prompt}", k, allowed=np.arange(len(lines)) < n)
        retrieval = time.perf_counter() - start
        for mode, chosen in (("all", list(range(n))), ("retrieved", list(reversed(hits)))):  # best fact last
            prompt = "".join(lines[i] for i in chosen) + f"Prompt: {query.prompt}"
            n_tokens = len(tokenizer(prompt + " " + query.target_new, add_special_tokens=False)["input_ids"])
            fits = max_tokens is None or n_tokens <= max_tokens
            seconds = _time_forward(model, tokenizer, prompt, query.target_new) if fits else math.nan
            correct = teacher_forced(model, tokenizer, [prompt], [query.target_new]).exact_match[0] if fits else math.nan
            rows.append({"mode": mode, "stored_edits": n, "context_tokens": n_tokens, "fits": fits,
                         "seconds": seconds + (retrieval if mode == "retrieved" else 0.0),
                         "fact_in_context": (n - 1) in chosen, "reliability_em": float(correct)})
    return pd.DataFrame(rows)


def context_mediation(model, tokenizer, method: IKE, records: Sequence[EditRecord]) -> pd.DataFrame:
    """Per record with an old answer: does the model still give the OLD answer (teacher-forced exact
    match) with the new fact in its context (a context-mediation failure)? Also whether it knew the
    old answer without context and whether it gives the new one with it."""
    rows = []
    for r in records:
        if not r.ground_truth:
            continue
        old, prepared = r.ground_truth[0], method.prepare(r)
        knew = teacher_forced(model, tokenizer, [r.prompt], [old]).exact_match[0]
        with_ctx = teacher_forced(model, tokenizer, [prepared.prompt, prepared.prompt], [old, r.target_new]).exact_match
        rows.append({"method": method.name, "task": r.task, "case": r.index, "knew_old": bool(knew),
                     "still_old": bool(with_ctx[0]), "gives_new": bool(with_ctx[1])})
    return pd.DataFrame(rows)
