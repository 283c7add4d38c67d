"""The real model on the real data: SmolLM2-135M-Instruct, the published task files, its editors (chapter 7).

:func:`load_real_model` puts the model, its tokenizer and the records source
(:class:`~instructedit_lite.real_data.RealData`) into one :class:`RealModel`, with a cache ``key``
naming both.  :func:`recall` measures what the model knows *before* any edit.
:func:`real_config` gives the editors' configurations (the paper's edited weights: gate, up and
down projections of the last three blocks), and :func:`train_real_editor` meta-trains one through
the frozen-prefix engine (:mod:`~instructedit_lite.engine`), cached by configuration like the
embedded editors.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import engine as eng
from . import mend as mend_module
from . import real_data, smollm2
from . import train as tr
from .architectures import LLAMA
from .atomic import atomic_write_text
from .base_model import cache_dir
from .config import jsonable
from .instructions import default_instructions
from .mend import MendConfig
from .progress import bar_disabled
from .real_data import OPTIONAL, REQUIRED, RealData
from .records import EditRecord
from .smollm2 import load_smollm2, smollm2_dir
from .text import prompt_target_batch, teacher_forced
from .train.loop import _frozen

#: The paper's LLaMA choice, applied to SmolLM2's blocks: the MLP matrices of the last three.
EDITED_BLOCKS = tuple(range(smollm2.DEPTH - 3, smollm2.DEPTH))
EDITED_MATRICES = (*LLAMA.mlp_in, LLAMA.mlp_out)


def edited_weights(n_layers: int = smollm2.DEPTH, n_last: int = 3) -> list[str]:
    """The LLaMA profile's ``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` for the last ``n_last`` of
    ``n_layers`` blocks (:meth:`~instructedit_lite.architectures.Profile.edited_weights`)."""
    return LLAMA.edited_weights(n_layers, n_last)


# ---------------------------------------------------------------------------------------------
# The model and the data as one object
# ---------------------------------------------------------------------------------------------


@dataclass
class RealModel:
    """SmolLM2 with the real records: ``model``, ``tokenizer``, ``source`` (a RealData), cache ``key``, ``info``."""

    model: Any
    tokenizer: Any
    source: Any
    key: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def world(self) -> "WithLocality":
        """The records an editor trains on, under the name :func:`~instructedit_lite.train.records_for` expects."""
        return WithLocality(self.source)


class WithLocality:
    """A records source keeping only records with a locality probe: ``L_loc`` and the locality score
    need one, and some published records have none (105 of Recent's 399 training records)."""

    def __init__(self, source):
        self.source, self.tasks = source, source.tasks

    def records(self, task: str, split: str) -> list[EditRecord]:
        return [r for r in self.source.records(task, split) if r.locality_probes]


def missing(folder: str | Path | None = None) -> list[str]:
    """What the real-model chapter lacks, one message each (empty when it can run)."""
    out = []
    if not smollm2.smollm2_available():
        out.append(smollm2.INSTALL_HINT)
    if not real_data.available(folder):
        root = real_data.loaders.data_dir(folder)
        out.append(real_data._missing_message(root, real_data.missing_files(folder)))
    return out


def data_key(source) -> str:
    """Short hash of the records source: its files (name and sha256), seed, split shares and instructions."""
    files = {}
    for rel in sorted({r for rels in REQUIRED.values() for r in rels} | set(OPTIONAL)):
        path = source.folder / rel
        if path.is_file():
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    text = json.dumps({"files": files, "seed": source.seed, "fractions": list(source.fractions),
                       "convsent": source.convsent_sentiments}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_real_model(folder: str | Path | None = None, seed: int = 0, *, progress: bool = True) -> RealModel:
    """SmolLM2-135M-Instruct (float32, eval) and the real records of ``folder`` (default ``$INSTRUCTEDIT_DATA``)."""
    source = RealData(folder, seed)  # first: missing data fails before the slow model load
    start = time.perf_counter()
    model, tokenizer = load_smollm2(progress=progress)
    model_dir = smollm2_dir(progress=False)
    info = {"load_seconds": time.perf_counter() - start, "model_dir": str(model_dir),
            "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": model.config.num_hidden_layers, "d_model": model.config.hidden_size,
            "d_mlp": model.config.intermediate_size, "vocabulary": model.config.vocab_size}
    key = f"{model_dir.name}-{data_key(source)}"  # model file and data files: editors of one never load for another
    return RealModel(model, tokenizer, source, key, info)


# ---------------------------------------------------------------------------------------------
# What the model knows before any edit
# ---------------------------------------------------------------------------------------------


def truth(record: EditRecord) -> str:
    """The answer the unedited model should give: the ground truth, or the new fact for Recent
    (whose records insert facts that have no earlier value)."""
    return record.ground_truth[0] if record.ground_truth else record.target_new


@torch.no_grad()
def greedy(model, tokenizer, prompts: Sequence[str], n_tokens: int, *, batch_size: int = 32) -> list[str]:
    """``n_tokens`` greedy tokens after each prompt (``generate`` on left-padded batches, with its KV cache)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every row's next token comes from the last column
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r, device=device), 1
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                             do_sample=False, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        out += tokenizer.batch_decode(new[:, width:], skip_special_tokens=True)
    return out


def recall(model, tokenizer, records: Sequence[EditRecord], *, extra_tokens: int = 6, batch_size: int = 32,
           progress: bool = False) -> pd.DataFrame:
    """What the unedited model knows: one row per record, with its :func:`truth`.

    ``tf_accuracy`` / ``tf_exact``: teacher-forced token accuracy and exact match of the truth
    after the prompt (exact match is the same as the greedy continuation starting with the
    truth's tokens).  ``greedy``: the truth appears (case-insensitively) in the greedy
    continuation of as many tokens as the truth has plus ``extra_tokens``, a looser test that
    accepts "the French language" for "French".
    """
    rows = []
    by_task: dict[str, list[EditRecord]] = {}
    for rec in records:
        by_task.setdefault(rec.task, []).append(rec)
    for task, recs in tqdm(by_task.items(), desc="recall", disable=bar_disabled(progress), leave=False):
        prompts, truths = [r.prompt for r in recs], [truth(r) for r in recs]
        scored = teacher_forced(model, tokenizer, prompts, truths, batch_size=batch_size)
        longest = max(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in truths)
        texts = greedy(model, tokenizer, prompts, longest + extra_tokens, batch_size=batch_size)
        for rec, t, acc, exact, text in zip(recs, truths, scored.token_accuracy, scored.exact_match, texts):
            rows.append({"task": task, "case": rec.index, "prompt": rec.prompt, "truth": t, "tf_accuracy": acc,
                         "tf_exact": bool(exact), "greedy": t.strip().lower() in text.lower(), "generated": text})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Editor configurations and their training through the engine
# ---------------------------------------------------------------------------------------------

#: Settings chosen by measurement on SmolLM2 and the real data (see :func:`real_config`).
_REAL = dict(grad_accum=2, lr=1e-4, alpha_lr=1e-4, c_edit=0.1, c_loc=1.0, clip=100.0, edit_loss_input="edit",
             n_responses=2, max_locality=2, mixing="uniform")
_SIZES = {  # (steps, val_every, n_val): default (fits the chapter's budget), full, smoke
    "default": (120, 40, 6), "full": (1200, 200, 24), "smoke": (2, 2, 1)}
_RANK = 64
#: KE's step sizes act on raw (unnormalised) gradients, which on SmolLM2 want |α| of a few 1e-2: at
#: the MEND rate of 1e-4 per optimiser step they had moved only to about 4e-3 after 120 edits, and
#: validation reliability from 0.19 to 0.23; at 1e-3 it reaches 0.45 (seed 1, 120 edits;
#: docs/measurements.md).
_KE_ALPHA_LR = 1e-3


def real_config(regime: str = "instruct", tasks: Sequence[str] | str | None = None, *, size: str = "default",
                **changes) -> tr.TrainConfig:
    """An editor configuration for SmolLM2: the paper's edited weights, sizes that fit chapter 7.

    ``size``: ``"default"`` (120 edits, sized for the chapter's 12-minute budget on 2 cores),
    ``"full"`` (1,200 edits) or ``"smoke"`` (2 edits: one update of the editor, for tests).  What is
    measured and what is carried over:
    the paper's ``c_edit = 0.1``, ``c_loc = 1``, accumulation 2 and clipping at 100; rates 1e-4, the
    embedded model's measured choice (:func:`~instructedit_lite.train.default_config`; the paper's
    rate 1e-6 moves nothing in a few hundred edits); rank 64, measured on SmolLM2 against 256 and
    1,920 after the same 120 edits (docs/measurements.md: 64 reaches the lowest validation loss, 256
    trades locality for reliability, 1,920 diverges at this rate).  Rank
    64 is 3% of the networks' width here (``combine``: d_in + d_out = 576 + 1,536 = 2,112), where
    the reference's 1,920 on GPT2-XL is 24% of 8,000 (1,600 + 6,400); the paper's 1,920 on SmolLM2
    would be 91%, far above the reference's share; uniform
    task mixing, so that a few hundred edits are shared evenly; 2 locality rows per fact and 2
    responses per ConvSent sentiment, for cheaper steps; KE's step sizes learn at 1e-3 (measured:
    at 1e-4 they barely move in a few hundred edits on this model's raw gradients).  The sizes come
    from step costs measured in chapter 7 (through the engine about a third of a plain step).
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    if tasks is None:
        if regime == "single":
            raise ValueError("real_config: regime 'single' needs its one task, e.g. tasks=('counterfact',)")
        tasks = tr.TRAINABLE_TASKS
    if size not in _SIZES:
        raise ValueError(f"real_config: size must be one of {sorted(_SIZES)}, got {size!r}")
    steps, val_every, n_val = _SIZES[size]
    values = dict(_REAL, steps=steps, val_every=val_every, n_val=n_val, checkpoint_every=val_every,
                  mend=MendConfig(rank=_RANK, weight_names=edited_weights()))
    if changes.get("method") == "ke":
        values["alpha_lr"] = _KE_ALPHA_LR
    values.update(changes)
    return tr.TrainConfig(regime=regime, tasks=tuple(tasks), **values)


@contextlib.contextmanager
def scored_positions() -> Iterator[None]:
    """Kept for callers: batches through a :class:`~instructedit_lite.engine.PrefixEngine` carry
    their scored positions by themselves (``train.losses._batch``, ``text.model_inputs``)."""
    yield


def make_engine(real: RealModel, config: tr.TrainConfig) -> eng.PrefixEngine:
    """The frozen-prefix engine for the weights ``config`` edits."""
    return eng.PrefixEngine(real.model, config.mend.weight_names, key=real.key)


def training_rows(config: tr.TrainConfig, tokenizer, train_records: Mapping[str, list[EditRecord]],
                  val_records: Mapping[str, list[EditRecord]], instructions=None) -> list[list[int]]:
    """Token rows a run of ``config`` feeds the model: every scheduled step's and every validation's."""
    if config.instructed and instructions is None:
        instructions = default_instructions()
    examples = []
    plan = tr.schedule(config, {t: len(r) for t, r in train_records.items()})
    for step, (task, index) in enumerate(plan):  # the same rng as train(): the same ConvSent responses
        rng = np.random.default_rng([config.seed, 2, step])
        examples.append(tr.build_example(train_records[task][index], config, instructions=instructions, rng=rng))
    rows: list[tuple[str, str]] = []
    for recs in val_records.values():
        for record in recs:
            ex = tr.build_example(record, config, instructions=instructions)
            examples.append(ex)
            rows += [(ex.record.prompt, ex.record.target_new)] + [(r, ex.record.target_new) for r in ex.record.rephrase]
    for ex in examples:
        rows += list(ex.edit + ex.edit_unlikely + ex.loss + ex.unlikely + ex.locality)
    unique = list(dict.fromkeys(rows))
    batch = prompt_target_batch(tokenizer, [p for p, _ in unique], [t for _, t in unique])
    return [ids[: int(n)].tolist() for ids, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))]


def editor_dir(config: tr.TrainConfig, real: RealModel) -> Path:
    """``cache_dir()/editor-<real key>-<config key>``: the real-model twin of
    :func:`~instructedit_lite.train.editor_dir`."""
    return cache_dir() / f"editor-{real.key}-{config.key()}"


def train_real_editor(config: tr.TrainConfig, real: RealModel, *, cache: bool = True, progress: bool = True,
                      engine: eng.PrefixEngine | None = None, use_engine: bool = True) -> tr.TrainedEditor:
    """Meta-train an editor of SmolLM2 on the real records (or load it from the cache).

    Through the engine by default (``engine``: one to reuse, its cached prefixes included); the
    one-off prefix computation is timed apart (``summary["prefix_seconds"]``, ``"prefix_rows"``,
    ``"prefix_bytes"``).  ``use_engine=False`` trains on the plain model (the same editor, slower).
    Cached runs resume from their checkpoint like :func:`~instructedit_lite.train.train_editor`.
    """
    folder = editor_dir(config, real)
    if cache and (folder / "summary.json").exists():
        return tr.load_trained_editor(folder, real.model)
    train_records, val_records = tr.records_for(config, real.world)
    instructions = real.source.instructions() if config.instructed else None
    model, extra = real.model, {}
    if use_engine:
        engine = engine if engine is not None else make_engine(real, config)
        rows = training_rows(config, real.tokenizer, train_records, val_records, instructions)
        start = time.perf_counter()
        new = engine.precompute(rows, progress=progress)
        extra = {"prefix_seconds": time.perf_counter() - start, "prefix_rows": new,
                 "prefix_bytes": engine.cache.nbytes, "prefix_bytes_per_token": engine.cache.bytes_per_token()}
        model = engine
    context = scored_positions() if use_engine else contextlib.nullcontext()
    with contextlib.ExitStack() as stack:
        out = folder if cache else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="instructedit-real-")))
        if cache:
            atomic_write_text(folder / "config.json", json.dumps(config.to_dict(), indent=1))
        with context:
            result = tr.train(config, model, real.tokenizer, train_records=train_records, val_records=val_records,
                              out_dir=out, instructions=instructions, progress=progress)
        summary = jsonable({**result.summary, **extra, "engine": use_engine})
        if result.finished:
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return tr.TrainedEditor(result.editor, config, pd.DataFrame(result.curves), pd.DataFrame(result.validation),
                            summary, folder if cache else None)


# ---------------------------------------------------------------------------------------------
# The engine against the plain model: the same step, and what it costs
# ---------------------------------------------------------------------------------------------


def meta_step(model, editor, tokenizer, example: tr.EditExample, config: tr.TrainConfig):
    """``(losses, editor gradients)`` of one meta-training step; the editor's gradients are cleared after."""
    editor.zero_grad(set_to_none=True)
    losses = tr.meta_losses(model, editor, tokenizer, example, config)
    losses["total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in editor.named_parameters() if p.grad is not None}
    editor.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in losses.items()}, grads


def engine_check(real: RealModel, engine: eng.PrefixEngine, config: tr.TrainConfig,
                 examples: Sequence[tr.EditExample]) -> pd.DataFrame:
    """One meta-training step per example on the plain model and through the engine (scored positions):
    the largest absolute difference of the losses and the largest relative difference of a gradient."""
    rows = []
    with _frozen(real.model):
        editor = tr.make_editor(config, real.model, generator=torch.Generator().manual_seed(config.seed))
        for ex in examples:
            # two copies: a step updates the editor's running statistics
            want_l, want_g = meta_step(real.model, copy.deepcopy(editor), real.tokenizer, ex, config)
            with scored_positions():
                got_l, got_g = meta_step(engine, copy.deepcopy(editor), real.tokenizer, ex, config)
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


def step_costs(real: RealModel, engine: eng.PrefixEngine, config: tr.TrainConfig,
               examples: Sequence[tr.EditExample], *, repeats: int = 2) -> pd.DataFrame:
    """Seconds per meta-training step, per example: on the plain model, through the engine (its prefixes
    already cached), and one forward+backward of the whole model on the edit rows (the unit of the
    ``step_ratio``)."""
    rows = []
    with _frozen(real.model):
        editor = tr.make_editor(config, real.model, generator=torch.Generator().manual_seed(config.seed))
        for ex in examples:
            plain = copy.deepcopy(editor)
            fast = copy.deepcopy(editor)
            row = {"task": ex.task,
                   "plain": _seconds(lambda: meta_step(real.model, plain, real.tokenizer, ex, config), repeats)}
            with scored_positions():
                row["engine"] = _seconds(lambda: meta_step(engine, fast, real.tokenizer, ex, config), repeats)
            edit = ex.edit + ex.edit_unlikely  # the rows the edit's backward pass runs on
            batch = prompt_target_batch(real.tokenizer, [p for p, _ in edit], [t for _, t in edit])
            params = list(real.model.parameters())

            def forward_backward():
                loss = mend_module.lm_loss(real.model(**eng.model_inputs(batch)).logits, batch["labels"])
                torch.autograd.grad(loss, params)

            real.model.requires_grad_(True)
            row["forward_backward"] = _seconds(forward_backward, repeats)
            real.model.requires_grad_(False)
            rows.append(row)
    return pd.DataFrame(rows)
