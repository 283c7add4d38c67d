"""Forgetting by unlikelihood fine-tuning: an edit with no target (chapter 9).

:class:`Unlikelihood` fine-tunes one MLP output matrix (named by the model's architecture profile,
as FT-M takes it) on ``−mean log(1 − p(old answer token))``, teacher forced, until every token of
the old answer is unlikely; :mod:`~instructedit_lite.unlearning` measures what it removed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..records import EditRecord, RecordError
from ..text import prompt_target_batch
from .base import FittedWeightEditor
from .finetune import FTM
from .mend import only_these_require_grad, unlikelihood_loss

__all__ = ["UnlikelihoodConfig", "Unlikelihood"]


@dataclass
class UnlikelihoodConfig:
    """Fine-tuning with the unlikelihood of the old answer: the MLP output matrix of block ``layer``
    (default the last), ``steps`` Adam steps at ``lr``; stops once every old answer token has
    probability below ``stop_prob``.  ``module``: a module-name template with ``{layer}``, or None
    for the model's architecture profile (GPT-2 ``transformer.h.{layer}.mlp.c_proj``, LLaMA
    ``model.layers.{layer}.mlp.down_proj``), as FT-M takes it."""

    layer: int = -1
    steps: int = 20
    lr: float = 5e-3
    stop_prob: float = 0.05
    module: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ValueError(f"UnlikelihoodConfig.steps must be an int >= 0, got {self.steps!r}")
        if not self.lr > 0 or not 0 < self.stop_prob < 1:
            raise ValueError(f"UnlikelihoodConfig: lr must be > 0 and stop_prob in (0, 1), got {self.lr}, {self.stop_prob}")


class Unlikelihood(FittedWeightEditor):
    """Forget ``record.ground_truth[0]`` after ``record.prompt`` by unlikelihood fine-tuning (no target)."""

    name = "FT (unlikelihood)"

    def __init__(self, config: UnlikelihoodConfig | None = None, **overrides):
        self.config = replace(config or UnlikelihoodConfig(), **overrides)

    def edits_at(self, model: nn.Module) -> list[str]:
        return FTM(layer=self.config.layer, module=self.config.module).parameter_names(model)

    @torch.enable_grad()
    def fit(self, model: nn.Module, tokenizer, record: EditRecord) -> tuple[dict[str, Tensor], dict[str, Any]]:
        cfg = self.config
        if not record.ground_truth:
            raise RecordError(record.source or "<memory>", record.index, "ground_truth", "nothing to forget")
        names = FTM(layer=cfg.layer, module=cfg.module).parameter_names(model)
        originals = {n: model.get_parameter(n).detach() for n in names}
        tuned = {n: p.clone().requires_grad_(True) for n, p in originals.items()}
        batch = prompt_target_batch(tokenizer, [record.prompt], [record.ground_truth[0]], originals[names[0]].device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        optimizer = torch.optim.Adam(list(tuned.values()), lr=cfg.lr)
        mask = labels[:, 1:] != -100
        step = 0
        with only_these_require_grad(model, []):  # no graph below the tuned layer
            while True:
                logits = torch.func.functional_call(model, tuned, args=(), kwargs=inputs).logits
                probs = torch.softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
                if step == cfg.steps or bool((probs[mask] < cfg.stop_prob).all()):
                    break
                loss = unlikelihood_loss(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
        return {n: tuned[n].detach() - originals[n] for n in names}, {"steps": step,
                                                                       "max_old_prob": float(probs[mask].max().detach())}


