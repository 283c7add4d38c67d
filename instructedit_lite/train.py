"""Meta-training of a MEND editor: single-task MEND, multi-task MEND and InstructEdit.

The three regimes of the paper run through one code path and differ only in their configuration:

* ``"single"``: one task, no instructions (single-task MEND);
* ``"multi"``: several tasks, no instructions (the paper's multi-task MEND baseline);
* ``"instruct"``: several tasks, every edit input prefixed with its task instruction (InstructEdit).

One meta-training step takes one edit record (batch of one edit, as in the paper):

1. ``pre``: logits of the unedited model on the record's locality rows (``prompt + " " + answer``,
   never instruction-prefixed), under ``torch.no_grad``.
2. The edit rows (``prompt + " " + target_new``, instruction-prefixed in ``"instruct"``) go through
   :meth:`MendEditor.compute_deltas`, which gives ``ΔW`` on the autograd graph of the editor.
3. ``L_e``: token-mean NLL of the target under the edited model (:func:`functional_forward`), on
   the edit input (default, as in EasyEdit's InstructEdit) or on a rephrase (original MEND).
   ConvSent: NLL of responses of the wanted sentiment plus the unlikelihood ``−mean log(1 − p)``
   of the tokens of responses of the other sentiment; the instruction prefix is kept.
4. ``L_loc``: token-mean ``KL(pre ‖ post)`` over the locality answer positions only.
5. ``L = c_edit·L_e + c_loc·L_loc``; gradients are accumulated over ``grad_accum`` edits; an
   optimiser step whose gradients are not finite is skipped (and counted); the gradient norm is
   clipped; one Adam steps the editor's networks, a second one the step sizes ``α``.

The base model is frozen throughout (its ``requires_grad`` flags are switched off and restored).
Validation runs on a fixed subset of the *val* split, disjoint from training, and the editor with
the lowest validation loss is kept.  Checkpoints hold everything needed to resume bit for bit
(editor with its running statistics, both optimisers, accumulated gradients, step, RNG states,
curves, best-so-far); :func:`train` resumes from the checkpoint in its output folder.
:func:`train_editor` caches finished editors under :func:`~instructedit_lite.base_model.cache_dir`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_torch_save, atomic_write_text
from .instructions import InstructionSet, default_instructions, maybe_instruct
from .mend import MendConfig, MendEditor, applied, functional_forward, lm_loss
from .records import EditRecord
from .text import IGNORE, prompt_target_batch, shifted_predictions

__all__ = [
    "REGIMES", "EDIT_LOSS_INPUTS", "MIXINGS", "TRAINABLE_TASKS", "TrainConfig", "PAPER_CONFIGS", "default_config",
    "EditExample", "build_example", "locality_kl", "unlikelihood_loss", "convsent_edit_loss",
    "meta_losses", "schedule", "task_probabilities", "records_for", "validate", "TrainResult", "train", "TrainedEditor",
    "train_editor", "editor_dir", "load_trained_editor", "make_editor", "load_editor", "METHODS", "train_editors",
]

#: Bumped whenever a change of this module changes what a configuration trains (cache key).
TRAIN_VERSION = 2
CHECKPOINT_FORMAT = 1
REGIMES = ("single", "multi", "instruct")
EDIT_LOSS_INPUTS = ("edit", "rephrase")
MIXINGS = ("proportional", "uniform")
METHODS = ("mend", "ke")
TRAINABLE_TASKS = ("counterfact", "wikirecent", "convsent")
#: Fields of :class:`TrainConfig` that change how a run is carried out, never what it produces.
_NOT_IN_KEY = ("checkpoint_every",)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a meta-training run depends on.

    ``steps`` counts edits (meta-training iterations, one record each); the optimisers step every
    ``grad_accum`` edits.  ``lr`` is the editor networks' Adam rate, ``alpha_lr`` that of the step
    sizes α.  ``mixing``: ``"proportional"`` samples tasks in proportion to their (capped)
    training-split sizes, unbalanced as in the paper; ``"uniform"`` balances them; ``task_weights``
    (task → weight) overrides both.  ``task_caps`` (task → n) keeps only ``n`` training records of
    a task (a fixed seeded subset), e.g. to reproduce the paper's balanced ConvSent.
    ``edit_loss_input``: ``"edit"`` (default, EasyEdit's InstructEdit) computes ``L_e`` on the
    edit input itself, ``"rephrase"`` (original MEND) on a rephrase of it.
    ``n_responses``: ConvSent responses per sentiment in one edit (and per locality topic).
    ``max_locality``: locality rows per fact record.  ``val_every``: edits between validations;
    ``n_val``: validation records per task (the first ``n_val`` of the val split).
    ``instruction_seed``: the seed of the (seen) instruction choice per record.
    ``checkpoint_every``: edits between checkpoints (not part of :meth:`key`).
    """

    regime: str = "instruct"
    tasks: tuple[str, ...] = TRAINABLE_TASKS
    steps: int = 3000
    grad_accum: int = 2
    lr: float = 1e-4
    alpha_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    edit_loss_input: str = "edit"
    clip: float = 100.0
    mixing: str = "proportional"
    task_weights: dict[str, float] | None = None
    task_caps: dict[str, int] | None = None
    n_responses: int = 4
    max_locality: int = 4
    val_every: int = 500
    n_val: int = 32
    seed: int = 0
    instruction_seed: int = 0
    checkpoint_every: int = 500
    mend: MendConfig = field(default_factory=MendConfig)
    #: ``"mend"`` (MEND, InstructEdit) or ``"ke"`` (KnowledgeEditor, trained with the same loop).
    method: str = "mend"
    #: KE's hyper-parameters (:class:`~instructedit_lite.ke.KEConfig` fields); ``method="ke"`` only.
    ke: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.mend, Mapping):
            self.mend = MendConfig.from_dict(self.mend)
        self.tasks = tuple(self.tasks)
        if self.regime not in REGIMES:
            raise ValueError(f"TrainConfig.regime must be one of {REGIMES}, got {self.regime!r}")
        if not self.tasks:
            raise ValueError("TrainConfig.tasks: at least one training task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"TrainConfig.tasks has duplicates: {self.tasks}")
        for task in self.tasks:
            if task not in TRAINABLE_TASKS:
                raise ValueError(f"TrainConfig.tasks: {task!r} cannot be trained on; choose from {TRAINABLE_TASKS} "
                                 "(zsre is the held-out task and has no training split)")
        if self.regime == "single" and len(self.tasks) != 1:
            raise ValueError(f"regime 'single' trains on exactly one task, got {self.tasks}")
        if self.edit_loss_input not in EDIT_LOSS_INPUTS:
            raise ValueError(f"TrainConfig.edit_loss_input must be one of {EDIT_LOSS_INPUTS}, got {self.edit_loss_input!r}")
        if self.method not in METHODS:
            raise ValueError(f"TrainConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.ke is not None and self.method != "ke":
            raise ValueError("TrainConfig.ke is set but method is not 'ke'")
        if self.mixing not in MIXINGS:
            raise ValueError(f"TrainConfig.mixing must be one of {MIXINGS}, got {self.mixing!r}")
        for name in ("steps", "grad_accum", "val_every", "n_val", "checkpoint_every", "n_responses", "max_locality"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("task_weights", "task_caps"):
            value = getattr(self, name)
            if value is None:
                continue
            value = dict(value)
            extra = set(value) - set(self.tasks)
            if extra:
                raise ValueError(f"TrainConfig.{name} names tasks that are not trained: {sorted(extra)}")
            if any(v <= 0 for v in value.values()):
                raise ValueError(f"TrainConfig.{name} must be positive, got {value}")
            setattr(self, name, value)
        if self.task_weights is not None and set(self.task_weights) != set(self.tasks):
            raise ValueError(f"TrainConfig.task_weights must give a weight to every task {self.tasks}")

    @property
    def instructed(self) -> bool:
        return self.regime == "instruct"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["mend"] = self.mend.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {sorted(unknown)}")
        kwargs = dict(data)
        if "mend" in kwargs and not isinstance(kwargs["mend"], MendConfig):
            kwargs["mend"] = MendConfig.from_dict(kwargs["mend"])
        return cls(**kwargs)

    def key(self) -> str:
        """Short stable hash of everything that changes the trained editor (cache key)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_KEY}
        if data["method"] == "mend":  # MEND keys predate the method field: keep their caches valid
            del data["method"], data["ke"]
        text = json.dumps({"version": TRAIN_VERSION, **data}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _paper_weights(model: str) -> list[str]:
    if model == "gpt2-xl":  # 48 blocks
        return [f"transformer.h.{i}.mlp.{m}.weight" for i in (45, 46, 47) for m in ("c_fc", "c_proj")]
    return [f"model.layers.{i}.mlp.{m}.weight" for i in (29, 30, 31) for m in ("gate_proj", "up_proj", "down_proj")]


#: The paper's (and EasyEdit's) InstructEdit settings.  Not runnable on the embedded model
#: (the weight names are those of the real models); use them with ``load_hf_model``.  The LLaMA
#: editor was trained without ConvSent.  Validation settings are this project's (the reference
#: validates on training records).
PAPER_CONFIGS: dict[str, TrainConfig] = {
    "gpt2-xl": TrainConfig(
        regime="instruct", tasks=TRAINABLE_TASKS, steps=30_000, grad_accum=2, lr=1e-6, alpha_lr=1e-4,
        c_edit=0.1, c_loc=1.0, edit_loss_input="edit", clip=100.0, mixing="proportional",
        val_every=5_000, n_val=100, checkpoint_every=5_000,
        mend=MendConfig(rank=1920, n_blocks=2, alpha_init=1e-4, weight_names=_paper_weights("gpt2-xl"))),
    "llama-2-7b": TrainConfig(
        regime="instruct", tasks=("counterfact", "wikirecent"), steps=100_000, grad_accum=2, lr=1e-6,
        alpha_lr=1e-4, c_edit=0.1, c_loc=1.0, edit_loss_input="edit", clip=100.0, mixing="proportional",
        val_every=5_000, n_val=100, checkpoint_every=5_000,
        mend=MendConfig(rank=1920, n_blocks=2, alpha_init=1e-4, weight_names=_paper_weights("llama")))
}

#: Hyper-parameters for the embedded base model (4 blocks of width 128, ~1M parameters), chosen by
#: measurement on this project's world (1 CPU thread; numbers in the docstring of default_config).
_SCALE_DEFAULTS = dict(grad_accum=2, lr=1e-4, alpha_lr=1e-4, c_edit=0.1, c_loc=1.0, clip=100.0,
                       edit_loss_input="edit", n_responses=2, val_every=400, n_val=20, checkpoint_every=400)
_DEFAULT_STEPS = 2000
_DEFAULT_RANK = 64
_SMOKE = dict(steps=40, val_every=20, n_val=6, checkpoint_every=20)


def default_config(regime: str = "instruct", tasks: Sequence[str] | str | None = None, *,
                   smoke: bool = False, **changes) -> TrainConfig:
    """A configuration that trains well on the embedded world in a few minutes on a laptop CPU.

    ``tasks`` defaults to the three training tasks (``"single"`` needs exactly one).  ``smoke``
    trains for a few dozen edits only (fast notebook tests; enough for a single-task editor to
    move, not to plateau).  Further keyword arguments override fields.

    How the values were chosen (embedded world, base model ``c5d4b1ca6924``, one CPU thread of a
    shared 2-core machine; validation on 20-32 val records per task):

    * learning rates: with InstructEdit on the three tasks, editor and α rates of 1e-4 reach a
      validation loss of 0.10-0.12; 2e-4 is noisier (0.12-0.23), 1e-3 diverges (locality falls
      to 0.07), an α rate of 1e-3 with an editor rate of 1e-4 oscillates (0.39-0.86);
    * length: single-task editors plateau after 500-750 edits; CounterFact and Recent plateau
      as fast in the multi-task runs, but ConvSent, the smallest task (22% of the edits), keeps
      improving with instructions until about 2,000 edits (ConvSent success 0.35 at 0 edits,
      0.55 at 1,000, 0.80-0.90 at 2,000); hence 2,000 edits for every regime;
    * ConvSent: 2 responses per sentiment (not 3 or 4): cheaper steps and, measured, no worse
      (ConvSent success 0.90 vs 0.80 at 2,000 edits);
    * the paper's ``c_edit = 0.1``, ``c_loc = 1.0``, accumulation 2 and clipping at 100 work
      unchanged; ``c_edit = 1.0`` edits ConvSent harder (gap 0.72 vs 0.32 nats per token) but
      costs locality (0.87 vs 0.93), so it stays at 0.1.

    Results of these defaults (``train_editor``; training seconds include the validations;
    reliability = teacher-forced token accuracy of ``target_new`` on 50 *test* records per task,
    untrained editor → trained; ConvSent success = share of edits after which the wanted
    sentiment's responses are more likely than the other's):

    ============  ========  =====================  ==================  ==============  ==============
    regime        seconds   CounterFact rel / loc  Recent rel / loc    ConvSent succ.  ConvSent loc
    ============  ========  =====================  ==================  ==============  ==============
    single        75 / 76   0.22 → 0.90 / 0.97     0.18 → 0.91 / 0.97  0.26 → 0.98     0.92  (107 s)
    multi         91        0.22 → 0.89 / 0.96     0.18 → 0.95 / 0.91  0.26 → 0.28     0.96
    instruct      157       0.22 → 0.98 / 0.99     0.16 → 0.98 / 0.97  0.28 → 0.82     0.98
    ============  ========  =====================  ==================  ==============  ==============
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    if tasks is None:
        if regime == "single":
            raise ValueError("default_config: regime 'single' needs its one task, e.g. tasks=('counterfact',)")
        tasks = TRAINABLE_TASKS
    # A single-task editor plateaus after 500-750 edits of its task; 1,000 is enough and halves its cost.
    steps = _DEFAULT_STEPS // 2 if regime == "single" else _DEFAULT_STEPS
    values = dict(_SCALE_DEFAULTS, steps=steps, mend=MendConfig(rank=_DEFAULT_RANK))
    if smoke:
        values.update(_SMOKE)
    values.update(changes)
    return TrainConfig(regime=regime, tasks=tuple(tasks), **values)


# ---------------------------------------------------------------------------------------------
# From a record to the rows of one meta-training step
# ---------------------------------------------------------------------------------------------

Row = tuple[str, str]  # (prompt, target): the model reads prompt + " " + target


@dataclass(frozen=True)
class EditExample:
    """The text rows of one meta-training step.

    ``edit``: what the editor sees (its gradient); ``loss``: rows of the likelihood term of
    ``L_e``; ``unlikely``: rows of the unlikelihood term (ConvSent only); ``locality``: rows of
    ``L_loc`` (never instruction-prefixed).  ``record`` is the (instructed) record.
    """

    task: str
    edit: tuple[Row, ...]
    loss: tuple[Row, ...]
    unlikely: tuple[Row, ...]
    locality: tuple[Row, ...]
    record: EditRecord


def _pick(items: Sequence[str], n: int, rng: np.random.Generator | None, first: str | None = None) -> list[str]:
    """Up to ``n`` distinct items, ``first`` (if given) first; seeded choice, or in order without rng."""
    rest = [x for x in dict.fromkeys(items) if x != first]
    if rng is not None and len(rest) > 1:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    chosen = ([first] if first is not None else []) + rest
    return chosen[:n]


def build_example(record: EditRecord, config: TrainConfig, *, instructions: InstructionSet | None = None,
                  rng: np.random.Generator | None = None) -> EditExample:
    """The rows of one step for ``record``.

    In regime ``"instruct"`` the edit prompt and rephrases carry the record's (seen) instruction
    (``instructions`` defaults to :func:`default_instructions`); locality rows never do.  ``rng``
    picks the rephrase and the ConvSent responses; without it the choice is the first ones, in
    order (validation).
    """
    if config.instructed and instructions is None:
        instructions = default_instructions()
    rec = maybe_instruct(record, instructions if config.instructed else None, seed=config.instruction_seed)

    def loss_prompt() -> str:
        if config.edit_loss_input == "edit" or not rec.rephrase:
            return rec.prompt
        return rec.rephrase[int(rng.integers(len(rec.rephrase)))] if rng is not None else rec.rephrase[0]

    n = config.n_responses
    if record.task == "convsent":
        wanted = _pick(rec.wanted_responses, n, rng, first=rec.target_new)
        unwanted = _pick(rec.unwanted_responses, n, rng)
        question = loss_prompt()
        edit = tuple((rec.prompt, w) for w in wanted)
        loss = tuple((question, w) for w in wanted)
        unlikely = tuple((question, u) for u in unwanted)
        # another topic's question with several of its responses; from the *uninstructed* record
        locality = tuple((p.prompt, a) for p in record.locality_probes for a in _pick(p.answers, n, None))
    else:
        edit = ((rec.prompt, rec.target_new),)
        loss = edit if config.edit_loss_input == "edit" else ((loss_prompt(), rec.target_new),)
        unlikely = ()
        locality = tuple((p.prompt, p.answer) for p in record.locality_probes[: config.max_locality])
    if not locality:
        raise ValueError(f"{record.source}, record {record.index}: no locality probe to compute L_loc with")
    return EditExample(record.task, edit, loss, unlikely, locality, rec)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


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


def unlikelihood_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``−mean log(1 − p(token))`` over the labelled tokens (shifted as in :func:`lm_loss`)."""
    targets = labels[:, 1:]
    mask = (targets != IGNORE).float()
    if mask.sum() == 0:
        raise ValueError("unlikelihood_loss: no labelled token")
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # log(1 − p) = log(−expm1(log p)); p is kept just below 1 so the loss stays finite.
    log_not = torch.log(-torch.expm1(logp.clamp(max=-1e-6)))
    return -(log_not * mask).sum() / mask.sum()


def convsent_edit_loss(wanted_logits: Tensor, wanted_labels: Tensor,
                       unwanted_logits: Tensor, unwanted_labels: Tensor) -> Tensor:
    """ConvSent ``L_e``: NLL of wanted-sentiment responses + unlikelihood of unwanted ones."""
    return lm_loss(wanted_logits, wanted_labels) + unlikelihood_loss(unwanted_logits, unwanted_labels)


def _batch(tokenizer, rows: Sequence[Row], device) -> dict[str, Tensor]:
    prompts, targets = zip(*rows)
    return prompt_target_batch(tokenizer, list(prompts), list(targets), device)


def _model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass
class _Pass:
    """What one meta-training (or validation) pass computes."""

    edit: Tensor
    loc: Tensor
    total: Tensor
    deltas: dict[str, Tensor]
    post: Tensor  # post-edit logits of the likelihood (+ unlikelihood) rows
    labels: Tensor


def _forward_pass(model, editor: MendEditor, tokenizer, example: EditExample, c_edit: float, c_loc: float,
                  *, meta_grad: bool = True) -> _Pass:
    device = next(model.parameters()).device
    n_loss = len(example.loss)
    # The locality rows are short and never instructed: they get their own batch, so that they
    # are not padded to the width of the instructed rows.
    loc_batch = _batch(tokenizer, example.locality, device)
    with torch.no_grad():  # 1. pre-edit locality logits
        pre_loc = model(**_model_inputs(loc_batch)).logits
    edit_batch = _batch(tokenizer, example.edit, device)  # 2. the edit
    deltas = editor.compute_deltas(model, edit_batch, meta_grad=meta_grad)
    params = editor.edited_params(model, deltas)
    # 3. likelihood rows then (ConvSent) unlikelihood rows, in one right-padded batch
    loss_batch = _batch(tokenizer, example.loss + example.unlikely, device)
    post = functional_forward(model, params, loss_batch)
    labels = loss_batch["labels"]
    if example.unlikely:
        l_edit = convsent_edit_loss(post[:n_loss], labels[:n_loss], post[n_loss:], labels[n_loss:])
    else:
        l_edit = lm_loss(post, labels)
    # 4. KL(pre || post) on the locality answer positions
    l_loc = locality_kl(pre_loc, functional_forward(model, params, loc_batch), loc_batch["labels"])
    total = c_edit * l_edit + c_loc * l_loc
    return _Pass(l_edit, l_loc, total, deltas, post, labels)


def meta_losses(model, editor: MendEditor, tokenizer, example: EditExample, config: TrainConfig) -> dict[str, Tensor]:
    """``{"edit": L_e, "loc": L_loc, "total": c_edit·L_e + c_loc·L_loc}`` on the graph of the editor."""
    p = _forward_pass(model, editor, tokenizer, example, config.c_edit, config.c_loc)
    return {"edit": p.edit, "loc": p.loc, "total": p.total}


# ---------------------------------------------------------------------------------------------
# Data: which records, in which order
# ---------------------------------------------------------------------------------------------


def _capped(records: list[EditRecord], cap: int | None, task: str) -> list[EditRecord]:
    if cap is None or cap >= len(records):
        return list(records)
    rng = random.Random(f"task-cap/{task}")  # the same subset for every seed and regime
    keep = sorted(rng.sample(range(len(records)), cap))
    return [records[i] for i in keep]


def records_for(config: TrainConfig, world) -> tuple[dict[str, list[EditRecord]], dict[str, list[EditRecord]]]:
    """``(train, val)`` records per task from the world: the (capped) train split and the first
    ``n_val`` records of the *val* split."""
    caps = config.task_caps or {}
    train = {t: _capped(world.records(t, "train"), caps.get(t), t) for t in config.tasks}
    val = {t: world.records(t, "val")[: config.n_val] for t in config.tasks}
    for t, recs in train.items():
        if not recs:
            raise ValueError(f"task {t!r} has no training records")
    return train, val


def task_probabilities(config: TrainConfig, sizes: Mapping[str, int]) -> dict[str, float]:
    """Sampling probability of each task: explicit weights, else proportional or uniform."""
    if config.task_weights is not None:
        weights = {t: float(config.task_weights[t]) for t in config.tasks}
    elif config.mixing == "uniform":
        weights = {t: 1.0 for t in config.tasks}
    else:
        weights = {t: float(sizes[t]) for t in config.tasks}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def schedule(config: TrainConfig, sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(task, record index)`` of every training step, a pure function of the config and sizes.

    Tasks are drawn with :func:`task_probabilities`; within a task the records come in shuffled
    epochs (each record once per epoch).  Being fixed up front, the order does not depend on
    where a run was interrupted.
    """
    rng = np.random.default_rng([config.seed, 1])
    probs = task_probabilities(config, sizes)
    tasks = list(config.tasks)
    picks = rng.choice(len(tasks), size=config.steps, p=[probs[t] for t in tasks])
    queues: dict[str, list[int]] = {t: [] for t in tasks}
    out = []
    for i in picks:
        task = tasks[int(i)]
        if not queues[task]:
            queues[task] = rng.permutation(sizes[task]).tolist()
        out.append((task, queues[task].pop()))
    return out


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _token_accuracy(logits: Tensor, labels: Tensor) -> list[float]:
    predictions, mask = shifted_predictions(logits, labels)
    hits = (predictions == labels[:, 1:]) & mask
    return (hits.sum(1) / mask.sum(1)).tolist()


def _row_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean log-probability per labelled token, one value per row."""
    targets = labels[:, 1:]
    mask = (targets != IGNORE).float()
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1) / mask.sum(1)


_VAL_KEYS = ("loss", "L_e", "L_loc", "reliability", "generalization", "locality")
_TASK_KEYS = ("reliability", "generalization", "locality", "sentiment_gap", "sentiment_win")


@torch.no_grad()
def validate(model, editor: MendEditor, tokenizer, records: Mapping[str, list[EditRecord]], config: TrainConfig,
             *, instructions: InstructionSet | None = None) -> dict[str, float]:
    """Mean validation loss and edit success over ``records`` (task → records), editor in eval mode.

    Per record: the meta-training losses (no gradient, running statistics frozen), then the edit
    applied in place (:func:`applied`, exact restore): reliability = teacher-forced token accuracy
    of ``target_new`` after the (instructed) edit prompt, generalization = the same on the
    rephrases, locality = fraction of locality answer positions whose argmax is unchanged.
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
                p = _forward_pass(model, editor, tokenizer, example, config.c_edit, config.c_loc, meta_grad=False)
                acc["loss"].append(p.total.item())
                acc["L_e"].append(p.edit.item())
                acc["L_loc"].append(p.loc.item())
                rec = example.record
                rows = [(rec.prompt, rec.target_new)] + [(r, rec.target_new) for r in rec.rephrase]
                edit_rows = _batch(tokenizer, rows, device)
                loc_rows = _batch(tokenizer, example.locality, device)  # uninstructed, short
                pre = model(**_model_inputs(loc_rows)).logits
                with applied(model, p.deltas):
                    post_edit = model(**_model_inputs(edit_rows)).logits
                    post_loc = model(**_model_inputs(loc_rows)).logits
                scores = _token_accuracy(post_edit, edit_rows["labels"])
                acc["reliability"].append(scores[0])
                if len(scores) > 1:
                    acc["generalization"].append(float(np.mean(scores[1:])))
                pre_pred, mask = shifted_predictions(pre, loc_rows["labels"])
                post_pred, _ = shifted_predictions(post_loc, loc_rows["labels"])
                same = ((pre_pred == post_pred) & mask).sum(1) / mask.sum(1)
                acc["locality"].append(float(same.mean()))
                if example.unlikely:  # ConvSent: does the edit prefer the wanted sentiment?
                    logp = _row_logprob(p.post, p.labels)
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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns: the best and the last editor, curves and a summary.

    ``finished`` is False when the call stopped early (``max_steps_this_call``); calling
    :func:`train` again with the same output folder resumes.  ``summary["train_seconds"]`` is the
    wall time of the training loop over all calls, its periodic validations included (the
    step-0 validation of the untrained editor is not); ``summary["validation_seconds"]`` is the
    time of all validations.
    """

    editor: MendEditor
    final_editor: MendEditor
    curves: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    summary: dict[str, Any]
    finished: bool


def make_editor(config: TrainConfig, model, generator: torch.Generator | None = None):
    """The untrained editor of ``config.method`` for ``model``: a MendEditor or a KEEditor."""
    if config.method == "ke":
        from .ke import KEConfig, KEEditor

        return KEEditor(model, KEConfig.from_dict({"weight_names": config.mend.weight_names,
                                                   "alpha_init": config.mend.alpha_init, **(config.ke or {})}),
                        generator=generator)
    return MendEditor(model, config.mend, generator=generator)


def load_editor(path: str | os.PathLike, model, method: str = "mend"):
    """A saved editor of ``method`` (see :func:`make_editor`) for ``model``."""
    if method == "ke":
        from .ke import KEEditor

        return KEEditor.load(path, model)
    return MendEditor.load(path, model)


@contextlib.contextmanager
def _frozen(model) -> Any:
    """The base model in eval mode with every ``requires_grad`` off; flags and mode restored."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        model.eval()
        model.requires_grad_(False)
        yield model
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace("model.", "").replace(".weight", "")


def train(config: TrainConfig, model, tokenizer, *, train_records: Mapping[str, list[EditRecord]],
          val_records: Mapping[str, list[EditRecord]], out_dir: str | os.PathLike | None = None,
          instructions: InstructionSet | None = None, progress: bool = True,
          max_steps_this_call: int | None = None,
          callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Meta-train an editor for ``model`` on ``train_records`` (task → records).

    With ``out_dir``, checkpoints go to ``out_dir/checkpoint.pt`` every ``checkpoint_every`` edits
    and at the end (also when stopping after ``max_steps_this_call`` edits), and a run that finds a
    checkpoint there resumes from it; the finished run also writes the best and the final editor,
    the curves (CSV) and a summary (JSON).  ``callback(step, row)`` is called after every edit.
    The base model's weights are never changed.
    """
    from tqdm.auto import tqdm

    missing = [t for t in config.tasks if t not in train_records]
    if missing:
        raise ValueError(f"train: no training records for {missing}")
    if config.instructed and instructions is None:
        instructions = default_instructions()
    out = Path(out_dir) if out_dir is not None else None
    sizes = {t: len(train_records[t]) for t in config.tasks}
    plan = schedule(config, sizes)

    editor = make_editor(config, model, generator=torch.Generator().manual_seed(config.seed))
    editor.train()
    opt_net = torch.optim.Adam(editor.network_parameters(), lr=config.lr)
    opt_alpha = torch.optim.Adam(editor.alpha_parameters(), lr=config.alpha_lr)
    params = list(editor.parameters())
    alpha_names = {id(editor.alpha(n)): _short(n) for n in editor.infos}

    step, skipped, optimizer_steps = 0, 0, 0
    curves: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    seconds = 0.0
    if out is not None and (out / CHECKPOINT).exists():
        ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt["config_key"] != config.key():
            raise ValueError(f"{out / CHECKPOINT}: checkpoint of another configuration or format "
                             f"({ckpt.get('config_key')} vs {config.key()}); remove it or use another folder")
        editor.load_state_dict(ckpt["editor"])  # includes the running statistics: never reset
        opt_net.load_state_dict(ckpt["opt_net"])
        opt_alpha.load_state_dict(ckpt["opt_alpha"])
        for p, g in zip(params, ckpt["grads"]):
            p.grad = None if g is None else g.to(p.device)
        step, skipped, optimizer_steps = ckpt["step"], ckpt["skipped"], ckpt["optimizer_steps"]
        curves, validation, best, seconds = ckpt["curves"], ckpt["validation"], ckpt["best"], ckpt["seconds"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])

    def checkpoint() -> None:
        if out is None:
            return
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": config.to_dict(), "config_key": config.key(),
            "step": step, "skipped": skipped, "optimizer_steps": optimizer_steps, "seconds": seconds,
            "editor": _cpu_state(editor), "opt_net": opt_net.state_dict(), "opt_alpha": opt_alpha.state_dict(),
            "grads": [None if p.grad is None else p.grad.detach().cpu().clone() for p in params],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "curves": curves, "validation": validation, "best": best,
        }, out / CHECKPOINT)

    def run_validation() -> None:
        nonlocal best
        start = time.perf_counter()
        metrics = validate(model, editor, tokenizer, val_records, config, instructions=instructions)
        row = {"step": step, "optimizer_steps": optimizer_steps, **metrics,
               "seconds": time.perf_counter() - start}
        validation.append(row)
        if best is None or metrics["val_loss"] < best["val_loss"]:
            best = {"step": step, "val_loss": metrics["val_loss"], "metrics": row, "state": _cpu_state(editor)}

    def optimizer_step() -> float:
        nonlocal skipped, optimizer_steps
        norm = torch.nn.utils.clip_grad_norm_(params, config.clip)
        if torch.isfinite(norm):
            opt_net.step()
            opt_alpha.step()
            optimizer_steps += 1
        else:
            skipped += 1
        opt_net.zero_grad(set_to_none=True)
        opt_alpha.zero_grad(set_to_none=True)
        return float(norm)

    stop_at = config.steps if max_steps_this_call is None else min(config.steps, step + max_steps_this_call)
    bar = tqdm(total=config.steps, initial=step, desc=f"meta-training ({config.regime})", disable=not progress)
    running = None
    with _frozen(model):
        if not validation:  # the untrained editor: the baseline of the curves
            run_validation()
        while step < stop_at:
            start = time.perf_counter()
            task, index = plan[step]
            rng = np.random.default_rng([config.seed, 2, step])
            example = build_example(train_records[task][index], config, instructions=instructions, rng=rng)
            losses = meta_losses(model, editor, tokenizer, example, config)
            (losses["total"] / config.grad_accum).backward()
            step += 1
            row = {"step": step, "task": task, "L_e": losses["edit"].item(), "L_loc": losses["loc"].item(),
                   "total": losses["total"].item(), "grad_norm": float("nan")}
            if step % config.grad_accum == 0 or step == config.steps:
                row["grad_norm"] = optimizer_step()
            row["skipped"] = skipped
            row.update({f"alpha:{alpha_names[id(a)]}": a.item() for a in editor.alpha_parameters()})
            curves.append(row)
            seconds += time.perf_counter() - start
            if math.isfinite(row["total"]):
                running = row["total"] if running is None else 0.98 * running + 0.02 * row["total"]
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}" if running is not None else "nan", skipped=skipped)
            if step % config.val_every == 0 or step == config.steps:
                start = time.perf_counter()
                run_validation()
                seconds += time.perf_counter() - start
                bar.set_postfix(loss=f"{running:.3f}" if running is not None else "nan",
                                val=f"{validation[-1]['val_loss']:.3f}", skipped=skipped)
            if callback is not None:
                callback(step, row)
            if step % config.checkpoint_every == 0 or step == stop_at:
                checkpoint()
    bar.close()

    final_editor = editor
    best_editor = copy.deepcopy(editor)
    best_editor.load_state_dict(best["state"])
    best_editor.eval()
    summary = {
        "config": config.to_dict(), "config_key": config.key(), "steps": step,
        "optimizer_steps": optimizer_steps, "skipped_steps": skipped, "train_seconds": seconds,
        "validation_seconds": sum(v["seconds"] for v in validation),
        "best_step": best["step"], "best_val_loss": best["val_loss"],
        "best": {k: v for k, v in best["metrics"].items()},
        "initial": validation[0], "final": validation[-1],
        "train_sizes": sizes, "val_sizes": {t: len(v) for t, v in val_records.items()},
        "task_probabilities": task_probabilities(config, sizes),
        "alphas": {_short(n): editor.alpha(n).item() for n in editor.infos},
    }
    finished = step >= config.steps
    if finished and out is not None:
        best_editor.save(out / "editor-best.pt")
        final_editor.save(out / "editor-final.pt")
        _write_tables(out, curves, validation)
        atomic_write_text(out / "summary.json", json.dumps(_jsonable(summary), indent=1))
    return TrainResult(best_editor, final_editor, curves, validation, summary, finished)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_tables(out: Path, curves: list[dict], validation: list[dict]) -> None:
    import pandas as pd

    atomic_write_text(out / "curves.csv", pd.DataFrame(curves).to_csv(index=False))
    atomic_write_text(out / "validation.csv", pd.DataFrame(validation).to_csv(index=False))


# ---------------------------------------------------------------------------------------------
# Cached editors for the book
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainedEditor:
    """A trained editor (the best by validation loss), its curves and summary."""

    editor: MendEditor
    config: TrainConfig
    curves: Any  # pandas.DataFrame, one row per edit
    validation: Any  # pandas.DataFrame, one row per validation
    summary: dict[str, Any]
    path: Path | None = None
    loaded: bool = False  # True when it came from the cache


def editor_dir(config: TrainConfig, base) -> Path:
    """``cache_dir()/editor-<base key>-<config key>``."""
    from .base_model import cache_dir

    return cache_dir() / f"editor-{base.config.key()}-{config.key()}"


def load_trained_editor(path: str | os.PathLike, model) -> TrainedEditor:
    """A finished run's folder (``summary.json``, ``editor-best.pt``, tables) as a TrainedEditor."""
    import pandas as pd

    path = Path(path)
    summary = json.loads((path / "summary.json").read_text())
    config = TrainConfig.from_dict(summary["config"])
    editor = load_editor(path / "editor-best.pt", model, config.method).eval()
    return TrainedEditor(editor, config, pd.read_csv(path / "curves.csv"),
                         pd.read_csv(path / "validation.csv"), summary, path, loaded=True)


def train_editor(config: TrainConfig, base, *, cache: bool = True, progress: bool = True) -> TrainedEditor:
    """Train an editor for ``base`` (a :class:`~instructedit_lite.base_model.BaseModel`), or load it.

    With ``cache`` the run lives in :func:`editor_dir`: a finished run (``summary.json`` present)
    is loaded instead of trained, an interrupted one resumes from its checkpoint.  Without, it
    trains from scratch in a temporary folder.
    """
    import pandas as pd

    train_records, val_records = records_for(config, base.world)
    if cache:
        folder = editor_dir(config, base)
        if (folder / "summary.json").exists():
            return load_trained_editor(folder, base.model)
        atomic_write_text(folder / "config.json", json.dumps(config.to_dict(), indent=1))
        result = train(config, base.model, base.tokenizer, train_records=train_records, val_records=val_records,
                       out_dir=folder, progress=progress)
        return TrainedEditor(result.editor, config, pd.DataFrame(result.curves), pd.DataFrame(result.validation),
                             _jsonable(result.summary), folder)
    with tempfile.TemporaryDirectory(prefix="instructedit-train-") as tmp:
        result = train(config, base.model, base.tokenizer, train_records=train_records, val_records=val_records,
                       out_dir=tmp, progress=progress)
    return TrainedEditor(result.editor, config, pd.DataFrame(result.curves), pd.DataFrame(result.validation),
                         _jsonable(result.summary), None)


def _train_in_worker(config_dict: dict[str, Any], base_config, cache: str) -> str:
    """Body of one worker process of :func:`train_editors`: train (or load) one cached editor."""
    os.environ["INSTRUCTEDIT_CACHE"] = cache
    torch.set_num_threads(1)
    from .base_model import load_base_model

    base = load_base_model(base_config, progress=False)
    trained = train_editor(TrainConfig.from_dict(config_dict), base, progress=False)
    return str(trained.path)


def train_editors(configs: Mapping[str, TrainConfig], base, *, processes: int | None = None,
                  progress: bool = True) -> dict[str, TrainedEditor]:
    """Train (or load from the cache) several editors, ``processes`` of them at a time.

    Each run is single-threaded (the embedded model's matrices are too small to gain from more
    threads), so on a machine with ``n`` cores ``n`` runs go side by side in separate processes
    (default: ``min(cores, runs still to train)``).  Every run goes through :func:`train_editor`,
    with its cache, checkpoints and resume, so the result is the same as training them one by one:
    each editor depends only on its own configuration and seed.  Returns name → TrainedEditor.
    """
    import concurrent.futures as cf
    import multiprocessing

    from tqdm.auto import tqdm

    from .base_model import cache_dir

    todo = {name: c for name, c in configs.items() if not (editor_dir(c, base) / "summary.json").exists()}
    processes = processes or min(os.cpu_count() or 1, len(todo) or 1)
    if len(todo) > 1 and processes > 1:
        # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang.
        context = multiprocessing.get_context("spawn")
        base_config = base.config
        with cf.ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
            futures = {pool.submit(_train_in_worker, c.to_dict(), base_config, str(cache_dir())): name
                       for name, c in todo.items()}
            for future in tqdm(cf.as_completed(futures), total=len(futures), desc="editors", disable=not progress):
                future.result()  # re-raises a worker's error here
    return {name: train_editor(c, base, progress=progress) for name, c in configs.items()}
