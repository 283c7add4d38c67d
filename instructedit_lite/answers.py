"""What the edited model says: the generated-answer columns of a test case (chapters 5 and 8).

Two views beside the teacher-forced scores of :mod:`~instructedit_lite.evaluate`, both decoded
through the model's own forward (:mod:`~instructedit_lite.generation`):

* **generation success** (``gen_*``, :func:`gen_scores`): the greedy continuation of each prompt, as
  many tokens as the answer has plus :data:`GEN_EXTRA_TOKENS`, counts when it begins with an
  acceptable answer (a prefix test); locality: the greedy locality answers unchanged
  (:func:`locality_greedy`);
* **WILD** (``wild_*``, :func:`wild_scores`): decoding until a stop, the answer compared by exact
  match after normalisation, with a contains-match as the lenient secondary; locality: the WILD
  locality answers unchanged token for token (:func:`locality_wild`).

ConvSent's answers are free text with a sentiment: both views are NaN there.
"""

from __future__ import annotations

import math

import numpy as np

from .generation import (WILD_MAX_TOKENS, begins_with, contains_answer, decided, exact_answer, greedy_tokens_within,
                         wild_answers, wild_tokens)
from .records import EditRecord
from .tables import GEN_METRICS, WILD_METRICS
from .tasks import is_sentiment

__all__ = ["GEN_EXTRA_TOKENS", "gen_rows", "answer_tokens", "answer_text", "locality_greedy", "gen_scores",
           "locality_wild", "wild_scores"]

#: Greedy tokens decoded beyond an answer's own length (its tokens in context may differ).
GEN_EXTRA_TOKENS = 2


def gen_rows(rec: EditRecord) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(kind, prompt, acceptable answers)`` of the generation-success rows of a fact record."""
    rows = [("reliability", rec.prompt, (rec.target_new,))]
    rows += [("generalization", r, (rec.target_new,)) for r in rec.rephrase]
    rows += [("portability", p.prompt, p.answers) for p in rec.portability_probes]
    return rows


def answer_tokens(tokenizer, answer: str) -> int:
    """How many tokens ``answer`` takes after a prompt (with its leading space)."""
    return len(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


def locality_greedy(model, tokenizer, record: EditRecord,
                    before: list[list[int]] | None = None) -> list[list[int]] | None:
    """The greedy answer to each locality probe (as many tokens as the probe's answer); None for
    ConvSent, whose generation success is not defined (module docstring).  With ``before`` (the
    unedited model's answers) a row stops at its first token that differs from them."""
    if is_sentiment(record.task) or not record.locality_probes:
        return None
    probes = record.locality_probes
    stop = None if before is None else (lambda i, ids: ids[-1] != before[i][len(ids) - 1])
    counts = [answer_tokens(tokenizer, p.answer) for p in probes]
    return greedy_tokens_within(model, tokenizer, [p.prompt for p in probes], counts, stop=stop)


def answer_text(tokenizer, ids: list[int]) -> str:
    """The greedy answer's text: its tokens up to the first end-of-text token, decoded."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def gen_scores(model, tokenizer, rec: EditRecord, pre_greedy) -> dict[str, float]:
    """The ``gen_*`` columns of the (prepared) record ``rec`` on the edited model; ``pre_greedy``: the
    unedited model's :func:`locality_greedy` answers (None: no ``gen_locality``)."""
    out = dict.fromkeys(GEN_METRICS, math.nan)
    if is_sentiment(rec.task):
        return out
    rows = gen_rows(rec)
    counts = [max(answer_tokens(tokenizer, a) for a in answers) + GEN_EXTRA_TOKENS for _, _, answers in rows]

    def stop(i: int, ids: list[int]) -> bool:  # the answer is decided: more tokens cannot change it
        return ids[-1] == tokenizer.eos_token_id or decided(answer_text(tokenizer, ids), rows[i][2])

    # a prompt too long for the context with its answer (an in-context edit) is not scored: NaN
    generated = greedy_tokens_within(model, tokenizer, [p for _, p, _ in rows], counts, stop=stop)
    hits = [(kind, begins_with(answer_text(tokenizer, ids), answers))
            for (kind, _, answers), ids in zip(rows, generated) if ids is not None]
    for kind in ("reliability", "generalization", "portability"):
        values = [h for k, h in hits if k == kind]
        out[f"gen_{kind}"] = float(np.mean(values)) if values else math.nan
    if pre_greedy is not None:
        post = locality_greedy(model, tokenizer, rec, before=pre_greedy)
        same = [a == b for a, b in zip(pre_greedy, post) if a is not None and b is not None]
        out["gen_locality"] = float(np.mean(same)) if same else math.nan
    return out


def locality_wild(model, tokenizer, record: EditRecord, *, max_tokens: int = WILD_MAX_TOKENS,
                  before: list[list[int] | None] | None = None) -> list[list[int] | None] | None:
    """The WILD token ids of each locality probe's answer (None for ConvSent, as
    :func:`locality_greedy`); with ``before``, a row stops at its first token that differs."""
    if is_sentiment(record.task) or not record.locality_probes:
        return None
    return wild_tokens(model, tokenizer, [p.prompt for p in record.locality_probes], max_tokens=max_tokens,
                       before=before)


def wild_scores(model, tokenizer, rec: EditRecord, pre_wild, max_tokens: int) -> tuple[dict[str, float], str | None]:
    """The ``wild_*`` columns and the WILD answer to the edit prompt."""
    out = dict.fromkeys(WILD_METRICS, math.nan)
    if is_sentiment(rec.task):
        return out, None
    rows = gen_rows(rec)
    said = wild_answers(model, tokenizer, [p for _, p, _ in rows], max_tokens=max_tokens)
    for kind in ("reliability", "generalization", "portability"):
        pairs = [(a, answers) for (k, _, answers), a in zip(rows, said) if k == kind and a is not None]
        if pairs:
            out[f"wild_{kind}"] = float(np.mean([exact_answer(a, answers) for a, answers in pairs]))
            out[f"wild_contains_{kind}"] = float(np.mean([contains_answer(a, answers) for a, answers in pairs]))
    if pre_wild is not None:
        post = locality_wild(model, tokenizer, rec, max_tokens=max_tokens, before=pre_wild)
        same = [a == b for a, b in zip(pre_wild, post) if a is not None and b is not None]
        out["wild_locality"] = float(np.mean(same)) if same else math.nan
    return out, said[0]
