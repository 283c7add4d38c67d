"""Proposers: language models that write new task descriptions, and the filter they must pass.

The paper asked GPT-4 for task descriptions and revised them with the trial editor's scores as
feedback (its Figure 2; book chapter 10).  A :class:`Proposer` plays GPT-4's part::

    texts = proposer.propose(task, [(description, score), ...], n, rng)

The prompt (:func:`proposal_messages`) carries the task, what it is about, and the current best
descriptions with their scores, and asks for one new description.  Two implementations:

* :class:`LocalChatProposer`: any instruction-tuned causal LM through its tokenizer's chat
  template (by default SmolLM2-135M-Instruct), with seeded sampling;
* :class:`HTTPChatProposer`: any OpenAI-compatible ``/chat/completions`` endpoint, by URL and
  model name, over plain HTTP (``urllib``, no extra dependency).

Descriptions travel in the official file's notation: ConvSent's wanted sentiment and topic are
``[LABEL]`` and ``[TOPIC]`` (a language model copies those more reliably than ``{braces}``);
:func:`to_brackets` and :func:`from_brackets` convert.  A small model writes plenty of unusable
text, so every candidate goes through :class:`CandidateFilter`, which counts its rejections by
reason.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from .smollm2 import load_smollm2
from .tasks import get_task, is_sentiment

__all__ = ["task_summary", "required_placeholders", "PLACEHOLDERS", "to_brackets", "from_brackets", "proposal_messages", "clean_completion",
           "CandidateFilter", "Proposer", "LocalChatProposer", "HTTPChatProposer", "chat_replies",
           "load_smollm2_chat", "key_hash", "make_proposer"]

#: Placeholders in bracket notation, and the instruction-set fields they stand for.
PLACEHOLDERS = {"[LABEL]": "{sentiment}", "[TOPIC]": "{topic}"}


def required_placeholders(task: str) -> tuple[str, ...]:
    """The placeholders a task's descriptions must contain, each exactly once: the wanted sentiment
    and the topic for a sentiment task; none for a fact task."""
    return tuple(PLACEHOLDERS) if is_sentiment(task) else ()


def task_summary(task: str) -> str:
    """What an edit of ``task`` does, in the proposer's words: its declaration's ``summary``."""
    summary = get_task(task).summary
    if not summary:
        raise ValueError(f"task {task!r} has no summary for the instruction proposer: declare Task(..., summary=...)")
    return summary


def to_brackets(text: str) -> str:
    """An instruction-set description (``{sentiment}``/``{topic}``) in the official ``[LABEL]``/``[TOPIC]`` form."""
    for bracket, brace in PLACEHOLDERS.items():
        text = text.replace(brace, bracket)
    return text


def from_brackets(text: str) -> str:
    """The inverse of :func:`to_brackets`."""
    for bracket, brace in PLACEHOLDERS.items():
        text = text.replace(bracket, brace)
    return text


def proposal_messages(task: str, incumbents: Sequence[tuple[str, float]]) -> list[dict[str, str]]:
    """The chat the proposer answers: the task, the best descriptions so far with their scores, and
    the request for one better description (bracket notation)."""
    summary = task_summary(task)
    ranked = sorted(incumbents, key=lambda pair: -pair[1])
    lines = "\n".join(f"- score {score:.3f}: {to_brackets(text)}" for text, score in ranked)
    needs = required_placeholders(task)
    rule = (f"It must contain {' and '.join(needs)} exactly once each: they are replaced by the wanted sentiment "
            "and the topic." if needs else "It must not contain placeholders or brackets.")
    user = (f"We edit a language model's knowledge. Task '{task}': {summary}.\n"
            "Each edit input starts with a one-sentence description of the task. Descriptions that were tried, "
            "with their scores (the mean of edit reliability, generalization and locality; higher is better):\n"
            f"{lines}\n\n"
            f"Write one new description for this task that could score higher. {rule} "
            "Answer with the description only, one sentence.")
    return [{"role": "system", "content": "You are a careful writer of short task instructions."},
            {"role": "user", "content": user}]


_PREFIX = re.compile(r"^\s*(?:[-*•]|\d+[.)]|(?:new )?description\s*\d*\s*:|task\s*\d*\s*:)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def clean_completion(text: str) -> str:
    """The description in a model's reply: the first sentence of its first non-empty line, without
    bullets, numbering, a ``Description:`` or ``Task:`` label, or surrounding quotes (small models
    often go on after the one sentence they were asked for)."""
    for line in text.splitlines():
        previous = None
        while line != previous:  # labels and quotes nest in either order: '1. "Description: ..."'
            previous, line = line, _PREFIX.sub("", line.strip()).strip().strip('"“”\'`').strip()
        if line:
            return _SENTENCE_END.split(line, maxsplit=1)[0]
    return ""


@dataclass
class CandidateFilter:
    """Accepts a proposed description (bracket notation) or names why not; ``rejected`` counts reasons.

    Reasons: ``empty``; ``too short`` / ``too long`` (words, characters); ``placeholders`` (ConvSent
    needs ``[LABEL]`` and ``[TOPIC]`` once each, other tasks none, and no ``{``/``}`` anywhere since the
    text is formatted into the template); ``garbage`` (few letters, a very long token, a word
    repeated three times in a row, or an echo of the template's ``Task:``/``Input:`` lines);
    ``duplicate`` (of a description already tried or of another candidate, ignoring case,
    punctuation and spacing).
    """

    min_words: int = 6
    max_words: int = 40
    max_chars: int = 240
    rejected: Counter = field(default_factory=Counter)

    def reason(self, task: str, text: str, seen: Iterable[str] = ()) -> str | None:
        """Why ``text`` is rejected for ``task``, or ``None`` if it is accepted (counts nothing)."""
        text = text.strip()
        if not text:
            return "empty"
        words = text.split()
        if len(words) < self.min_words:
            return "too short"
        if len(words) > self.max_words or len(text) > self.max_chars:
            return "too long"
        if "{" in text or "}" in text or "\n" in text:
            return "placeholders"
        needs = required_placeholders(task)
        if any(text.count(p) != (1 if p in needs else 0) for p in PLACEHOLDERS):
            return "placeholders"
        letters = sum(c.isalpha() for c in text)
        if letters < 0.6 * len(text) or max(len(w) for w in words) > 25 or re.search(r"\b(task|input)\s*\d*\s*:", text, re.I):
            return "garbage"
        lower = [w.lower() for w in words]
        if any(lower[i] == lower[i + 1] == lower[i + 2] for i in range(len(lower) - 2)):
            return "garbage"
        if text[-1] not in ".!?":  # cut off by the token limit, or not a sentence
            return "unfinished"
        if _normal(text) in {_normal(s) for s in seen}:
            return "duplicate"
        return None

    def __call__(self, task: str, texts: Sequence[str], seen: Iterable[str] = ()) -> tuple[list[str], list[str | None]]:
        """``(accepted, reasons)``: the accepted texts in order, and per input text its rejection
        reason (``None`` when accepted).  Accepted texts count as seen for the ones after them."""
        seen = list(seen)
        accepted, reasons = [], []
        for text in texts:
            why = self.reason(task, text, seen)
            reasons.append(why)
            if why is None:
                accepted.append(text.strip())
                seen.append(text)
            else:
                self.rejected[why] += 1
        return accepted, reasons


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\[\]]+", " ", text.lower()).split())


class Proposer(abc.ABC):
    """Writes candidate task descriptions (bracket notation; see the module docstring)."""

    @abc.abstractmethod
    def propose(self, task: str, incumbents: Sequence[tuple[str, float]], n: int, rng: np.random.Generator) -> list[str]:
        """``n`` raw candidates for ``task`` given ``(description, score)`` pairs; seeded by ``rng``.
        Raw means unfiltered: pass them through :class:`CandidateFilter`."""

    @abc.abstractmethod
    def key(self) -> str:
        """A string that names the proposer and its settings (part of the proposal cache key)."""


@torch.no_grad()
def chat_replies(model, tokenizer, messages: list[dict[str, str]], n: int, seed: int, *,
                 max_new_tokens: int = 60, temperature: float = 0.9, top_p: float = 0.95) -> list[str]:
    """``n`` sampled replies of a chat LM to ``messages`` (its chat template), reproducible by ``seed``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_replies: the tokenizer has no chat template; use an instruction-tuned model")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # fork_rng: seeded sampling without moving the caller's global torch random state.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_p=top_p, max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


class LocalChatProposer(Proposer):
    """An instruction-tuned causal LM on this machine (default: SmolLM2-135M-Instruct), sampled
    with a seed drawn from ``rng``; the ``n`` candidates come from one batched ``generate``.
    Give ``model`` and ``tokenizer``, or a ``loader`` returning both, called at the first proposal."""

    def __init__(self, model=None, tokenizer=None, *, loader=None, name: str = "local", max_new_tokens: int = 48,
                 temperature: float = 0.9, top_p: float = 0.95):
        if (model is None or tokenizer is None) and loader is None:
            raise ValueError("LocalChatProposer: give model and tokenizer, or a loader")
        self.model, self.tokenizer, self.loader, self.name = model, tokenizer, loader, name
        self.settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}

    def propose(self, task, incumbents, n, rng):
        if self.model is None:
            self.model, self.tokenizer = self.loader()
        seed = int(rng.integers(2**31 - 1))
        replies = chat_replies(self.model.eval(), self.tokenizer, proposal_messages(task, incumbents), n, seed,
                               **self.settings)
        return [clean_completion(r) for r in replies]

    def key(self) -> str:
        return json.dumps({"proposer": "local", "name": self.name, **self.settings}, sort_keys=True)


def load_smollm2_chat(progress: bool = False):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (:func:`instructedit_lite.smollm2.load_smollm2`)."""
    return load_smollm2(progress=progress)


def make_proposer(kind: str = "smollm2", *, url: str | None = None, model: str | None = None) -> Proposer:
    """``"smollm2"``: :class:`LocalChatProposer` on SmolLM2-135M-Instruct (loaded on its first
    proposal, so a fully cached rerun never loads it); ``"http"``: an OpenAI-compatible endpoint
    (``url``, ``model``)."""
    if kind == "smollm2":
        return LocalChatProposer(loader=load_smollm2_chat, name="SmolLM2-135M-Instruct")
    if kind == "http":
        if not url or not model:
            raise ValueError("the http proposer needs --url (API base, e.g. https://api.openai.com/v1) and --api-model")
        return HTTPChatProposer(url, model)
    raise ValueError(f"unknown proposer {kind!r}; expected 'smollm2' or 'http'")


class HTTPChatProposer(Proposer):
    """An OpenAI-compatible chat endpoint: ``POST {url}/chat/completions`` with ``model`` and the
    messages, one request per candidate, each with a ``seed`` drawn from ``rng`` (servers that
    honour it make the run reproducible).  ``url`` is the API base, e.g.
    ``https://api.openai.com/v1``; ``api_key`` defaults to ``$OPENAI_API_KEY`` (none is sent if unset)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, temperature: float = 0.9,
                 max_tokens: int = 80, timeout: float = 60.0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.settings = {"temperature": temperature, "max_tokens": max_tokens}

    def _ask(self, messages: list[dict[str, str]], seed: int) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "seed": seed, **self.settings}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise RuntimeError(f"{self.url}: HTTP {exc.code} {exc.reason}: {detail}") from exc
        except urllib.error.URLError as exc:
            raise RuntimeError(f"{self.url}: cannot connect: {exc.reason}") from exc
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"{self.url}: reply has no choices[0].message.content: {raw[:300]!r}") from exc

    def propose(self, task, incumbents, n, rng):
        messages = proposal_messages(task, incumbents)
        return [clean_completion(self._ask(messages, int(rng.integers(2**31 - 1)))) for _ in range(n)]

    def key(self) -> str:
        return json.dumps({"proposer": "http", "url": self.url, "model": self.model, **self.settings}, sort_keys=True)


def key_hash(*parts) -> str:
    """A short stable hash of JSON-able parts (cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
