"""Meta-training through the frozen-prefix engine: the rows to cache; the engine against the plain model (chapter 7).

A real-scale model (a :class:`~instructedit_lite.base_model.BaseModel` of ``scale="real"``) trains its editors
through a :class:`~instructedit_lite.engine.PrefixEngine`: :func:`training_rows` lists every token
row a run will feed the model, the engine computes their states below the edited blocks once, and
each step then runs only the edited blocks.  :func:`engine_check` shows that a step through the
engine is the step on the plain model, :func:`step_costs` what it saves.
"""

from __future__ import annotations

import copy
import time
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .. import engine as eng
from ..editors.mend import lm_loss
from ..instructions import default_instructions
from ..records import EditRecord
from ..text import prompt_target_batch
from .config import TrainConfig
from .examples import EditExample, build_example, schedule
from .loop import _frozen, make_editor
from .losses import meta_losses

__all__ = ["training_rows", "meta_step", "engine_check", "step_costs"]


def training_rows(config: TrainConfig, tokenizer, train_records: Mapping[str, list[EditRecord]],
                  val_records: Mapping[str, list[EditRecord]], instructions=None) -> list[list[int]]:
    """Token rows a run of ``config`` feeds the model: every scheduled step's and every validation's."""
    if config.instructed and instructions is None:
        instructions = default_instructions()
    examples = []
    plan = schedule(config, {t: len(r) for t, r in train_records.items()})
    for step, (task, index) in enumerate(plan):  # the same rng as train(): the same ConvSent responses
        rng = np.random.default_rng([config.seed, 2, step])
        examples.append(build_example(train_records[task][index], config, instructions=instructions, rng=rng))
    rows: list[tuple[str, str]] = []
    for recs in val_records.values():
        for record in recs:
            ex = build_example(record, config, instructions=instructions)
            examples.append(ex)
            rows += [(ex.record.prompt, ex.record.target_new)] + [(r, ex.record.target_new) for r in ex.record.rephrase]
    for ex in examples:
        rows += list(ex.edit + ex.edit_unlikely + ex.loss + ex.unlikely + ex.locality)
    unique = list(dict.fromkeys(rows))
    batch = prompt_target_batch(tokenizer, [p for p, _ in unique], [t for _, t in unique])
    return [ids[: int(n)].tolist() for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))]


def meta_step(model, editor, tokenizer, example: EditExample, config: TrainConfig):
    """``(losses, editor gradients)`` of one meta-training step; the editor's gradients are cleared after."""
    editor.zero_grad(set_to_none=True)
    losses = meta_losses(model, editor, tokenizer, example, config)
    losses["total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in editor.named_parameters() if p.grad is not None}
    editor.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def engine_check(base, engine: eng.PrefixEngine, config: TrainConfig,
                 examples: Sequence[EditExample]) -> pd.DataFrame:
    """One meta-training step per example on ``base``'s plain model and through the engine: the
    largest absolute difference of the losses and the largest relative difference of a gradient."""
    rows = []
    with _frozen(base.model):
        editor = make_editor(config, base.model, generator=torch.Generator().manual_seed(config.seed))
        for ex in examples:
            # two copies: a step updates the editor's running statistics
            want_l, want_g = meta_step(base.model, copy.deepcopy(editor), base.tokenizer, ex, config)
            got_l, got_g = meta_step(engine, copy.deepcopy(editor), base.tokenizer, ex, config)
            rel = max(float((got_g[n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in want_g.items())
            rows.append({"task": ex.task, "loss": want_l["total"],
                         "loss_difference": max(abs(got_l[k] - want_l[k]) for k in want_l),
                         "gradient_relative_difference": rel, "gradients": len(want_g),
                         "gradient_norm": float(sum(g.norm() for g in want_g.values()))})
    return pd.DataFrame(rows)


def _seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after a warm-up: other work on a shared machine only ever
    adds time, so the minimum is the estimate least disturbed by it."""
    fn()  # warm-up (allocations, lazy initialisation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def step_costs(base, engine: eng.PrefixEngine, config: TrainConfig, examples: Sequence[EditExample], *,
               repeats: int = 2) -> pd.DataFrame:
    """Seconds per meta-training step, per example: on the plain model, through the engine (its prefixes
    already cached), and one forward+backward of the whole model on the edit rows (the unit of the
    ``step_ratio``)."""
    rows = []
    model, tokenizer = base.model, base.tokenizer
    with _frozen(model):
        editor = make_editor(config, model, generator=torch.Generator().manual_seed(config.seed))
        for ex in examples:
            plain, fast = copy.deepcopy(editor), copy.deepcopy(editor)
            row = {"task": ex.task,
                   "plain": _seconds(lambda: meta_step(model, plain, tokenizer, ex, config), repeats),
                   "engine": _seconds(lambda: meta_step(engine, fast, tokenizer, ex, config), repeats)}
            edit = ex.edit + ex.edit_unlikely  # the rows the edit's backward pass runs on
            batch = prompt_target_batch(tokenizer, [p for p, _ in edit], [t for _, t in edit])
            params = list(model.parameters())

            def forward_backward():
                loss = lm_loss(model(**eng.model_inputs(batch)).logits, batch["labels"])
                torch.autograd.grad(loss, params)

            model.requires_grad_(True)
            row["forward_backward"] = _seconds(forward_backward, repeats)
            model.requires_grad_(False)
            rows.append(row)
    return pd.DataFrame(rows)
