"""GRACE: a codebook of (key, value, radius, label) at one layer, read through a forward hook (chapter 5)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..config import Config
from ..editors import EditInfo, Editor, edit_batch
from ..mend import lm_loss, only_these_require_grad, weight_info
from ..records import EditRecord
from ..text import model_inputs
from .common import _all_targets_argmax, _check, _check_common, _Configured, _last_prompt_index, _resolve_module, module_template

__all__ = ["GRACEConfig", "Codebook", "GRACE"]

_SLACK = 1e-4  # relative margin when a GRACE radius is grown to cover a key


@dataclass
class GRACEConfig(Config):
    """GRACE (Hartvigsen et al. 2023) at one module.

    ``layer``/``module``: the wrapped module; default ``layer=-2``, the ``mlp.c_proj`` of block 2
    of 4: a late layer that still has one block above it to turn the one replaced vector into a
    multi-token target (blocks 1, 2, 3 all reach reliability 1.0 on 20 CounterFact records; block 2
    needs the fewest steps, 14.7 on average against 17.8 and 27.6).
    ``eps_init``: radius of a new key.  1.0 is kept: on the embedded model the last-token inputs of
    block 2's ``c_proj`` for different prompts (30 test prompts per task) are at least ≈2.4 apart
    (median 5.5–8.2 across the four tasks; prompt to its rephrase: median ≈3.7, min ≈1.0), so a
    fresh key never captures another prompt and only rarely a rephrase.
    ``lr``/``max_steps``: Adam on the new value (reference: lr 1.0, 100 steps).
    ``stop_loss``: stop once the loss is below it and every target token is the argmax.
    ``n_responses``: ConvSent responses per edit.
    """

    layer: int = -2
    eps_init: float = 1.0
    lr: float = 1.0
    max_steps: int = 100
    stop_loss: float = 1e-2
    module: str | None = None  # None: the profile's MLP output matrix
    n_responses: int = 2

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_common(self, owner)
        _check(isinstance(self.eps_init, (int, float)) and self.eps_init > 0, owner, "eps_init", self.eps_init,
               "must be > 0")
        _check(isinstance(self.lr, (int, float)) and self.lr > 0, owner, "lr", self.lr, "must be > 0")
        _check(isinstance(self.max_steps, int) and self.max_steps >= 0, owner, "max_steps", self.max_steps,
               "must be an int >= 0")
        _check(isinstance(self.stop_loss, (int, float)) and self.stop_loss >= 0, owner, "stop_loss",
               self.stop_loss, "must be >= 0")


class Codebook:
    """GRACE's memory: rows of key (module input), value (replacement output), radius ε and label.

    :meth:`hook` is the forward hook: for each sequence it finds the FIRST position whose input lies
    within ε of some key (Euclidean; the nearest such key if several) and, from that position on,
    replaces the module's output with that key's value.  "Replace from the trigger on" lets one
    value drive a multi-token target: the edit prompt triggers at its last token and the target
    tokens after it see the replaced output too.  Sequences that never trigger are returned
    untouched (bit-identical).  Assumes right padding (pads come after the real tokens, so a
    trigger on a pad changes nothing that is read) and full-sequence forwards (no KV cache).
    """

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []  # a value may be a leaf requiring grad while it is trained
        self.eps: list[float] = []
        self.labels: list[str] = []
        # What the last forward did, per sequence: the first triggered position and the entry
        # whose value replaced the outputs from there (both -1 where nothing triggered).
        self.last_trigger: Tensor | None = None
        self.last_entry: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def reset(self) -> None:
        self.__init__()

    def nearest(self, key: Tensor) -> tuple[int, float]:
        """Index and distance of the key nearest to ``key``; ``(-1, inf)`` for an empty codebook."""
        if not self.keys:
            return -1, math.inf
        distances = (torch.stack(self.keys) - key).norm(dim=-1)
        i = int(distances.argmin())
        return i, float(distances[i])

    def hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        self.last_trigger = self.last_entry = None
        if not self.keys:
            return None
        x = inputs[0]  # (B, T, d_in)
        keys = torch.stack(self.keys).to(x.dtype)  # (K, d_in)
        # Exact (non-matmul) distances: a key must be at distance 0 from itself, not ~1e-3.
        dist = torch.cdist(x, keys.expand(x.shape[0], -1, -1), compute_mode="donot_use_mm_for_euclid_dist")
        inside = dist <= torch.tensor(self.eps, dtype=dist.dtype, device=dist.device)  # (B, T, K)
        hit = inside.any(-1)  # (B, T)
        triggered = hit.any(-1)  # (B,)
        first = hit.int().argmax(-1)  # first triggered position (0 where none, masked below)
        none = torch.full_like(first, -1)
        self.last_trigger = torch.where(triggered, first, none)
        rows = torch.arange(x.shape[0], device=x.device)
        at_first = dist[rows, first].masked_fill(~inside[rows, first], math.inf)  # (B, K)
        which = at_first.argmin(-1)  # nearest key within its radius at the trigger position
        self.last_entry = torch.where(triggered, which, none)
        if not triggered.any():
            return None
        values = torch.stack(self.values).to(output.dtype)[which]  # (B, d_out)
        positions = torch.arange(x.shape[1], device=x.device)
        replace_here = triggered[:, None] & (positions[None, :] >= first[:, None])  # (B, T)
        return torch.where(replace_here[..., None], values[:, None, :], output)


class GRACE(Editor, _Configured):
    """GRACE: a forward hook with a codebook; the model's weights are never changed.

    :meth:`add_edit` applies GRACE's codebook update for one edit and trains the affected value:

    * the new key (the module's input at the last prompt token) is farther than ``ε_near +
      eps_init`` from every key → a new entry with radius ``eps_init`` (the balls do not overlap);
    * else, same label as the nearest entry → **expand**: its radius grows to cover the new key
      (``ε ← max(ε, d)``, plus a 1e-4 relative margin for rounding) and its value is trained
      further on the new edit;
    * else (conflicting label) → **split**: a new entry, and both radii shrink to ``d / 2`` so the
      two balls no longer overlap (at distance 0 no radius can separate them: the entry is
      **overwritten** with the new label and its value retrained, so the latest edit wins).

    A value is trained with Adam (``lr``, up to ``max_steps``) on the NLL of all edit rows, with
    the hook active, so training sees exactly what inference will; it starts from the module's
    output at the key position (new entries) or from the current value (expand).  If another
    entry triggers earlier on the edit prompt, the new value has no effect and is left untrained
    (``triggered`` is False in the details).  The book's evaluation uses :meth:`edited`: a fresh
    codebook with this one edit, hook on inside the block.
    """

    name = "GRACE"
    config_class = GRACEConfig

    def __init__(self, config: GRACEConfig | None = None, **overrides):
        self.config = self._configure(config, overrides)
        self.codebook = Codebook()

    def reset(self) -> None:
        """Forget every edit (an empty codebook)."""
        self.codebook.reset()

    def module(self, model: nn.Module) -> nn.Module:
        template = module_template(model, self.config.module, "mlp_out")
        name, module = _resolve_module(model, template, self.config.layer, "GRACE")
        try:
            weight_info(model, f"{name}.weight")
        except ValueError as err:
            raise ValueError(f"GRACE.module: {err}") from None
        return module

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[Codebook]:
        """The codebook's hook on the wrapped module for the body; removed on exit, also on errors."""
        handle = self.module(model).register_forward_hook(self.codebook.hook)
        try:
            yield self.codebook
        finally:
            handle.remove()

    def key(self, model: nn.Module, tokenizer, record: EditRecord) -> tuple[Tensor, Tensor]:
        """The edit's key and the initial value: the wrapped module's own input and output at the
        last prompt token, computed without the codebook."""
        module = self.module(model)
        prompt = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
        if not prompt:
            raise ValueError(f"GRACE: the edit prompt {record.prompt!r} has no tokens")
        input_ids = torch.tensor([prompt], device=next(model.parameters()).device)
        seen: dict[str, Tensor] = {}
        handle = module.register_forward_hook(
            lambda m, i, o: seen.update(key=i[0][0, -1].detach().clone(), out=o[0, -1].detach().clone()))
        try:
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        finally:
            handle.remove()
        return seen["key"], seen["out"]

    @torch.enable_grad()  # an edit is an optimisation, also when the caller scores under no_grad
    def add_edit(self, model: nn.Module, tokenizer, record: EditRecord) -> dict[str, Any]:
        """Add one edit to the codebook (rules in the class docstring) and train its value.

        Returns details: ``action`` ("add", "expand", "split" or "overwrite"), ``steps``, ``loss``,
        ``triggered`` (whether this edit's entry takes over on the edit prompt, at or before its last
        token: False means an earlier-triggering entry shadows it, and its value is left untrained),
        ``distance`` (to the nearest earlier key) and ``n_entries``.
        """
        cfg, book = self.config, self.codebook
        batch = edit_batch(tokenizer, record, next(model.parameters()).device, cfg.n_responses)
        inputs, labels = model_inputs(batch), batch["labels"]
        last = int(_last_prompt_index(labels)[0])  # every row shares the edit prompt
        key, output = self.key(model, tokenizer, record)
        label = record.target_new

        index, distance = book.nearest(key)
        overlaps = index >= 0 and distance <= book.eps[index] + cfg.eps_init
        if overlaps and book.labels[index] == label:
            action = "expand"  # same label: grow the radius to cover the new key, train the value on
            # (a hair more than ``distance``: the key's input is recomputed in a longer batch and
            # may differ in the last bits, and a radius of exactly ``distance`` would then miss it)
            book.eps[index] = max(book.eps[index], distance * (1 + _SLACK))
        elif overlaps and distance == 0:
            action = "overwrite"  # the very same key with a new label: no radius can separate them
            book.labels[index] = label
        else:
            action = "split" if overlaps else "add"
            book.keys.append(key)
            book.values.append(output)
            book.eps.append(cfg.eps_init)
            book.labels.append(label)
            if overlaps:  # conflicting labels: both balls shrink to touch halfway
                book.eps[index] = book.eps[-1] = distance / 2
            index = len(book) - 1

        value = book.values[index].clone().requires_grad_(True)
        book.values[index] = value
        optimizer = torch.optim.Adam([value], lr=cfg.lr)
        try:
            with self.hooked(model), only_these_require_grad(model, []):
                step = 0
                while True:
                    logits = model(**inputs).logits
                    loss = lm_loss(logits, labels)
                    own = bool(((book.last_trigger <= last) & (book.last_entry == index)).all())
                    if not own:  # another entry takes over on the edit prompt: this value has no effect
                        break
                    if step == cfg.max_steps or (loss.item() < cfg.stop_loss and _all_targets_argmax(logits, labels)):
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
        finally:
            book.values[index] = value.detach()  # never keep a graph-carrying tensor in the book
        return {"action": action, "steps": step, "loss": loss.item(), "triggered": own,
                "distance": distance, "n_entries": len(book)}

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tokenizer, record: EditRecord) -> Iterator[EditInfo]:
        start = time.perf_counter()
        self.reset()  # each test case is a single edit on a fresh codebook
        try:
            details = self.add_edit(model, tokenizer, record)
            with self.hooked(model):
                yield EditInfo(seconds=time.perf_counter() - start, details=details)
        finally:
            self.reset()

