"""The paper's metrics, as small functions on logits, labels and text.

All scores come from one right-padded batch of ``prompt + " " + answer`` rows
(:func:`~instructedit_lite.text.prompt_target_batch`), where ``labels`` are ``-100`` except on
the answer's tokens and ``logits[:, t]`` predicts token ``t + 1``:

* **token accuracy** (reliability, generalization, portability): the share of answer tokens that
  are the argmax prediction, teacher forced: partial credit for long answers (the reference
  implementation's measure); **exact match**: all of them right (stricter);
* **agreement** (locality): the share of answer positions whose argmax is the same before and
  after the edit, whether or not it was right;
* **mean log-probability** per answer token, for ConvSent's **edit success**
  ``ES = σ(mean log p(wanted) − mean log p(unwanted))`` times the reference's topic factor
  ``z_topic = min(1, exp(ℓ⁺_post − ℓ⁺_pre))`` (evaluation passes the unedited model's ``ℓ⁺_pre``
  and pools the tokens, as EasyEdit's ``es`` does), and its **drawdown** ``DD = KL(pre ‖ post)``
  on another topic's responses.  The paper's ConvSent *columns* are neither: its test script scores
  ConvSent like the fact tasks, by the token accuracy of ``target_new`` after the question
  (evaluation reports it as ``token_accuracy``);
* **fluency**: the weighted n-gram entropy of generated text, as EasyEdit scores it
  (:func:`fluency_easyedit`: case-sensitive words, prompt included; evaluation's default) or
  lower-cased over the continuation alone (:func:`fluency`, the greedy option).

Conventions of the paper's tables, as named options (chapter 5): :func:`generalization` falls back
to the edit prompt when a record has no rephrase (``convention="paper"``; the default gives NaN),
and :func:`probe_mean` averages per probe kind, then across kinds (``how="per_kind"``, KnowEdit's
way; the default pools every probe).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .text import IGNORE, shifted_predictions

__all__ = ["token_accuracy", "exact_match", "agreement", "mean_logprob", "pooled_logprob", "edit_success",
           "topic_factor", "drawdown", "ngram_entropy", "fluency", "fluency_easyedit", "words", "generalization",
           "probe_mean", "GENERALIZATION_CONVENTIONS", "PROBE_AGGREGATIONS"]


def _answer_mask(labels: Tensor) -> Tensor:
    mask = labels[:, 1:] != IGNORE
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no answer token (all labels are -100)")
    return mask


def token_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: the share of answer tokens predicted by the argmax (teacher forced)."""
    mask = _answer_mask(labels)
    predictions, _ = shifted_predictions(logits, labels)
    hits = (predictions == labels[:, 1:]) & mask
    return hits.sum(1) / mask.sum(1)


def exact_match(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: 1.0 when every answer token is the argmax prediction, else 0.0."""
    return (token_accuracy(logits, labels) == 1).float()


def agreement(pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: the share of answer positions where the argmax is the same before and after."""
    mask = _answer_mask(labels)
    same = (pre_logits[:, :-1].argmax(-1) == post_logits[:, :-1].argmax(-1)) & mask
    return same.sum(1) / mask.sum(1)


def mean_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: the mean log-probability of the answer tokens (float32)."""
    mask = _answer_mask(labels)
    targets = labels[:, 1:].clamp(min=0)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1) / mask.sum(1)


def pooled_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """The mean log-probability over every answer token of every row, pooled (a 1-element tensor).

    This is the reference's ``masked_mean`` in ``evaluate_utils.es``: long responses weigh more than
    short ones, unlike the mean of :func:`mean_logprob` over rows.
    """
    mask = _answer_mask(labels)
    targets = labels[:, 1:].clamp(min=0)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return ((logp * mask).sum() / mask.sum()).reshape(1)


def topic_factor(wanted_logprob: Tensor, pre_wanted_logprob: Tensor) -> float:
    """The reference's ``z_topic = min(1, exp(ℓ⁺_post − ℓ⁺_pre))`` (EasyEdit ``evaluate_utils.es``).

    ``ℓ⁺`` is the mean log-probability of the wanted responses after the edit and, from the unedited
    model on the same rows, before it.  It is 1 when the edit made the wanted responses no less
    likely, and shrinks an edit that won the sentiment contrast only by making the wanted responses
    themselves less likely.  No classifier is involved: it compares the model with itself.
    """
    gap = float(wanted_logprob.float().mean() - pre_wanted_logprob.float().mean())
    return min(1.0, math.exp(gap))


def edit_success(wanted_logprob: Tensor, unwanted_logprob: Tensor, pre_wanted_logprob: Tensor | None = None) -> float:
    """ConvSent ES: ``σ(mean log p(wanted responses) − mean log p(unwanted responses))`` (chapter 5).

    Both arguments are mean log-probabilities of responses after the *same* question about the
    edited topic, one per response (:func:`mean_logprob`) or one pooled over all tokens
    (:func:`pooled_logprob`, as the reference does).  0.5 means no preference; above 0.5 the wanted
    sentiment wins.  With ``pre_wanted_logprob`` (the wanted responses under the unedited model)
    the result is multiplied by the reference's :func:`topic_factor`, as EasyEdit's ``es`` does and
    as evaluation does by default; without it, the sentiment term alone.
    """
    gap = float(wanted_logprob.float().mean() - unwanted_logprob.float().mean())
    z_sentiment = 1.0 / (1.0 + math.exp(-gap))
    if pre_wanted_logprob is None:
        return z_sentiment
    return z_sentiment * topic_factor(wanted_logprob, pre_wanted_logprob)


def drawdown(pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: the token-mean ``KL(pre ‖ post)`` (nats) over the answer positions."""
    mask = _answer_mask(labels).float()
    pre = torch.log_softmax(pre_logits[:, :-1].float(), -1)
    post = torch.log_softmax(post_logits[:, :-1].float(), -1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    return (kl * mask).sum(1) / mask.sum(1)


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str, *, lower: bool = True) -> list[str]:
    """Words and punctuation marks (a dependency-free stand-in for nltk's tokenizer), lower-cased by default."""
    return _WORD.findall(text.lower() if lower else text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of ``tokens`` (0.0 if there is none)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    freqs = np.array(list(grams.values()), dtype=float) / total
    return float(-(freqs * np.log2(freqs)).sum())


def fluency(texts: str | Iterable[str], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3),
            *, lower: bool = True) -> float:
    """ROME's fluency: ``mean_n(w_n · H_n)`` over word bigrams and trigrams, averaged over texts.

    Repetitive text ("the the the ...") has few distinct n-grams and a low score; the KnowEdit
    tables report it multiplied by 100.  ``lower=False`` keeps case, as nltk's tokenizer does.
    """
    if isinstance(texts, str):
        texts = [texts]
    scores = []
    for text in texts:
        tokens = words(text, lower=lower)
        scores.append(float(np.mean([w * ngram_entropy(tokens, n) for n, w in zip(ns, weights)])))
    if not scores:
        raise ValueError("fluency: no text")
    return float(np.mean(scores))


def fluency_easyedit(texts: str | Iterable[str]) -> float:
    """Fluency scored as EasyEdit's ``test_generation_quality`` does it (chapter 5).

    Each text is what ``generate_fast`` returns: the prompt *and* its continuation, decoded,
    NFKD-normalised, blank lines joined; words keep their case.  Only the scoring side is here: the
    generation (top-k 5 sampling, seeded, 100 tokens counting the prompt's) is the caller's.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [unicodedata.normalize("NFKD", t).replace("\n\n", " ").replace("<|endoftext|>", "") for t in texts]
    return fluency(texts, lower=False)


GENERALIZATION_CONVENTIONS = ("honest", "paper")


def generalization(rephrase_scores: Sequence[float], reliability: float, convention: str = "honest") -> float:
    """A record's generalization from its rephrase scores, by the given convention (chapter 5).

    ``"honest"`` (the default): the mean over the rephrases, NaN when the record has none.
    ``"paper"``: the reference's fallback, which scores the (instructed) edit prompt itself when
    there is no rephrase, so the value is ``reliability``; on KnowEdit CounterFact and Recent,
    which have no rephrases, the paper's Generalization therefore equals its Reliability.
    """
    if convention not in GENERALIZATION_CONVENTIONS:
        raise ValueError(f"convention must be one of {GENERALIZATION_CONVENTIONS}, got {convention!r}")
    if len(rephrase_scores):
        return float(np.mean(rephrase_scores))
    return float(reliability) if convention == "paper" else math.nan


PROBE_AGGREGATIONS = ("pooled", "per_kind")


def probe_mean(scores: Iterable[tuple[str, float]], how: str = "pooled") -> float:
    """The mean of ``(probe kind, score)`` pairs: pooled over probes, or per kind then across kinds.

    ``"per_kind"`` is KnowEdit's aggregation (each kind, e.g. ``Reasoning`` and
    ``Subject_Aliasing``, counts once whatever its number of probes); ``"pooled"`` weighs every
    probe alike.  NaN when there is no probe.
    """
    if how not in PROBE_AGGREGATIONS:
        raise ValueError(f"how must be one of {PROBE_AGGREGATIONS}, got {how!r}")
    by_kind: dict[str, list[float]] = {}
    for kind, score in scores:
        by_kind.setdefault(kind, []).append(float(score))
    if not by_kind:
        return math.nan
    if how == "pooled":
        return float(np.mean([v for values in by_kind.values() for v in values]))
    return float(np.mean([np.mean(values) for values in by_kind.values()]))
