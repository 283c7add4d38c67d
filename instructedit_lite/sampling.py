"""Whole texts, one row at a time: EasyEdit-style sampled text and greedy text (fluency, lifelong
editing and unlearning checks; chapters 5 and 9).

Each decodes through :mod:`~instructedit_lite.generation`'s rules: an engine's full model, and the
KV cache wherever it gives the same text as full forward passes.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch

from .generation import _decoder, _device, _kv_cache_is_exact, context_limit, kv_cache_argument, no_cache_growth

__all__ = ["sample_text", "greedy_text", "case_generator"]


def case_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the case's identity (e.g. task and index), stable
    across processes (no Python ``hash``): every method samples a case's text from the same seed."""
    text = "/".join(str(k) for k in (seed, *keys))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()))


@torch.no_grad()
def _extend(model, ids: list[int], n_new: int, pick: Callable[[torch.Tensor], int],
            use_cache: bool | None) -> list[int]:
    """``ids`` plus ``n_new`` tokens, each ``pick(next-token logits)``, one row, no padding.
    ``use_cache`` (default: where it is exact, see ``_kv_cache_is_exact``) feeds one new token
    per step with the model's KV cache instead of the whole row."""
    model = _decoder(model)
    device, ids = _device(model), list(ids)
    cache = _kv_cache_is_exact(model) if use_cache is None else use_cache
    cache_arg = kv_cache_argument(model)
    past, fed = None, 0
    with no_cache_growth(model):
        for _ in range(n_new):
            x = torch.tensor([ids[fed:] if cache else ids], device=device)
            mask = torch.ones(1, len(ids), dtype=torch.long, device=device)  # the whole row, cached part too
            if cache:
                out = model(input_ids=x, attention_mask=mask, use_cache=True, **{cache_arg: past})
                past, fed = getattr(out, cache_arg), len(ids)
            else:
                out = model(input_ids=x, attention_mask=mask)
            ids.append(pick(out.logits[0, -1].float().cpu()))
    return ids


def sample_text(model, tokenizer, prompt: str, *, max_out_len: int = 100, top_k: int = 5,
                generator: torch.Generator | None = None, use_cache: bool | None = None) -> str:
    """EasyEdit's ``generate_fast`` for one prompt: top-``k`` sampling (temperature 1) until the row,
    *prompt included*, holds ``max_out_len`` tokens; returns the prompt and its continuation decoded.

    As there, a prompt of ``max_out_len`` tokens or more gets no continuation.  The draws come from
    ``generator`` (CPU), so a rerun with the same generator state gives the same text.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("sample_text: the prompt has no tokens")

    def pick(logits: torch.Tensor) -> int:
        top = torch.topk(torch.softmax(logits, -1), top_k)
        return int(top.indices[torch.multinomial(top.values / top.values.sum(), 1, generator=generator)])

    n_new = max(0, min(max_out_len, context_limit(model)) - len(ids))
    return tokenizer.decode(_extend(model, ids, n_new, pick, use_cache), skip_special_tokens=True)


def greedy_text(model, tokenizer, prompt: str, n_tokens: int = 100, *, use_cache: bool | None = None) -> str:
    """Up to ``n_tokens`` greedy tokens after ``prompt`` (fewer where the context ends first), the
    continuation only, decoded."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = min(n_tokens, context_limit(model) - len(ids))
    if n < 1:
        raise ValueError(f"greedy_text: a prompt of {len(ids)} tokens leaves no room in the context of "
                         f"{context_limit(model)}")
    out = _extend(model, ids, n, lambda logits: int(logits.argmax()), use_cache)
    return tokenizer.decode(out[len(ids):], skip_special_tokens=True)
