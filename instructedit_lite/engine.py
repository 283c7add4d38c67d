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
  the autograd graph, and :func:`~instructedit_lite.editors.mend.applied` all work unchanged;
* ``engine(input_ids=..., attention_mask=...)`` returns ``.logits`` of shape (B, T, V) like the
  model (positions on padding are not defined: they hold the logits of a zero hidden state);
* with ``positions`` (from :func:`scored_batch`, which also rewrites the labels), the LM head runs
  only at the scored positions, and the usual losses (``lm_loss``, ``locality_kl``, accuracies)
  give the same values on the compact logits and labels as on the full ones.

The cache is valid while nothing *below* the lowest edited block changes, and the engine checks
that before every pass: a weight there written in place (an edit applied, even if restored since)
empties the cache, so the rows are computed again from the weights as they are; a weight there
*replaced* (``functional_call`` with an edited matrix below the cut) or a forward hook there (GRACE
or CaliNet placed lower) raises an error naming the module, since the engine would skip it.  The
cache grows by one (length × d_model) tensor per distinct row, float32 by default: 2,304 bytes per
token for SmolLM2.

The extra arguments every block needs (the causal mask; rotary cos/sin and position ids for
LLaMA) are captured from the model's own forward by a pre-hook on its first block that stops the
pass there, so one code path serves GPT-2 and LLaMA-style models.
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .architectures import profile_for
from .atomic import atomic_torch_save
from .generation import kv_cache_argument
from .paths import cache_dir
from .progress import bar_disabled

IGNORE = -100
CACHE_FORMAT = 1

def layout(model: nn.Module) -> tuple[str, str, str]:
    """Module paths of ``(blocks, final norm, LM head)``, from the model's architecture profile
    (:mod:`~instructedit_lite.architectures`); ValueError for an unknown architecture."""
    profile = profile_for(model)
    if not profile.final_norm:
        raise ValueError(f"PrefixEngine: the {profile.name!r} architecture profile names no final norm; "
                         "give it one (Profile(final_norm=...))")
    return profile.blocks, profile.final_norm, profile.head


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


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common beginning of two token rows."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def shared_groups(rows: Sequence[tuple[int, ...]], min_shared: int) -> list[tuple[int, list[tuple[int, ...]]]]:
    """Split sorted ``rows`` into runs that share a beginning: ``[(shared length, rows), ...]``.

    A run grows while the next row shares at least ``min_shared`` tokens with its first row and
    the run's shared part would not shrink below half of what it was; the shared part always leaves
    each row at least one token of its own.  ``shared`` is 0 for a row that shares nothing.
    """
    groups: list[tuple[int, list[tuple[int, ...]]]] = []
    i = 0
    while i < len(rows):
        first, shared, j = rows[i], len(rows[i]) - 1, i + 1
        while j < len(rows) and min_shared > 0:
            common = min(_common(first, rows[j]), len(rows[j]) - 1)
            if common < min_shared or (j > i + 1 and common < shared / 2):
                break
            shared, j = min(shared, common), j + 1
        groups.append((shared if j > i + 1 else 0, list(rows[i:j])))
        i = j
    return groups


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
    ``min_shared``: rows that begin with at least this many equal tokens share their computation
    (0 turns sharing off).
    """

    def __init__(self, model: nn.Module, weight_names: Sequence[str], *, key: str = "",
                 cache_dtype: torch.dtype = torch.float32, prefix_batch_size: int = 32, min_shared: int = 8):
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
        self.prefix_batch_size, self.min_shared = prefix_batch_size, min_shared
        self.cache = PrefixCache(f"{key}|{type(model).__name__}|block{self.lowest}", cache_dtype)
        # What the cached rows depend on: the parameters and modules below the lowest edited block
        # (a weight tied to the LM head, SmolLM2's embedding, counts as above: the head runs).
        above = {id(p) for m in (*self.blocks[self.lowest:], self.norm, self.head) for p in m.parameters()}
        inside = {id(m) for b in self.blocks[self.lowest:] for m in b.modules()}
        self._below = [(f"{name}.{pname}" if name else pname, module, pname, p)
                       for name, module in model.named_modules()
                       for pname, p in module.named_parameters(recurse=False) if id(p) not in above]
        self._below_modules = [(name, m) for i in range(self.lowest)
                               for name, m in self.blocks[i].named_modules(prefix=f"{blocks}.{i}")]
        listed = {id(m) for _, m in self._below_modules}
        self._below_modules += [(name, m) for name, m in model.named_modules()
                                if id(m) not in listed | inside and any(m is module for _, module, _, _ in self._below)]
        self._versions = [p._version for *_, p in self._below]

    def check_prefix(self) -> None:
        """Keep the cached rows true to the weights below the lowest edited block.

        A weight there written in place since the rows were computed (its version counter moved)
        empties the cache; a weight there replaced by another tensor, or a forward hook on a module
        there, raises ``RuntimeError`` naming it: the engine never runs those blocks, so the edit
        would be ignored."""
        where = f"below block {self.lowest}, where the engine's cached prefix ends"
        for name, module, pname, p in self._below:
            if module._parameters.get(pname) is not p:
                raise RuntimeError(f"PrefixEngine: {name} ({where}) was replaced, e.g. by an editor that edits it "
                                   "through torch.func.functional_call; the engine would ignore the edit. Build "
                                   "the engine with weight names that include it, or run the plain model.")
        for name, module in self._below_modules:
            if module._forward_hooks or module._forward_pre_hooks:
                raise RuntimeError(f"PrefixEngine: a forward hook on {name} ({where}) would never run (GRACE or "
                                   "CaliNet placed there?); place the editor at that block or above, or run the "
                                   "plain model.")
        versions = [p._version for *_, p in self._below]
        if versions != self._versions:
            self.cache.rows.clear()  # a weight below changed (and may have been restored): every row is stale
            self._versions = versions

    def get_input_embeddings(self) -> nn.Module:
        """The model's input embedding (KE reads an edit's tokens through it)."""
        return self.full_model.get_input_embeddings()

    def cache_path(self) -> "os.PathLike":
        """Where :meth:`PrefixCache.save` should put this engine's states: the project cache, by key."""
        return cache_dir() / f"prefix-states-{hashlib.sha256(self.cache.key.encode()).hexdigest()[:12]}.pt"

    # -- the two stopped passes through the model ------------------------------------------

    def _run_until(self, block: nn.Module, input_ids: Tensor, attention_mask: Tensor, past_key_values=None):
        """Run the model until ``block`` is called; return that call's ``(args, kwargs)``.

        With ``past_key_values`` (a cache of earlier tokens) ``attention_mask`` covers those too."""
        captured: dict[str, Any] = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        handle = block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                if past_key_values is None:
                    self.full_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                else:
                    self.full_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                                    **{kv_cache_argument(self.full_model): past_key_values})
        except _Stop:
            pass
        finally:
            handle.remove()
        if "args" not in captured:
            raise RuntimeError("PrefixEngine: the model's forward never reached the block it stops at")
        return captured["args"], captured["kwargs"]

    @torch.no_grad()
    def precompute(self, rows: Sequence[Sequence[int]], *, progress: bool = False) -> int:
        """Compute and cache the prefix of every row not yet cached; returns how many were new.

        Rows that begin with the same tokens (an instruction, a shared question) are grouped
        (:func:`shared_groups`) and their common beginning runs once: its keys and values are
        kept and every row of the group runs only its own remaining tokens on top of them.
        """
        self.check_prefix()
        todo = sorted({tuple(int(t) for t in r) for r in rows} - self.cache.rows.keys())
        groups, alone = [], []
        for shared, members in shared_groups(todo, self.min_shared):
            # a separate pass for the shared part pays only when it saves enough tokens
            if shared * (len(members) - 1) >= 4 * self.min_shared:
                groups.append((shared, members))
            else:
                alone += members
        bar = tqdm(total=len(todo), desc="prefix states", disable=bar_disabled(progress), leave=False)
        for shared, members in [(0, alone)] + groups:
            past = self._shared_past(members[0][:shared]) if shared else None
            by_length = sorted(members, key=len)
            for start in range(0, len(by_length), self.prefix_batch_size):
                chunk = by_length[start: start + self.prefix_batch_size]
                self._precompute_chunk(chunk, shared, past)
                bar.update(len(chunk))
        bar.close()
        return len(todo)

    def _shared_past(self, tokens: tuple[int, ...]):
        """``(hidden states, key/value cache)`` of a shared beginning, below the lowest edited block."""
        from transformers import DynamicCache

        device = self.head.weight.device
        ids = torch.tensor([tokens], device=device)
        cache = DynamicCache(config=self.config)
        args, _ = self._run_until(self.blocks[self.lowest], ids, torch.ones_like(ids), past_key_values=cache)
        return args[0][0], cache

    def _precompute_chunk(self, chunk: list[tuple[int, ...]], shared: int, past) -> None:
        """Cache the rows of ``chunk``; with ``past``, they run only their tokens after ``shared``."""
        device = self.head.weight.device
        width = max(len(r) for r in chunk) - shared
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), shared + width, dtype=torch.long, device=device)
        for i, r in enumerate(chunk):
            ids[i, : len(r) - shared] = torch.tensor(r[shared:], device=device)
            mask[i, : len(r)] = 1
        extra = {}
        if past is not None:
            cache = copy.deepcopy(past[1])  # the pass appends to it
            cache.batch_repeat_interleave(len(chunk))
            extra["past_key_values"] = cache
        args, _ = self._run_until(self.blocks[self.lowest], ids, mask, **extra)
        for i, r in enumerate(chunk):
            own = args[0][i, : len(r) - shared]
            states = own if past is None else torch.cat([past[0], own])
            self.cache.rows[r] = states.to(self.cache.dtype).clone()

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
