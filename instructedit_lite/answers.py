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

Both views read the same greedy continuation, to different lengths: :func:`said_scores` decodes
every prompt of a test case once, in one batch, and reads it both ways
(:func:`~instructedit_lite.generation.greedy_views`); it gives what the two functions give, in
about 60% of their time on SmolLM2.  ConvSent's answers are free text with a sentiment: both views
are NaN there.
"""

from __future__ import annotations

import math

import numpy as np

from .generation import (WILD_MAX_TOKENS, View, begins_with, contains_answer, decided, exact_answer, greedy_views,
                         wild_text, wild_tokens, wild_view)
from .records import EditRecord
from .tables import GEN_METRICS, WILD_METRICS
from .tasks import is_sentiment

__all__ = ["GEN_EXTRA_TOKENS", "gen_rows", "answer_tokens", "answer_text", "locality_greedy", "gen_scores",
           "locality_wild", "wild_scores", "locality_answers", "said_scores"]

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


def _locality_view(tokenizer, probe, before: list[int] | None = None) -> View:
    """The greedy answer to a locality probe (as many tokens as its answer); with ``before`` (the
    unedited model's answer) it ends at its first token that differs from it."""
    stop = None if before is None else (lambda ids: ids[-1] != before[len(ids) - 1])
    return answer_tokens(tokenizer, probe.answer), stop


def _gen_view(tokenizer, answers: tuple[str, ...]) -> View:
    """Generation success: as many tokens as the longest answer plus :data:`GEN_EXTRA_TOKENS`,
    ending where the answer is decided (more tokens cannot change it) or at the end of text."""
    count = max(answer_tokens(tokenizer, a) for a in answers) + GEN_EXTRA_TOKENS
    return count, lambda ids: ids[-1] == tokenizer.eos_token_id or decided(answer_text(tokenizer, ids), answers)


def _probes(record: EditRecord):
    """The locality probes whose answers generation scores (none for ConvSent, module docstring)."""
    return () if is_sentiment(record.task) else tuple(record.locality_probes)


def locality_greedy(model, tokenizer, record: EditRecord,
                    before: list[list[int]] | None = None) -> list[list[int]] | None:
    """The greedy answer to each locality probe (as many tokens as the probe's answer); None for
    ConvSent, whose generation success is not defined (module docstring).  With ``before`` (the
    unedited model's answers) a row stops at its first token that differs from them."""
    probes = _probes(record)
    if not probes:
        return None
    views = [[_locality_view(tokenizer, p, None if before is None else before[k])] for k, p in enumerate(probes)]
    return [ids for (ids,) in greedy_views(model, tokenizer, [p.prompt for p in probes], views)]


def locality_wild(model, tokenizer, record: EditRecord, *, max_tokens: int = WILD_MAX_TOKENS,
                  before: list[list[int] | None] | None = None) -> list[list[int] | None] | None:
    """The WILD token ids of each locality probe's answer (None for ConvSent, as
    :func:`locality_greedy`); with ``before``, a row stops at its first token that differs."""
    probes = _probes(record)
    if not probes:
        return None
    return wild_tokens(model, tokenizer, [p.prompt for p in probes], max_tokens=max_tokens, before=before)


def locality_answers(model, tokenizer, record: EditRecord, *, max_tokens: int = WILD_MAX_TOKENS):
    """:func:`locality_greedy` and :func:`locality_wild` (None where ``max_tokens`` is 0) from one
    decoding of the locality probes (:func:`~instructedit_lite.generation.greedy_views`)."""
    probes = _probes(record)
    if not probes:
        return None, None
    views = [[_locality_view(tokenizer, p)] + ([wild_view(model, tokenizer, p.prompt, max_tokens=max_tokens)]
                                              if max_tokens else []) for p in probes]
    found = greedy_views(model, tokenizer, [p.prompt for p in probes], views)
    return [v[0] for v in found], ([v[1] for v in found] if max_tokens else None)


def answer_text(tokenizer, ids: list[int]) -> str:
    """The greedy answer's text: its tokens up to the first end-of-text token, decoded."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _unchanged(pre, post) -> float:
    """The share of locality answers the edit left unchanged, token for token."""
    same = [a == b for a, b in zip(pre, post) if a is not None and b is not None]
    return float(np.mean(same)) if same else math.nan


def _gen_columns(tokenizer, rows, generated, pre_greedy, post_greedy) -> dict[str, float]:
    out = dict.fromkeys(GEN_METRICS, math.nan)
    # a prompt too long for the context with its answer (an in-context edit) is not scored: NaN
    hits = [(kind, begins_with(answer_text(tokenizer, ids), answers))
            for (kind, _, answers), ids in zip(rows, generated) if ids is not None]
    for kind in ("reliability", "generalization", "portability"):
        values = [h for k, h in hits if k == kind]
        out[f"gen_{kind}"] = float(np.mean(values)) if values else math.nan
    if pre_greedy is not None:
        out["gen_locality"] = _unchanged(pre_greedy, post_greedy)
    return out


def _wild_columns(tokenizer, rows, said_ids, pre_wild, post_wild) -> tuple[dict[str, float], str | None]:
    out = dict.fromkeys(WILD_METRICS, math.nan)
    said = [None if ids is None else wild_text(tokenizer, ids) for ids in said_ids]
    for kind in ("reliability", "generalization", "portability"):
        pairs = [(a, answers) for (k, _, answers), a in zip(rows, said) if k == kind and a is not None]
        if pairs:
            out[f"wild_{kind}"] = float(np.mean([exact_answer(a, answers) for a, answers in pairs]))
            out[f"wild_contains_{kind}"] = float(np.mean([contains_answer(a, answers) for a, answers in pairs]))
    if pre_wild is not None:
        out["wild_locality"] = _unchanged(pre_wild, post_wild)
    return out, said[0]


def gen_scores(model, tokenizer, rec: EditRecord, pre_greedy) -> dict[str, float]:
    """The ``gen_*`` columns of the (prepared) record ``rec`` on the edited model; ``pre_greedy``: the
    unedited model's :func:`locality_greedy` answers (None: no ``gen_locality``)."""
    if is_sentiment(rec.task):
        return dict.fromkeys(GEN_METRICS, math.nan)
    rows = gen_rows(rec)
    views = [[_gen_view(tokenizer, answers)] for _, _, answers in rows]
    generated = [ids for (ids,) in greedy_views(model, tokenizer, [p for _, p, _ in rows], views)]
    post = None if pre_greedy is None else locality_greedy(model, tokenizer, rec, before=pre_greedy)
    return _gen_columns(tokenizer, rows, generated, pre_greedy, post)


def wild_scores(model, tokenizer, rec: EditRecord, pre_wild, max_tokens: int) -> tuple[dict[str, float], str | None]:
    """The ``wild_*`` columns and the WILD answer to the edit prompt."""
    if is_sentiment(rec.task):
        return dict.fromkeys(WILD_METRICS, math.nan), None
    rows = gen_rows(rec)
    said = wild_tokens(model, tokenizer, [p for _, p, _ in rows], max_tokens=max_tokens)
    post = None if pre_wild is None else locality_wild(model, tokenizer, rec, max_tokens=max_tokens, before=pre_wild)
    return _wild_columns(tokenizer, rows, said, pre_wild, post)


def said_scores(model, tokenizer, rec: EditRecord, pre_greedy, pre_wild,
                max_tokens: int) -> tuple[dict[str, float], dict[str, float], str | None]:
    """:func:`gen_scores` and :func:`wild_scores` (``max_tokens`` 0: WILD's columns NaN) from one
    decoding of every prompt of the case: the edit prompt, its rephrases and portability probes
    (read as generation success and as WILD) and the locality probes (read as each view's
    locality).  The same values as the two functions give, at the cost of one of them."""
    if is_sentiment(rec.task):
        return dict.fromkeys(GEN_METRICS, math.nan), dict.fromkeys(WILD_METRICS, math.nan), None
    wild = max_tokens > 0
    rows = gen_rows(rec)
    prompts = [p for _, p, _ in rows]
    views = [[_gen_view(tokenizer, answers)] + ([wild_view(model, tokenizer, p, max_tokens=max_tokens)] if wild else [])
             for _, p, answers in rows]
    probes = _probes(rec) if (pre_greedy is not None or (wild and pre_wild is not None)) else ()
    for k, probe in enumerate(probes):
        prompts.append(probe.prompt)
        views.append(([_locality_view(tokenizer, probe, pre_greedy[k])] if pre_greedy is not None else [])
                     + ([wild_view(model, tokenizer, probe.prompt, max_tokens=max_tokens, before=pre_wild[k])]
                        if wild and pre_wild is not None else []))
    found = greedy_views(model, tokenizer, prompts, views)
    edit, local = found[:len(rows)], found[len(rows):]
    gen = _gen_columns(tokenizer, rows, [v[0] for v in edit], pre_greedy, [v[0] for v in local])
    if not wild:
        return gen, dict.fromkeys(WILD_METRICS, math.nan), None
    post_wild = [v[-1] for v in local]
    wild_cols, said = _wild_columns(tokenizer, rows, [v[1] for v in edit], pre_wild, post_wild)
    return gen, wild_cols, said
