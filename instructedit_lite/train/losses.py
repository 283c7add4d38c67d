"""The meta-training losses: edit NLL (plus ConvSent's unlikelihood) and locality KL (chapter 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..editors.mend import MendEditor, edit_loss, functional_forward, unlikelihood_loss
from ..engine import PrefixEngine, scored_batch
from ..text import IGNORE, model_inputs, prompt_target_batch
from .config import TrainConfig
from .examples import EditExample, Row

__all__ = ["locality_kl", "unlikelihood_loss", "edit_loss", "meta_losses", "forward_pass"]

def locality_kl(pre_logits: Tensor, post_logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean ``KL(pre ‖ post)`` over the answer positions of ``labels`` only.

    Causal shift: the logits at ``t`` predict the token at ``t + 1``, so position ``t`` counts when
    ``labels[t + 1] != -100``.  ``KL = Σ_v p_pre(v) (log p_pre(v) − log p_post(v))``, float32.
    """
    mask = (labels[:, 1:] != IGNORE).float()
    if mask.sum() == 0:
        raise ValueError("locality_kl: no answer position (all labels are -100)")
    pre = torch.log_softmax(pre_logits[:, :-1].float(), -1)
    post = torch.log_softmax(post_logits[:, :-1].float(), -1)
    kl = (pre.exp() * (pre - post)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def _batch(tokenizer, rows: Sequence[Row], device, model=None) -> dict[str, Tensor]:
    prompts, targets = zip(*rows)
    batch = prompt_target_batch(tokenizer, list(prompts), list(targets), device)
    # Through the frozen-prefix engine, logits are computed only where a label is scored.
    return scored_batch(batch) if isinstance(model, PrefixEngine) else batch


@dataclass
class _Pass:
    """What one meta-training (or validation) pass computes."""

    edit: Tensor
    loc: Tensor
    total: Tensor
    deltas: dict[str, Tensor]
    post: Tensor  # post-edit logits of the likelihood (+ unlikelihood) rows
    labels: Tensor


def forward_pass(model, editor: MendEditor, tokenizer, example: EditExample, c_edit: float, c_loc: float,
                  *, meta_grad: bool = True) -> _Pass:
    device = next(model.parameters()).device
    n_loss = len(example.loss)
    # The locality rows are short and never instructed: they get their own batch, so that they
    # are not padded to the width of the instructed rows.
    loc_batch = _batch(tokenizer, example.locality, device, model)
    with torch.no_grad():  # 1. pre-edit locality logits
        pre_loc = model(**model_inputs(loc_batch)).logits
    # 2. the edit: its rows, then (ConvSent) the rows whose unlikelihood joins the edit's loss
    edit_batch = _batch(tokenizer, example.edit + example.edit_unlikely, device, model)
    if example.edit_unlikely:
        flags = [False] * len(example.edit) + [True] * len(example.edit_unlikely)
        edit_batch["unlikely"] = torch.tensor(flags, device=device)
    deltas = editor.compute_deltas(model, edit_batch, meta_grad=meta_grad)
    params = editor.edited_params(model, deltas)
    # 3. likelihood rows then (ConvSent) unlikelihood rows, in one right-padded batch
    loss_batch = _batch(tokenizer, example.loss + example.unlikely, device, model)
    post = functional_forward(model, params, loss_batch)
    labels = loss_batch["labels"]
    # ConvSent's L_e: NLL of the wanted-sentiment rows + unlikelihood of the unwanted ones
    unlikely = torch.arange(len(labels), device=labels.device) >= n_loss
    l_edit = edit_loss(post, labels, unlikely)
    # 4. KL(pre || post) on the locality answer positions
    l_loc = locality_kl(pre_loc, functional_forward(model, params, loc_batch), loc_batch["labels"])
    total = c_edit * l_edit + c_loc * l_loc
    return _Pass(l_edit, l_loc, total, deltas, post, labels)


def meta_losses(model, editor: MendEditor, tokenizer, example: EditExample, config: TrainConfig) -> dict[str, Tensor]:
    """``{"edit": L_e, "loc": L_loc, "total": c_edit·L_e + c_loc·L_loc}`` on the graph of the editor."""
    p = forward_pass(model, editor, tokenizer, example, config.c_edit, config.c_loc)
    return {"edit": p.edit, "loc": p.loc, "total": p.total}

