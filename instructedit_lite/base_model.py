"""The embedded base model: a small GPT-2 that has read the knowledge world, and real models by name.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the world's corpus (plus the
instruction descriptions, so an instruction costs a few tokens, not one per byte), wrapped as a
``PreTrainedTokenizerFast``.  The model is a ``transformers.GPT2LMHeadModel`` whose module names are
those of GPT2-XL (``transformer.h.{i}.mlp.c_fc`` ...), so the editing code is the same at both scales.

Pretraining packs the shuffled corpus lines, separated by the end-of-text token, into fixed-length
rows, as GPT-2 itself was trained: facts then appear at every position, also far from the start,
where an instruction prefix will later push them.  The result is cached on disk under a key of the
whole configuration and written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .architectures import n_blocks, profile_for
from .atomic import atomic_save_dir, building
from .engine import PrefixEngine
from .instructions import DESCRIPTIONS, TEMPLATE, default_instructions
from .paths import CACHE_ENV, cache_dir  # noqa: F401  (the cache folder, for every module)
from .progress import bar_disabled
from .text import teacher_forced
from .world import World, WorldConfig

EOS = "<|endoftext|>"
#: The two scales of the book: the embedded world and real models on the published data.
SCALES = ("embedded", "real")
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class BaseModelConfig:
    """The world, the tokenizer, the architecture and the pretraining schedule."""

    world: WorldConfig = field(default_factory=WorldConfig)
    vocab_size: int = 2048
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 160
    seq_len: int = 96
    batch_size: int = 24
    steps: int = 1300
    lr: float = 6e-3
    warmup: int = 100
    seed: int = 0
    # BLAS threads of the pretraining: 0 = every core of the machine (the book's model; the bits
    # depend on the thread count).  The smoke model takes 1: the same on any machine, and it does
    # not fight a parallel test worker for the cores (spin-waiting threads made it 4x slower).
    threads: int = 0

    def key(self) -> str:
        """A hash of the configuration *and* of the text the model is trained on, so a change to
        the world's generator (same config, other corpus) never reuses a stale cached model."""
        fields = asdict(self)
        if not fields["threads"]:  # the default is left out: the book's key predates the field
            del fields["threads"]
        text = json.dumps([fields, tokenizer_training_text(World(self.world))], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SMOKE_STEPS = 200  # smoke runs' pretraining: 69-76 s on one core (measured), recall about 13 %


def base_config(seed: int = 0, *, smoke: bool = False) -> BaseModelConfig:
    """The embedded base model of a chapter (chapter 1) for the world of ``seed``: the book's, or
    for a smoke run the same world, tokenizer and architecture pretrained for only
    ``SMOKE_STEPS`` steps (``make test`` checks that the code runs; the book checks the model)."""
    config = BaseModelConfig(world=WorldConfig(seed=seed))
    return replace(config, steps=SMOKE_STEPS, warmup=SMOKE_STEPS // 5, threads=1) if smoke else config


def tokenizer_training_text(world: World) -> list[str]:
    """The corpus plus the instruction template and the *built-in* tasks' descriptions (tokenizer
    only, not pretraining).

    Deliberately :data:`~instructedit_lite.instructions.DESCRIPTIONS`, not the task registry: the
    text is part of the base model's cache key, so registering a task (with descriptions of its
    own) must not silently re-pretrain the model and move every number of the book.  A registered
    task's descriptions are still tokenized (byte-level BPE covers any text), only less compactly.
    """
    extra = [TEMPLATE] + [d for ds in DESCRIPTIONS.values() for d in ds]
    return world.corpus + extra


def train_tokenizer(lines: list[str], vocab_size: int):
    """A byte-level BPE like GPT-2's, trained on ``lines``, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def _quiet(model):
    # transformers looks for ``loss_type`` on the model and warns once when it is unset.
    model.loss_type = "ForCausalLM"
    return model


def build_model(config: BaseModelConfig, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    gpt_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id)
    return _quiet(GPT2LMHeadModel(gpt_config))


def packed_rows(token_lines: list[list[int]], eos_id: int, seq_len: int, rng: random.Random) -> torch.Tensor:
    """One epoch: shuffle the lines, join them with end-of-text tokens, cut into ``seq_len`` rows."""
    order = list(range(len(token_lines)))
    rng.shuffle(order)
    stream: list[int] = []
    for i in order:
        stream += token_lines[i] + [eos_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def pretrain(config: BaseModelConfig, *, progress: bool = True):
    """Train tokenizer and model from scratch; returns ``(model, tokenizer, log)``.

    Uses every core for the duration (rows of 24 x 96 tokens are big enough to gain from them), or
    ``config.threads``, whatever thread count the caller set for the small matrix products of editing.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    try:
        return _pretrain(config, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(config: BaseModelConfig, *, progress: bool):
    seed_everything(config.seed)
    world = World(config.world)
    tokenizer = train_tokenizer(tokenizer_training_text(world), config.vocab_size)
    model = build_model(config, tokenizer)
    token_lines = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in world.corpus]
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < config.warmup:
            return (step + 1) / config.warmup
        done = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rows = packed_rows(token_lines, tokenizer.eos_token_id, config.seq_len, rng)
    cursor, epochs, losses = 0, 1, []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="pretraining", disable=bar_disabled(progress))
    for step in bar:
        if cursor + config.batch_size > len(rows):
            rows, cursor, epochs = packed_rows(token_lines, tokenizer.eos_token_id, config.seq_len, rng), 0, epochs + 1
        batch = rows[cursor: cursor + config.batch_size]
        cursor += config.batch_size
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epochs)
    model.eval()
    log = {"seconds": time.perf_counter() - start, "losses": losses, "epochs": epochs,
           "corpus_lines": len(token_lines), "corpus_tokens": sum(len(t) + 1 for t in token_lines),
           "parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, log


def fact_recall(model, tokenizer, world: World, which: str = "trained", *, batch_size: int = 256):
    """Teacher-forced recall of every known fact, in its trained or held-out phrasings (a DataFrame,
    one row per phrasing: ``exact`` when every answer token is the argmax)."""
    probes = pd.DataFrame(world.recall_probes(which), columns=["subject", "relation", "prompt", "answer"])
    scores = teacher_forced(model, tokenizer, probes["prompt"].tolist(), probes["answer"].tolist(),
                            batch_size=batch_size)
    return probes.assign(exact=scores.exact_match, token_accuracy=scores.token_accuracy)


def facts_known(recall) -> int:
    """Facts recalled exactly in every one of their phrasings in ``recall``."""
    return int(recall.groupby(["subject", "relation"])["exact"].all().sum())


class WithLocality:
    """A records source keeping only the records with a locality probe: ``L_loc`` and the locality
    score need one, and some published records have none (105 of Recent's 399 training records;
    every record of the embedded world has one).  Other attributes are the source's."""

    def __init__(self, source):
        self.source, self.tasks = source, source.tasks

    def records(self, task: str, split: str) -> list:
        return [r for r in self.source.records(task, split) if r.locality_probes]

    def __getattr__(self, name: str):
        return getattr(self.source, name)


@dataclass
class BaseModel:
    """A model to edit, for every model: the embedded GPT-2 or any Hugging Face causal LM (chapters 1 and 7).

    ``source`` gives the edit records: any object with ``records(task, split)`` and ``tasks`` (the
    embedded :class:`~instructedit_lite.world.World` is one, a folder of public files another);
    ``world`` is the part of it that is edited (the records with a locality probe).
    ``key`` names the model and its data in cache folders (editors trained for it live under it);
    ``spec`` is a small picklable recipe that rebuilds it in another process
    (:func:`~instructedit_lite.models.from_spec`; ``None`` for a model built in memory, which is
    then trained in-process); ``profile`` says where its blocks and MLPs are
    (:mod:`~instructedit_lite.architectures`); ``scale`` picks the row of the settings tables
    (``"embedded"`` or ``"real"``) and whether edits go through the frozen-prefix engine (real).
    Load one with :func:`~instructedit_lite.models.load_model`.
    """

    model: object
    tokenizer: object
    source: object
    config: BaseModelConfig | None = None
    info: dict = field(default_factory=dict)
    path: Path | None = None
    key: str = ""
    spec: tuple | None = None
    profile: object = None
    scale: str = "embedded"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"BaseModel: scale must be one of {SCALES}, got {self.scale!r}")
        if not self.key:
            if self.config is None:
                raise ValueError("BaseModel: give a cache key (key=...) or an embedded BaseModelConfig")
            self.key = self.config.key()
        if self.profile is None:
            self.profile = profile_for(self.model)

    @property
    def world(self):
        """The records that are edited: those of ``source`` with a locality probe."""
        return None if self.source is None else WithLocality(self.source)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.source.tasks)

    def records(self, task: str, split: str) -> list:
        return self.world.records(task, split)

    def instructions(self):
        """The task instructions of this model's data: the data's own (the published files' official
        instruction file when present), else the project's."""
        own = getattr(self.source, "instructions", None)
        return own() if callable(own) else default_instructions()

    def weight_names(self, n_last: int = 3) -> list[str]:
        """The paper's default edited weights for this model (MLP matrices of the last blocks)."""
        return self.profile.edited_weights(n_blocks(self.model, self.profile), n_last)

    def edited_blocks(self, n_last: int = 3) -> list[int]:
        """The indices of the blocks :meth:`weight_names` edits (SmolLM2: 27, 28 and 29)."""
        depth = n_blocks(self.model, self.profile)
        return list(range(depth - n_last, depth))

    def for_editing(self, weight_names: Sequence[str] | None = None) -> "BaseModel":
        """This model as methods edit it: itself on the embedded scale; on the real scale a copy whose
        ``model`` is the frozen-prefix engine (:class:`~instructedit_lite.engine.PrefixEngine`) for
        ``weight_names`` (default :meth:`weight_names`), which caches the states below the edited
        blocks and computes only the blocks from there up."""
        if self.scale == "embedded":
            return self
        return replace(self, model=PrefixEngine(self.model, list(weight_names or self.weight_names()), key=self.key))

    def as_tuple(self) -> tuple:
        """``(model, tokenizer, weight_names)``."""
        return self.model, self.tokenizer, self.weight_names()


def _pretrain_into(path: Path, config: BaseModelConfig, world: World, progress: bool) -> None:
    """Pretrain the base model, measure its recall and write it to ``path`` atomically."""
    model, tokenizer, log = pretrain(config, progress=progress)
    recall = {which: fact_recall(model, tokenizer, world, which) for which in ("trained", "held_out")}
    info = {"config": asdict(config), **{k: v for k, v in log.items()},
            "recall_trained": float(recall["trained"]["exact"].mean()),
            "recall_held_out": float(recall["held_out"]["exact"].mean()),
            "facts_known": facts_known(recall["trained"]), "facts_total": len(world.known_facts),
            "torch": torch.__version__}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "pretraining.json").write_text(json.dumps(info, indent=1))

    atomic_save_dir(path, write)


def load_base_model(config: BaseModelConfig | None = None, *, progress: bool = True,
                    retrain: bool = False) -> BaseModel:
    """The cached base model for ``config``, pretraining (and measuring recall) on a cache miss."""
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    config = config or BaseModelConfig()
    path = cache_dir() / f"base-model-{config.key()}"
    if retrain and path.exists():
        shutil.rmtree(path)
    world = World(config.world)
    with building(path):  # chapters executed side by side pretrain it once
        if not path.exists():
            _pretrain_into(path, config, world, progress)
    model = _quiet(GPT2LMHeadModel.from_pretrained(path).eval())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    info = json.loads((path / "pretraining.json").read_text())
    return BaseModel(model, tokenizer, world, config, info, path, spec=("embedded", config))
