"""What the baselines share: option checks, module lookup through the architecture profile, config handling."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from torch import Tensor, nn

from ..architectures import profile_for
from ..engine import PrefixEngine, scored_batch
from .mend import IGNORE_INDEX


def _check(cond: bool, owner: str, option: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"{owner}.{option} {why}, got {value!r}")


def _check_common(cfg, owner: str, layer_may_be_none: bool = False) -> None:
    """Options every config has: ``layer`` (an int, negative counts from the last block; None where
    the config picks the block by relative depth), ``module`` (a template with ``{layer}``, or None
    for the model's architecture profile) and ``n_responses``."""
    is_int = isinstance(cfg.layer, int) and not isinstance(cfg.layer, bool)
    _check(is_int or (layer_may_be_none and cfg.layer is None), owner, "layer", cfg.layer,
           "must be an int (negative counts from the last block)" + (" or None" if layer_may_be_none else ""))
    _check(cfg.module is None or (isinstance(cfg.module, str) and "{layer}" in cfg.module), owner, "module",
           cfg.module, "must be None (the model's profile) or a module-name template containing '{layer}'")
    _check(isinstance(cfg.n_responses, int) and cfg.n_responses >= 1, owner, "n_responses", cfg.n_responses,
           "must be an int >= 1")


def module_template(model: nn.Module, template: str | None, part: str) -> str:
    """``template``, or when it is None the profile's template of ``part``: ``"mlp"``, ``"mlp_out"``
    (the MLP's output matrix) or ``"act_in"`` (the matrix whose output enters the activation: the
    profile's first MLP input, ``c_fc`` for GPT-2, ``gate_proj`` for LLaMA)."""
    if template is not None:
        return template

    profile = profile_for(model)
    parts = {"mlp": profile.mlp_module(), "mlp_out": profile.mlp_out_module(),
             "act_in": f"{profile.mlp_module()}.{profile.mlp_in[0]}"}
    return parts[part]


def count_blocks(model: nn.Module, template: str) -> int:
    """How many consecutive blocks 0, 1, ... have a module named by ``template``."""
    n = 0
    while _get(model, template.format(layer=n)) is not None:
        n += 1
    return n


def _resolve_module(model: nn.Module, template: str, layer: int, owner: str) -> tuple[str, nn.Module]:
    """``template.format(layer=...)`` with a negative ``layer`` counted from the last block."""
    n_blocks = count_blocks(model, template)
    if n_blocks == 0:
        raise ValueError(f"{owner}.module: the model has no module {template.format(layer=0)!r} "
                         f"(template {template!r})")
    index = layer + n_blocks if layer < 0 else layer
    if not 0 <= index < n_blocks:
        raise ValueError(f"{owner}.layer={layer}: the model has {n_blocks} blocks matching {template!r}")
    name = template.format(layer=index)
    return name, _get(model, name)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def scored_for(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` with its scored positions when ``model`` is a frozen-prefix engine: the LM head
    then runs only where a label is predicted (on SmolLM2 most of an optimisation step's cost,
    chapter 8), and every loss here gives the same values on the compact logits and labels."""
    return scored_batch(batch) if isinstance(model, PrefixEngine) else batch


def _all_targets_argmax(logits: Tensor, labels: Tensor) -> bool:
    """Teacher forced: is every target token the argmax at the position before it?"""
    mask = labels[:, 1:] != IGNORE_INDEX
    return bool(((logits[:, :-1].argmax(-1) == labels[:, 1:]) | ~mask).all())


def _last_prompt_index(labels: Tensor) -> Tensor:
    """Per row, the position of the last prompt token (the one before the first target label)."""
    is_target = labels != IGNORE_INDEX
    if not is_target.any(1).all():
        raise ValueError("every row of an edit batch needs at least one target label")
    first = is_target.int().argmax(1)  # argmax returns the first maximal index
    if (first == 0).any():
        raise ValueError("an edit row has an empty prompt: no position can predict its first target token")
    return first - 1


class _Configured:
    """``Method(config=None, **overrides)``: a config object, keyword overrides, or both."""

    config_class: type

    def _configure(self, config, overrides: dict[str, Any]):
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__}: config must be a {self.config_class.__name__}, "
                             f"got {type(config).__name__}")
        known = {f.name for f in fields(self.config_class)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{self.config_class.__name__}: unknown option(s) {unknown}; known: {sorted(known)}")
        return replace(config, **overrides)  # re-runs __post_init__, so overrides are validated too

