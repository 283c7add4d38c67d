"""Turning (prompt, target) pairs into model batches, and teacher-forced scoring.

Every piece of the project that feeds an edit or a probe to a causal LM goes through
:func:`prompt_target_batch`: the prompt and ``" " + target`` are tokenised separately and joined, so
the target's tokens are exactly the tokens the model would produce after the prompt, and the labels
are ``-100`` everywhere except on the target.  Padding is on the right, so positions of real tokens
never move and ``logits[:, t]`` always predicts ``input_ids[:, t + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .progress import bar_disabled

IGNORE = -100


def prompt_target_batch(tokenizer, prompts: list[str], targets: list[str], device=None,
                        *, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (target tokens only)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows, labels = [], []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if not t:
            raise ValueError(f"target {target!r} has no tokens")
        ids = p + t
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"prompt + target is {len(ids)} tokens, over the limit of {max_length}: {prompt!r}")
        rows.append(ids)
        labels.append([IGNORE] * len(p) + t)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        label_ids[i, : len(lab)] = torch.tensor(lab)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def model_inputs(batch) -> dict[str, torch.Tensor]:
    """The model's inputs of a :func:`prompt_target_batch` (its labels left out).

    ``positions`` travels too when present: a :class:`~instructedit_lite.engine.PrefixEngine`
    then computes vocabulary logits only there (chapter 7); plain batches never carry it.
    """
    return {k: batch[k] for k in ("input_ids", "attention_mask", "positions") if k in batch}


@dataclass(frozen=True)
class TeacherForced:
    """Per-example scores: mean token accuracy (partial credit) and exact match of all tokens."""

    token_accuracy: list[float]
    exact_match: list[bool]


def shifted_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax predictions aligned with the labels they predict, and the mask of target positions."""
    predictions = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    return predictions, targets != IGNORE


@torch.no_grad()
def teacher_forced(model, tokenizer, prompts: list[str], targets: list[str], *, batch_size: int = 128,
                   progress: bool = False) -> TeacherForced:
    """Feed ``prompt + " " + target``; score the argmax at each target position."""
    device = next(model.parameters()).device
    accuracy: list[float] = []
    exact: list[bool] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="scoring", disable=bar_disabled(progress), leave=False):
        batch = prompt_target_batch(tokenizer, prompts[start:start + batch_size],
                                    targets[start:start + batch_size], device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        predictions, mask = shifted_predictions(logits, batch["labels"])
        hits = (predictions == batch["labels"][:, 1:]) & mask
        n = mask.sum(1)
        accuracy += (hits.sum(1) / n).tolist()
        exact += (hits.sum(1) == n).tolist()
    return TeacherForced(accuracy, exact)


@torch.no_grad()
def target_logprob(model, tokenizer, prompts: list[str], targets: list[str], *, batch_size: int = 128,
                   reduction: str = "mean") -> list[float]:
    """Log-probability of ``target`` after ``prompt`` (teacher forced): per token (``"mean"``) or of
    the whole target sequence (``"sum"``)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompt_target_batch(tokenizer, prompts[start:start + batch_size],
                                    targets[start:start + batch_size], device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = (logp * mask).sum(1)
        out += (total / mask.sum(1) if reduction == "mean" else total).tolist()
    return out
