"""Validation of an editor during meta-training: losses and edit success on val records (chapter 4)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..editors.mend import MendEditor, applied
from ..instructions import InstructionSet
from ..metrics import agreement, mean_logprob, token_accuracy
from ..records import EditRecord
from ..text import model_inputs
from .config import TrainConfig
from .examples import build_example
from .losses import _batch, forward_pass

__all__ = ["validate"]

_VAL_KEYS = ("loss", "L_e", "L_loc", "reliability", "generalization", "locality")
_TASK_KEYS = ("reliability", "generalization", "locality", "sentiment_gap", "sentiment_win")


@torch.no_grad()
def validate(model, editor: MendEditor, tokenizer, records: Mapping[str, list[EditRecord]], config: TrainConfig,
             *, instructions: InstructionSet | None = None) -> dict[str, float]:
    """Mean validation loss and edit success over ``records`` (task → records), editor in eval mode.

    Per record: the meta-training losses (no gradient, running statistics frozen), then the edit
    applied in place (:func:`~instructedit_lite.editors.mend.applied`, exact restore): reliability =
    teacher-forced token accuracy of ``target_new`` after the (instructed) edit prompt,
    generalization = the same on the rephrases, locality = fraction of locality answer positions whose argmax
    is unchanged.
    Means over all records (``val_*``) and per task (``reliability/<task>`` ...).  ConvSent also
    gets ``sentiment_gap/convsent``, the post-edit mean log-probability per token of the wanted
    responses minus that of the unwanted ones (after the same question), and
    ``sentiment_win/convsent``, the fraction of edits where that gap is positive.
    """
    was_training = editor.training
    editor.eval()
    device = next(model.parameters()).device
    per_task: dict[str, dict[str, list[float]]] = {}
    try:
        for task, recs in records.items():
            acc = per_task.setdefault(task, {k: [] for k in _VAL_KEYS + _TASK_KEYS})
            for record in recs:
                example = build_example(record, config, instructions=instructions)
                p = forward_pass(model, editor, tokenizer, example, config.c_edit, config.c_loc, meta_grad=False)
                acc["loss"].append(p.total.item())
                acc["L_e"].append(p.edit.item())
                acc["L_loc"].append(p.loc.item())
                rec = example.record
                rows = [(rec.prompt, rec.target_new)] + [(r, rec.target_new) for r in rec.rephrase]
                edit_rows = _batch(tokenizer, rows, device, model)
                loc_rows = _batch(tokenizer, example.locality, device, model)  # uninstructed, short
                pre = model(**model_inputs(loc_rows)).logits
                with applied(model, p.deltas):
                    post_edit = model(**model_inputs(edit_rows)).logits
                    post_loc = model(**model_inputs(loc_rows)).logits
                scores = token_accuracy(post_edit, edit_rows["labels"]).tolist()
                acc["reliability"].append(scores[0])
                if len(scores) > 1:
                    acc["generalization"].append(float(np.mean(scores[1:])))
                same = agreement(pre, post_loc, loc_rows["labels"])
                acc["locality"].append(float(same.mean()))
                if example.unlikely:  # ConvSent: does the edit prefer the wanted sentiment?
                    logp = mean_logprob(p.post, p.labels)
                    n = len(example.loss)
                    gap = float(logp[:n].mean() - logp[n:].mean())
                    acc["sentiment_gap"].append(gap)
                    acc["sentiment_win"].append(float(gap > 0))
    finally:
        editor.train(was_training)
    out: dict[str, float] = {}
    for key in _VAL_KEYS:
        values = [v for t in per_task for v in per_task[t][key]]
        out[f"val_{key}"] = float(np.mean(values)) if values else float("nan")
    for task, acc in per_task.items():
        for key in _TASK_KEYS:
            if acc[key]:
                out[f"{key}/{task}"] = float(np.mean(acc[key]))
    return out

