"""The frozen-prefix engine: pay for the blocks below the lowest edited weight once per text row.

MEND edits only the MLP matrices of the last few blocks, and the base model never changes during
meta-training or evaluation.  So the hidden state *entering* the lowest edited block depends only
on the tokens of a row: :class:`PrefixEngine` computes it once per distinct row, keeps it in a
:class:`PrefixCache`, and every later call runs only the edited blocks, the final norm and the
LM head.  With right padding and causal attention the real tokens of a row never see the padding,
so a cached row fits into any batch.

The engine is a drop-in for the model (chapter 7):

* it *shares* the model's modules under the same names, so ``get_parameter``, hooks on the edited
  MLP modules (MEND's capture of u and δ), ``torch.func.functional_call`` with edited weights on
  the autograd graph, and :func:`~instructedit_lite.mend.applied` all work unchanged;
* ``engine(input_ids=..., attention_mask=...)`` returns ``.logits`` of shape (B, T, V) like the
  model (positions on padding are not defined: they hold the logits of a zero hidden state);
* with ``positions`` (from :func:`scored_batch`, which also rewrites the labels), the LM head runs
  only at the scored positions, and the usual losses (``lm_loss``, ``locality_kl``, accuracies)
  give the same values on the compact logits and labels as on the full ones.

The cache is valid while nothing *below* the lowest edited block changes (editing any weight
there, e.g. with another editor's weight names, needs a new engine).  It grows by one
(length × d_model) tensor per distinct row, float32 by default: 2,304 bytes per token for SmolLM2.

The extra arguments every block needs (the causal mask; rotary cos/sin and position ids for
LLaMA) are captured from the model's own forward by a pre-hook on its first block that stops the
pass there, so one code path serves GPT-2 and LLaMA-style models.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .atomic import atomic_torch_save

IGNORE = -100
CACHE_FORMAT = 1

# model_type -> (blocks, final norm, LM head).  The one place that knows architectures; swap for
# the architecture profiles when they exist.
_LAYOUTS = {
    "gpt2": ("transformer.h", "transformer.ln_f", "lm_head"),
    "llama": ("model.layers", "model.norm", "lm_head"),
    "mistral": ("model.layers", "model.norm", "lm_head"),
    "qwen2": ("model.layers", "model.norm", "lm_head"),
}


def layout(model: nn.Module) -> tuple[str, str, str]:
    """Module paths of ``(blocks, final norm, LM head)``; ValueError for an unknown architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _LAYOUTS:
        raise ValueError(f"PrefixEngine: no layout for model_type {model_type!r}; known: {sorted(_LAYOUTS)}")
    return _LAYOUTS[model_type]


def lowest_block(weight_names: Sequence[str], blocks_path: str) -> int:
    """Index of the lowest block holding an edited weight; ValueError if one lies outside the blocks."""
    indices = []
    for name in weight_names:
        rest = name[len(blocks_path) + 1:] if name.startswith(blocks_path + ".") else ""
        index = rest.split(".", 1)[0]
        if not index.isdigit():
            raise ValueError(f"PrefixEngine: edited weight {name!r} is not inside a block of {blocks_path!r}")
        indices.append(int(index))
    if not indices:
        raise ValueError("PrefixEngine: no edited weights given")
    return min(indices)


class _Stop(Exception):
    """Raised by a pre-hook to end a forward pass once what it needs has been captured."""


# ---------------------------------------------------------------------------------------------
# Scored positions: logits only where a label is predicted
# ---------------------------------------------------------------------------------------------


def scored_batch(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The batch with ``positions`` added and ``labels`` compacted to the scored positions.

    Position ``t`` of row ``b`` is scored when ``labels[b, t + 1] != -100`` (its logits predict a
    label).  With ``K`` the most scored positions of any row, ``positions`` (B, K + 1) lists them
    (padded with 0) and the new ``labels`` (B, K + 1) hold ``-100`` at index 0 and
    ``labels[b, positions[b, j] + 1]`` at ``j + 1``: the causal shift of every loss
    (``logits[:, :-1]`` against ``labels[:, 1:]``) then pairs the same logits and targets as in
    the full batch.  The last index of ``positions`` is never scored.
    """
    labels = batch["labels"]
    scored = labels[:, 1:] != IGNORE  # (B, T - 1)
    counts = scored.sum(1)
    k = int(counts.max()) if len(counts) else 0
    positions = torch.zeros(labels.shape[0], k + 1, dtype=torch.long, device=labels.device)
    compact = torch.full((labels.shape[0], k + 1), IGNORE, dtype=labels.dtype, device=labels.device)
    for b in range(labels.shape[0]):
        where = scored[b].nonzero().squeeze(1)
        positions[b, : len(where)] = where
        compact[b, 1: len(where) + 1] = labels[b, where + 1]
    return {**batch, "positions": positions, "labels": compact}


def gather_positions(full: Tensor, positions: Tensor) -> Tensor:
    """``full[b, positions[b, j]]`` for (B, T, ...) tensors: the compact view of full logits/states."""
    index = positions.view(*positions.shape, *([1] * (full.dim() - 2))).expand(-1, -1, *full.shape[2:])
    return full.gather(1, index)


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """What to pass to a model or an engine: ids, mask and, if present, the scored positions."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "positions") if k in batch}


# ---------------------------------------------------------------------------------------------
# The cache of prefix hidden states
# ---------------------------------------------------------------------------------------------


class PrefixCache:
    """Hidden states entering the lowest edited block, one (length, d_model) tensor per token row.

    Keyed by the row's token ids; ``key`` names the model and block (a saved cache only loads into
    an engine with the same key).  ``dtype`` is the storage type (float32 by default: exact).
    """

    def __init__(self, key: str = "", dtype: torch.dtype = torch.float32):
        self.key, self.dtype = key, dtype
        self.rows: dict[tuple[int, ...], Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, tokens: tuple[int, ...]) -> bool:
        return tokens in self.rows

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    def bytes_per_token(self) -> int:
        """Storage per token: d_model × element size."""
        first = next(iter(self.rows.values()), None)
        return 0 if first is None else first.shape[-1] * first.element_size()

    def save(self, path: str | os.PathLike) -> None:
        """Write every row to one file, atomically."""
        atomic_torch_save({"format": CACHE_FORMAT, "key": self.key, "rows": {k: v for k, v in self.rows.items()}},
                          path)

    def load(self, path: str | os.PathLike) -> int:
        """Add the rows of a saved cache; ValueError naming the file if it belongs to another model."""
        blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        if blob.get("format") != CACHE_FORMAT or blob.get("key") != self.key:
            raise ValueError(f"{path}: prefix cache for {blob.get('key')!r} (format {blob.get('format')}), "
                             f"this engine needs {self.key!r} (format {CACHE_FORMAT})")
        self.rows.update({tuple(k): v.to(self.dtype) for k, v in blob["rows"].items()})
        return len(blob["rows"])


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class PrefixEngine(nn.Module):
    """Runs ``model`` from the lowest edited block up, with the hidden states below it cached.

    ``weight_names``: the edited matrices (their lowest block is where the cached prefix ends).
    ``key``: names the model in the cache key (e.g. the base model's cache key).
    ``prefix_batch_size``: rows per batch when computing missing prefixes.
    """

    def __init__(self, model: nn.Module, weight_names: Sequence[str], *, key: str = "",
                 cache_dtype: torch.dtype = torch.float32, prefix_batch_size: int = 32):
        super().__init__()
        blocks, norm, head = layout(model)
        object.__setattr__(self, "full_model", model)  # not a submodule: its children are shared below
        for name, child in model.named_children():
            self.add_module(name, child)  # same parameter names as the model
        self.config = model.config
        # Plain attributes, not submodules: registered twice they would get a second name.
        for attr, path in (("blocks", blocks), ("norm", norm), ("head", head)):
            object.__setattr__(self, attr, model.get_submodule(path))
        self.lowest = lowest_block(weight_names, blocks)
        self.prefix_batch_size = prefix_batch_size
        self.cache = PrefixCache(f"{key}|{type(model).__name__}|block{self.lowest}", cache_dtype)

    def cache_path(self) -> "os.PathLike":
        """Where :meth:`PrefixCache.save` should put this engine's states: the project cache, by key."""
        import hashlib

        from .base_model import cache_dir

        return cache_dir() / f"prefix-states-{hashlib.sha256(self.cache.key.encode()).hexdigest()[:12]}.pt"

    # -- the two stopped passes through the model ------------------------------------------

    def _run_until(self, block: nn.Module, input_ids: Tensor, attention_mask: Tensor):
        """Run the model until ``block`` is called; return that call's ``(args, kwargs)``."""
        captured: dict[str, Any] = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.full_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError("PrefixEngine: the model's forward never reached the block it stops at")
        return captured["args"], captured["kwargs"]

    @torch.no_grad()
    def precompute(self, rows: Sequence[Sequence[int]], *, progress: bool = False) -> int:
        """Compute and cache the prefix of every row not yet cached; returns how many were new."""
        from tqdm.auto import tqdm

        todo = sorted({tuple(int(t) for t in r) for r in rows} - self.cache.rows.keys(), key=len)
        device = self.head.weight.device
        starts = range(0, len(todo), self.prefix_batch_size)
        for start in tqdm(starts, desc="prefix states", disable=not progress, leave=False):
            chunk = todo[start: start + self.prefix_batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r, device=device)
                mask[i, : len(r)] = 1
            args, _ = self._run_until(self.blocks[self.lowest], ids, mask)
            hidden = args[0]
            for i, r in enumerate(chunk):
                self.cache.rows[r] = hidden[i, : len(r)].to(self.cache.dtype).clone()
        return len(todo)

    # -- the edited part -----------------------------------------------------------------------

    @staticmethod
    def _rows(input_ids: Tensor, attention_mask: Tensor) -> list[tuple[int, ...]]:
        lengths = attention_mask.sum(1)
        expected = torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths[:, None]
        if not torch.equal(attention_mask.bool(), expected):
            raise ValueError("PrefixEngine: batches must be right-padded (attention_mask = 1…1 0…0 per row)")
        return [tuple(row[:n].tolist()) for row, n in zip(input_ids, lengths.tolist())]

    def prefix_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, d_model) hidden states entering the lowest edited block; zeros on padding."""
        rows = self._rows(input_ids, attention_mask)
        self.precompute(rows)
        first = self.cache.rows[rows[0]]
        hidden = torch.zeros(*input_ids.shape, first.shape[-1], dtype=self.head.weight.dtype, device=input_ids.device)
        for i, r in enumerate(rows):
            hidden[i, : len(r)] = self.cache.rows[r]
        return hidden

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, positions: Tensor | None = None):
        """Logits like ``model(input_ids, attention_mask).logits``; only at ``positions`` if given."""
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.prefix_states(input_ids, attention_mask)
        # Mask, position ids, rotary cos/sin: whatever the model hands its blocks for this batch.
        args, kwargs = self._run_until(self.blocks[0], input_ids, attention_mask)
        for block in self.blocks[self.lowest:]:
            out = block(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if positions is not None:
            hidden = gather_positions(hidden, positions)
        return CausalLMOutput(logits=self.head(self.norm(hidden)))
