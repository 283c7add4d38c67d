"""The paper's baseline editors: FT-L, FT-M, GRACE and CaliNet, behind the
:class:`~instructedit_lite.editors.Editor` interface.

Each method is a small class with a ``name`` (the label in tables), a config dataclass with
documented defaults and a ``with method.edited(model, tokenizer, record):`` block that carries one
edit and leaves the model *exactly* as it was afterwards (also when the block raises):

* **FT-L** and **FT-M** (``finetune.py``) fine-tune one MLP output matrix (weight and bias) of a
  detached copy via ``torch.func.functional_call`` and return ``ΔW = new − original``; the
  :class:`~instructedit_lite.editors.WeightEditor` base class writes it in and copies the original back.
* **GRACE** (``grace.py``) and **CaliNet** (``calinet.py``) never touch a weight: they add a
  forward hook for the block and remove it on exit.

Which module each one edits comes from the model's architecture profile
(:mod:`~instructedit_lite.architectures`) unless a config names one, so they run unchanged on the
embedded GPT-2, GPT2-XL or a LLaMA-family model.  Everything is deterministic (no sampling;
CaliNet's slot initialisation uses its own seeded generator) and there is no progress bar: a
method is called once per test case, thousands of times.  Every method trains on
:func:`~instructedit_lite.editors.edit_rows` (one row for the fact tasks; ConvSent: the question followed by
``n_responses`` responses of the wanted sentiment).  Records arrive prepared.  Their measured
behaviour on the embedded model is in chapter 5 and docs/measurements.md.
"""

from typing import Any, Sequence

from ..architectures import n_blocks
from ..engine import lowest_block
from .base import Editor
from .calinet import CaliNet, CaliNetConfig
from .finetune import FTL, FTM, FTLConfig, FTMConfig, last_prompt_position_nll, target_nll
from .grace import GRACE, Codebook, GRACEConfig

__all__ = [
    "BASELINES", "make_baseline", "baseline_options", "GRACE_STEPS", "REFERENCE_BLOCKS", "PLACEMENTS",
    "FTL", "FTLConfig", "FTM", "FTMConfig",
    "GRACE", "GRACEConfig", "Codebook",
    "CaliNet", "CaliNetConfig",
    "last_prompt_position_nll", "target_nll",
]

_CLASSES = {"FT-L": FTL, "FT-M": FTM, "GRACE": GRACE, "CaliNet": CaliNet}
#: The baseline methods' names (each is also registered in :mod:`~instructedit_lite.methods`).
BASELINES = tuple(_CLASSES)


def make_baseline(name: str, **config) -> Editor:
    """A baseline by its table name (FT-L, FT-M, GRACE, CaliNet), with config overrides."""
    if name not in _CLASSES:
        raise ValueError(f"make_baseline: unknown method {name!r}; choose one of {tuple(_CLASSES)}")
    return _CLASSES[name](**config)


#: GRACE's optimisation steps on a real model (see :func:`baseline_options`).
GRACE_STEPS = 50
#: Where the baselines edit a real model by default: EasyEdit's LLaMA settings
#: (``hparams/FT/llama-7b.yaml``: FT-L and FT-M at block 21, no norm constraint;
#: ``hparams/GRACE/llama-7b.yaml``: ``model.layers[27].mlp.down_proj``, 50 steps), each block
#: clipped to the model's last one.
REFERENCE_BLOCKS = {"FT-L": 21, "FT-M": 21, "GRACE": 27}
#: ``"reference"``: EasyEdit's LLaMA placement, each method through an engine cut at its own block;
#: ``"same-block"``: every baseline inside the meta-trained editors' blocks, one engine for all.
PLACEMENTS = ("reference", "same-block")


def baseline_options(base=None, weight_names: Sequence[str] | None = None, *, smoke: bool = False,
                     placement: str = "reference") -> dict[str, dict[str, Any]]:
    """Where (and how long) the baselines edit ``base``, as ``build_methods``' ``options``.

    On the embedded scale (or without ``base``): each baseline's own defaults (EasyEdit's GPT-2
    settings, chapter 5).  On the real scale, ``placement="reference"`` (the default) is EasyEdit's
    LLaMA placement (:data:`REFERENCE_BLOCKS`): FT-L and FT-M tune block 21's MLP output matrix
    with no norm box, GRACE wraps block 27's MLP output matrix; the evaluation runs each through a
    frozen-prefix engine cut at its own block (:func:`~instructedit_lite.experiments.evaluation_models`).
    ``placement="same-block"`` puts every baseline inside the blocks the meta-trained editors edit
    (``weight_names``, default ``base.weight_names()``: SmolLM2's blocks 27-29) with the reference's
    GPT-2 settings otherwise (FT-L and FT-M inside the 5e-4 box), so that all methods run through one
    engine and compare on the same weights (chapter 9's lifelong streams).  CaliNet's memory slots
    go to the top edited block in both (its default, as on the embedded model).

    GRACE runs 50 optimisation steps, EasyEdit's LLaMA setting (its GPT2-XL one is 200): on
    SmolLM2 it rarely reaches its stopping loss, and 200 steps cost 17-27 s per edit on one core
    against 5-10 s (measured on two CounterFact and two ConvSent records: reliability 1.00 / 0.78
    with 200 steps, 1.00 / 0.70 with 50).  ``smoke``: two steps for every baseline on the real scale
    (tests only)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"baseline_options: placement must be one of {PLACEMENTS}, got {placement!r}")
    if base is None or base.scale == "embedded":
        return {}
    names = list(weight_names) if weight_names is not None else base.weight_names()
    blocks = base.profile.blocks
    lowest = lowest_block(names, blocks)  # ValueError unless every name is in a block
    highest = max(int(n[len(blocks) + 1:].split(".", 1)[0]) for n in names)
    steps = {"steps": 2} if smoke else {}
    grace_steps = 2 if smoke else GRACE_STEPS
    if placement == "same-block":
        return {"FT-L": {"layer": lowest, **steps}, "FT-M": {"layer": lowest, **steps},
                "GRACE": {"layer": lowest, "n_iter": grace_steps}, "CaliNet": {"layer": highest, **steps}}
    last = n_blocks(base.model, base.profile) - 1
    at = {name: min(block, last) for name, block in REFERENCE_BLOCKS.items()}
    return {"FT-L": {"layer": at["FT-L"], "eps": None, **steps}, "FT-M": {"layer": at["FT-M"], "eps": None, **steps},
            "GRACE": {"layer": at["GRACE"], "module": base.profile.mlp_out_module(), "n_iter": grace_steps},
            "CaliNet": {"layer": highest, **steps}}
