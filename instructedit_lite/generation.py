"""Decoding through plain forward passes: batched greedy answers and the checks that read them.

Every function here calls only the model's own forward on right-padded batches, so it sees
exactly what the teacher-forced scores see: an edited model, a hook-based editor (GRACE, CaliNet)
or a :class:`~instructedit_lite.engine.PrefixEngine` (chapter 7, decoded with its full model).
The KV cache is used only where it gives the same text as full passes (a plain Hugging Face model
whose hooks, if any, are :func:`position_wise`, as GRACE's and CaliNet's are); any other hook gets
a full-sequence forward per step.

* :func:`greedy_tokens`: ``n`` greedy tokens after each prompt, all prompts in one batch;
  :func:`greedy_tokens_within` the same, skipping prompts too long for the context;
  :func:`greedy_views` one greedy continuation per prompt read several ways (each with its own
  length and stop), all of a test case's answers in one batch;
* :func:`normalize` and :func:`begins_with`: the answer check of *generation success*;
* :func:`wild_answers`: WILD decoding (the field's current protocol, "The Mirage of Model Editing",
  Yang et al. 2025, in EasyEdit): greedy until a stop string (``.`` or a newline), an end token or
  :data:`WILD_MAX_TOKENS`, the text before the stop being the answer; :func:`exact_answer` and
  :func:`contains_answer` judge it after :func:`answer_normalize` (SQuAD's normalisation).

Whole texts one row at a time (EasyEdit's sampled fluency text, greedy text) are in
:mod:`~instructedit_lite.sampling`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import string
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["greedy_tokens", "greedy_tokens_within", "greedy_views", "View", "wild_view", "context_limit", "kv_cache_argument", "normalize", "begins_with",
           "no_cache_growth", "position_wise", "shared_prefix", "SHARED_PREFIX_MIN", "decided", "WILD_MAX_TOKENS", "WILD_STOPS",
           "wild_answers", "wild_tokens", "wild_text", "wild_answer", "answer_normalize", "exact_answer", "contains_answer"]

#: WILD decoding's cap on new tokens (EasyEdit's WILD evaluation: ``max_new_tokens=50``).
WILD_MAX_TOKENS = 50
#: The strings that end a WILD answer (with the tokenizer's special tokens, e.g. end of text).
WILD_STOPS = (".", "\n")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def context_limit(model) -> int:
    """How many tokens ``model`` reads (its position table)."""
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024


@contextlib.contextmanager
def no_cache_growth(model) -> Iterator[None]:
    """A :class:`~instructedit_lite.engine.PrefixEngine` caches every distinct row it sees; rows that
    exist only during decoding (the prompt plus a partial answer) are dropped again on exit."""
    cache = getattr(getattr(model, "cache", None), "rows", None)
    before = set(cache) if isinstance(cache, dict) else None
    try:
        yield
    finally:
        if before is not None:
            for key in [k for k in cache if k not in before]:
                del cache[key]


def _decoder(model):
    """The model to decode with: an engine's full model (the same modules, so the same edited
    weights and hooks; the engine only caches states below the edited blocks), else ``model``."""
    return getattr(model, "full_model", model)


def kv_cache_argument(model) -> str:
    """The keyword of ``model.forward`` for the KV cache: ``cache`` in transformers 5, earlier
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_tokens_within(model, tokenizer, prompts: Sequence[str], n_tokens: int | Sequence[int], *,
                         stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int] | None]:
    """:func:`greedy_tokens` for the prompts that fit the model's context with their new tokens,
    ``None`` for the others (e.g. an in-context edit whose demonstrations fill the context)."""
    limit = context_limit(_decoder(model))
    counts = [n_tokens] * len(prompts) if isinstance(n_tokens, int) else list(n_tokens)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    keep = [i for i, (n, c) in enumerate(zip(lengths, counts)) if n + c <= limit]
    out: list[list[int] | None] = [None] * len(prompts)
    if not keep:
        return out
    # one batch when its widest prompt and longest answer fit together, else one row at a time
    together = max(lengths[i] for i in keep) + max(counts[i] for i in keep) <= limit
    for group in [keep] if together else [[i] for i in keep]:
        sub_stop = None if stop is None else (lambda j, ids, g=group: stop(g[j], ids))
        found = greedy_tokens(model, tokenizer, [prompts[i] for i in group], [counts[i] for i in group],
                              stop=sub_stop)
        for i, ids in zip(group, found):
            out[i] = ids
    return out


#: One way of reading a greedy continuation: at most ``count`` tokens, ending after the first token
#: where ``stop(ids)`` holds (``stop`` None: after ``count`` tokens).
View = tuple[int, Callable[[list[int]], bool] | None]


def greedy_views(model, tokenizer, prompts: Sequence[str], views: Sequence[Sequence[View]]) -> list[list[list[int] | None]]:
    """Each prompt's greedy continuation, decoded once and read as each of its ``views[i]``.

    View ``j`` of prompt ``i`` gets the tokens up to its own end: exactly what decoding it alone
    would give (greedy decoding is deterministic), or None where the prompt and ``count`` tokens do
    not fit the context (as :func:`greedy_tokens_within`).  A row is decoded until all its views
    have ended, all rows in one batch.  A decoding step of a small model on a CPU costs about
    the same for one row as for twenty (it is bound by reading the weights), so the evaluation
    decodes every answer of a test case this way: once instead of four times.
    """
    limit = context_limit(_decoder(model))
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    fits = [[n + count <= limit for count, _ in vs] for n, vs in zip(lengths, views)]
    counts = [max((count for (count, _), ok in zip(vs, f) if ok), default=0) for vs, f in zip(views, fits)]
    ends: list[list[int | None]] = [[None] * len(vs) for vs in views]

    def stop(i: int, ids: list[int]) -> bool:  # record where each view ends; the row ends with the last
        done = True
        for j, (count, view_stop) in enumerate(views[i]):
            if fits[i][j] and ends[i][j] is None:
                if len(ids) >= count or (view_stop is not None and view_stop(ids)):
                    ends[i][j] = len(ids)
                else:
                    done = False
        return done

    keep = [i for i, count in enumerate(counts) if count > 0]
    found = greedy_tokens_within(model, tokenizer, [prompts[i] for i in keep], [counts[i] for i in keep],
                                 stop=lambda k, ids: stop(keep[k], ids))
    out: list[list[list[int] | None]] = [[None] * len(vs) for vs in views]
    for i, ids in zip(keep, found):
        for j in range(len(views[i])):
            if ids is not None and fits[i][j]:
                out[i][j] = ids[: ends[i][j] or len(ids)]
    return out


@torch.no_grad()
def greedy_tokens(model, tokenizer, prompts: Sequence[str], n_tokens: int | Sequence[int], *,
                  stop: Callable[[int, list[int]], bool] | None = None,
                  use_cache: bool | None = None) -> list[list[int]]:
    """Up to ``n_tokens`` greedy token ids after each prompt (one int for all, or one per prompt).

    One right-padded batch; a row's new token is read at its own last position.  ``stop(i, ids)``,
    asked after each new token of row ``i``, ends that row early (its answer is decided); decoding
    ends when every row has ended.  It does not stop at an end-of-text token: the caller decides
    what the tokens mean.  ``use_cache`` (default: where it is exact, ``_kv_cache_is_exact``)
    feeds one token per row and step with the KV cache (each row's own position ids; the prompt's
    padding stays masked); otherwise every step is a full forward pass over the rows so far.
    """
    if not prompts:
        return []
    model = _decoder(model)
    counts = [n_tokens] * len(prompts) if isinstance(n_tokens, int) else list(n_tokens)
    if len(counts) != len(prompts) or min(counts) < 1:
        raise ValueError(f"greedy_tokens: need one count >= 1 per prompt, got {counts}")
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if min(len(r) for r in rows) == 0:
        raise ValueError("greedy_tokens: a prompt has no tokens")
    steps, lengths = max(counts), [len(r) for r in rows]
    width = max(lengths) + steps
    if width > context_limit(model):
        raise ValueError(f"greedy_tokens: {max(lengths)} prompt tokens + {steps} new ones exceed the context "
                         f"of {context_limit(model)}")
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, device=device)
    out: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    cache = _kv_cache_is_exact(model) if use_cache is None else use_cache
    step = _cached_steps(model, ids, lengths) if cache else _full_steps(model, ids, lengths, out)
    while active:
        new = next(step).argmax(-1).tolist()
        for i in active:
            out[i].append(new[i])
        active = [i for i in active if len(out[i]) < counts[i] and not (stop and stop(i, out[i]))]
    step.close()
    return out


def _full_steps(model, ids: torch.Tensor, lengths: list[int], out: list[list[int]]):
    """Next-token logits of every row, a full forward pass per step over prompt and tokens so far."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    rows = torch.arange(len(lengths), device=ids.device)
    with no_cache_growth(model):
        while True:
            length = torch.tensor([n + len(o) for n, o in zip(lengths, out)], device=ids.device)
            for i, o in enumerate(out):  # the tokens chosen so far, in place
                ids[i, lengths[i]: lengths[i] + len(o)] = torch.tensor(o, dtype=torch.long, device=ids.device)
            used = int(length.max())  # columns beyond every row's end are never needed
            mask = (positions[:used] < length[:, None]).long()
            logits = model(input_ids=ids[:, :used], attention_mask=mask).logits
            yield logits[rows, length - 1]


#: Rows that start with at least this many equal tokens share one pass over them (:func:`greedy_tokens`
#: with the KV cache).
SHARED_PREFIX_MIN = 64


def shared_prefix(ids: torch.Tensor, lengths: Sequence[int]) -> int:
    """How many leading tokens every row of ``ids`` has in common, short of each row's last token."""
    if len(lengths) < 2:
        return 0
    same = (ids[:, : min(lengths) - 1] == ids[:1, : min(lengths) - 1]).all(0)
    return int(same.long().cumprod(0).sum())


def _cached_steps(model, ids: torch.Tensor, lengths: list[int]):
    """The same with the KV cache: the prompts once, then one token per row and step, at position
    ``length + k`` of its row; the prompts' padding stays in the cache, masked.  Rows that begin
    with the same :data:`SHARED_PREFIX_MIN` or more tokens (an in-context edit's demonstrations
    before each of its probes) read that prefix in one pass of one row, its cache then repeated
    for every row, and only their own tokens after it."""
    width = max(lengths)
    length = torch.tensor(lengths, device=ids.device)
    mask = (torch.arange(width, device=ids.device) < length[:, None]).long()
    rows = torch.arange(len(lengths), device=ids.device)
    arg = kv_cache_argument(model)
    start = shared_prefix(ids[:, :width], lengths)
    if start >= SHARED_PREFIX_MIN:
        head = getattr(model(input_ids=ids[:1, :start], use_cache=True), arg)
        head.batch_repeat_interleave(len(lengths))
        result = model(input_ids=ids[:, start:width], attention_mask=mask, use_cache=True, **{arg: head})
        logits, past = result.logits[rows, length - 1 - start], getattr(result, arg)
    else:
        result = model(input_ids=ids[:, :width], attention_mask=mask, use_cache=True)
        logits, past = result.logits[rows, length - 1], getattr(result, arg)
    while True:
        new = yield logits
        token = logits.argmax(-1) if new is None else new
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        result = model(input_ids=token[:, None], attention_mask=mask, position_ids=length[:, None],
                       use_cache=True, **{arg: past})
        logits, past, length = result.logits[:, -1], getattr(result, arg), length + 1


_STRIP = string.whitespace + string.punctuation + "“”‘’«»–—…"


def normalize(text: str) -> str:
    """Case-folded, inner whitespace collapsed, surrounding whitespace and punctuation stripped."""
    return " ".join(text.casefold().split()).strip(_STRIP)


def begins_with(generated: str, answers: Sequence[str]) -> bool:
    """Whether the normalised ``generated`` text starts with one normalised answer.

    A plain prefix test, lenient on purpose: "Parisian" begins with "Paris".  It makes every
    greedy answer whose tokens are the target's a success, so generation success can only fall
    below the teacher-forced exact match through ties in the argmax (chapter 5).
    """
    text = normalize(generated)
    return any(a and text.startswith(a) for a in map(normalize, answers))


def decided(generated: str, answers: Sequence[str]) -> bool:
    """Whether more tokens can no longer change :func:`begins_with`: the text already begins with
    an answer, or it has left every answer (it is no prefix of any).  Text ending in a partial
    character (``U+FFFD`` from a split byte sequence) is never decided."""
    if "\ufffd" in generated:
        return False
    text = normalize(generated)
    normalized = [a for a in map(normalize, answers) if a]
    return any(text.startswith(a) for a in normalized) or not any(a.startswith(text) for a in normalized)


def wild_answer(text: str) -> str:
    """The answer in a WILD continuation: the text before its first stop string (:data:`WILD_STOPS`),
    surrounding whitespace removed.  As in the reference, any ``.`` stops it ("St. Louis" ends at "St")."""
    cut = min((i for i in (text.find(s) for s in WILD_STOPS) if i >= 0), default=len(text))
    return text[:cut].strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def answer_normalize(text: str) -> str:
    """SQuAD's answer normalisation (the WILD evaluation's): lower case, punctuation removed, the
    articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_answer(answer: str, answers: Sequence[str]) -> bool:
    """WILD's exact match: the normalised answer equals one normalised acceptable answer."""
    said = answer_normalize(answer)
    return any(said == answer_normalize(a) for a in answers if answer_normalize(a))


def contains_answer(answer: str, answers: Sequence[str]) -> bool:
    """The secondary, lenient match: one normalised acceptable answer appears in the normalised
    answer as whole words ("born in Paris" contains "Paris"; "Parisian" does not)."""
    said = f" {answer_normalize(answer)} "
    return any(f" {a} " in said for a in map(answer_normalize, answers) if a)


def wild_view(model, tokenizer, prompt: str, *, max_tokens: int = WILD_MAX_TOKENS,
              before: list[int] | None = None) -> View:
    """WILD decoding of ``prompt`` as a :data:`View`: at most ``max_tokens`` (fewer where the context
    ends first), ending with the first stop string (:data:`WILD_STOPS`) or special token (end of
    text).  With ``before`` (the unedited model's tokens), also at the first token that differs
    from them: whether a locality answer is unchanged is then decided."""
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)

    def stop(ids: list[int]) -> bool:
        if before is not None and ids != before[:len(ids)]:
            return True
        return ids[-1] in special or any(s in tokenizer.decode(ids[-4:]) for s in WILD_STOPS)

    return max(1, min(max_tokens, context_limit(_decoder(model)) - n)), stop


def wild_tokens(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = WILD_MAX_TOKENS,
                before: Sequence[list[int] | None] | None = None) -> list[list[int] | None]:
    """WILD decoding: the greedy token ids after each prompt (:func:`wild_view`), all prompts in one
    batch; ``None`` for a prompt that leaves no room for a token.  ``before``: one
    :func:`wild_view` ``before`` per prompt."""
    befores = [None] * len(prompts) if before is None else before
    views = [[wild_view(model, tokenizer, p, max_tokens=max_tokens, before=b)] for p, b in zip(prompts, befores)]
    return [ids for (ids,) in greedy_views(model, tokenizer, prompts, views)]


def wild_text(tokenizer, ids: list[int]) -> str:
    """The WILD answer of decoded ``ids``: the text before the first special token and stop string."""
    special = set(tokenizer.all_special_ids)
    cut = next((k for k, t in enumerate(ids) if t in special), len(ids))
    return wild_answer(tokenizer.decode(ids[:cut]))


def wild_answers(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = WILD_MAX_TOKENS) -> list[str | None]:
    """The WILD answer the model gives after each prompt (:func:`wild_tokens`, :func:`wild_text`)."""
    return [None if ids is None else wild_text(tokenizer, ids)
            for ids in wild_tokens(model, tokenizer, prompts, max_tokens=max_tokens)]


def position_wise(hook: Callable) -> Callable:
    """Mark a forward hook whose change at a position depends only on that position's input
    (GRACE's codebook, CaliNet's memory slots): a KV-cached forward, one new token at a time,
    then changes exactly what a full-sequence forward changes, so decoding keeps the cache."""
    hook.position_wise = True
    return hook


def _kv_cache_is_exact(model) -> bool:
    """Whether a KV cache gives the same text as full forward passes: a plain Hugging Face model
    (edited weights or not) whose forward hooks are all :func:`position_wise`.  Any other hook
    (one that may look along the sequence) gets full forward passes; an engine has no cache."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    return all(getattr(hook, "position_wise", False) for m in model.modules()
               for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
