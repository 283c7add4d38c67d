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
  ``ES = σ(mean log p(wanted) − mean log p(unwanted))`` and its **drawdown**
  ``DD = KL(pre ‖ post)`` on another topic's responses;
* **fluency**: the weighted n-gram entropy of generated text.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .text import IGNORE, shifted_predictions

__all__ = ["token_accuracy", "exact_match", "agreement", "mean_logprob", "edit_success", "drawdown",
           "ngram_entropy", "fluency", "words"]


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


def edit_success(wanted_logprob: Tensor, unwanted_logprob: Tensor) -> float:
    """ConvSent ES: ``σ(mean log p(wanted responses) − mean log p(unwanted responses))``.

    Both arguments are per-response mean log-probabilities after the *same* question about the
    edited topic, so the topic term of the original ConvSent metric (a topic classifier) is
    fixed by construction here.  0.5 means no preference; above 0.5 the wanted sentiment wins.
    """
    gap = float(wanted_logprob.float().mean() - unwanted_logprob.float().mean())
    return 1.0 / (1.0 + math.exp(-gap))


def drawdown(pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> Tensor:
    """Per row: the token-mean ``KL(pre ‖ post)`` (nats) over the answer positions."""
    mask = _answer_mask(labels).float()
    pre = torch.log_softmax(pre_logits[:, :-1].float(), -1)
    post = torch.log_softmax(post_logits[:, :-1].float(), -1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    return (kl * mask).sum(1) / mask.sum(1)


_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks (a dependency-free stand-in for nltk's tokenizer)."""
    return _WORD.findall(text.lower())


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of ``tokens`` (0.0 if there is none)."""
    grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    if total == 0:
        return 0.0
    freqs = np.array(list(grams.values()), dtype=float) / total
    return float(-(freqs * np.log2(freqs)).sum())


def fluency(texts: str | Iterable[str], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency: ``mean_n(w_n · H_n)`` over word bigrams and trigrams, averaged over texts.

    Repetitive text ("the the the ...") has few distinct n-grams and a low score; the KnowEdit
    tables report it multiplied by 100.
    """
    if isinstance(texts, str):
        texts = [texts]
    scores = []
    for text in texts:
        tokens = words(text)
        scores.append(float(np.mean([w * ngram_entropy(tokens, n) for n, w in zip(ns, weights)])))
    if not scores:
        raise ValueError("fluency: no text")
    return float(np.mean(scores))
