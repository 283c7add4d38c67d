"""Edited weights: the LM loss, where a weight lives and how it is laid out, writing an update in and out (chapter 3)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ...architectures import n_blocks, profile_for
from ...text import model_inputs as _model_inputs

try:  # GPT-2's linear layer: y = x W + b with W stored as (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency of the project
    Conv1D = None

__all__ = ["IGNORE_INDEX", "lm_loss", "unlikelihood_loss", "edit_loss", "WeightInfo", "weight_info", "default_weight_names", "only_these_require_grad",
           "functional_forward", "applied", "Conv1D"]

IGNORE_INDEX = -100


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the labelled tokens.

    Causal shift: the logits at position ``t`` predict the token at ``t + 1``, so
    ``L = mean_{t: labels[t+1] ≠ -100} −log p(labels[t+1] | logits[t])``.
    Computed in float32 so half-precision models get a stable loss.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    if not (shifted_labels != IGNORE_INDEX).any():
        raise ValueError("lm_loss: no labelled token after the first position (all labels are -100)")
    return nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def unlikelihood_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``−mean log(1 − p(token))`` over the labelled tokens (shifted as in
    :func:`~instructedit_lite.editors.mend.lm_loss`)."""
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).float()
    if mask.sum() == 0:
        raise ValueError("unlikelihood_loss: no labelled token")
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # log(1 − p) = log(−expm1(log p)); p is kept just below 1 so the loss stays finite.
    log_not = torch.log(-torch.expm1(logp.clamp(max=-1e-6)))
    return -(log_not * mask).sum() / mask.sum()


def edit_loss(logits: Tensor, labels: Tensor, unlikely: Tensor | None = None) -> Tensor:
    """The loss an edit's gradient comes from (chapter 3): :func:`~instructedit_lite.editors.mend.lm_loss` of
    the rows, or, when ``unlikely`` (one bool per row) flags some, ``lm_loss`` of the others plus
    :func:`unlikelihood_loss` of the flagged ones.  ConvSent's edits flag the responses of the
    unwanted sentiment, as EasyEdit's trainer does (``multiclass_log_probs(..., unlikelihood=True)``:
    ``−mean log p(good) − mean log(1 − p(bad))``, each a token mean of its own rows)."""
    if unlikely is None or not bool(unlikely.any()):
        return lm_loss(logits, labels)
    if bool(unlikely.all()):
        raise ValueError("edit_loss: every row is flagged unlikely; an edit needs a row to make likely")
    return lm_loss(logits[~unlikely], labels[~unlikely]) + unlikelihood_loss(logits[unlikely], labels[unlikely])





@dataclass(frozen=True)
class WeightInfo:
    """An edited matrix: ``layout`` is ``"linear"`` (W is (d_out, d_in)) or ``"conv1d"`` ((d_in, d_out))."""

    name: str
    layout: str
    shape: tuple[int, int]

    @property
    def d_in(self) -> int:
        return self.shape[1] if self.layout == "linear" else self.shape[0]

    @property
    def d_out(self) -> int:
        return self.shape[0] if self.layout == "linear" else self.shape[1]

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0]


def weight_info(model: nn.Module, name: str) -> WeightInfo:
    """Look up an edited weight; raises ValueError naming it if it is missing or not a linear map."""
    module_name, _, leaf = name.rpartition(".")
    if leaf != "weight":
        raise ValueError(f"edited weight {name!r} must be the '.weight' of a Linear or Conv1D module")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"edited weight {name!r}: the model has no module {module_name!r}") from None
    if Conv1D is not None and isinstance(module, Conv1D):
        layout = "conv1d"
    elif isinstance(module, nn.Linear):
        layout = "linear"
    else:
        raise ValueError(f"edited weight {name!r} belongs to a {type(module).__name__}, not Linear/Conv1D")
    return WeightInfo(name, layout, tuple(module.weight.shape))


def default_weight_names(model: nn.Module, n_last: int = 3) -> list[str]:
    """MLP weight matrices of the last ``n_last`` transformer blocks, as in the paper.

    Resolved from the model's :class:`~instructedit_lite.architectures.Profile` (GPT-2:
    ``transformer.h.{i}.mlp.c_fc.weight``, ``...c_proj.weight``; LLaMA:
    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``); a model of no known family falls back to
    a scan for ``<blocks>.<i>.mlp.<linear>`` modules.
    """
    try:
        profile = profile_for(model)
    except ValueError:
        profile = None
    if profile is not None:
        return profile.edited_weights(n_blocks(model, profile), n_last)
    blocks: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        if "mlp" not in parts or not isinstance(module, (nn.Linear,) + ((Conv1D,) if Conv1D else ())):
            continue
        block = parts[parts.index("mlp") - 1]
        if block.isdigit():
            blocks.setdefault(int(block), []).append(f"{module_name}.weight")
    if not blocks:
        raise ValueError("default_weight_names: found no '<blocks>.<i>.mlp.<linear>' modules; pass weight_names")
    last = sorted(blocks)[-n_last:]
    return [name for i in last for name in blocks[i]]



@contextlib.contextmanager
def only_these_require_grad(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Temporarily let only the named parameters require grad; restore every flag afterwards.

    With everything else frozen, autograd builds no graph below the lowest edited layer: the
    backward pass of an edit costs only the top of the network.
    """
    wanted = set(names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])




def functional_forward(model: nn.Module, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    """Logits of ``model`` with the weights in ``params`` substituted (the others unchanged).

    ``torch.func.functional_call`` keeps ``params`` on the autograd graph, so
    ``lm_loss(functional_forward(...), labels).backward()`` reaches the editor and the α's.
    """
    return torch.func.functional_call(model, dict(params), args=(), kwargs=_model_inputs(batch)).logits


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Edit ``model`` in place for the body: ``W ← W + ΔW`` (detached).

    On exit the exact original weights are copied back from clones (not ``W − ΔW``, which would
    not round-trip in floating point), also when the body raises, so no edit leaks into the next
    test case.
    """
    originals = {name: model.get_parameter(name).detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = model.get_parameter(name)
                weight.add_(delta.detach().to(device=weight.device, dtype=weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_parameter(name).copy_(original)
