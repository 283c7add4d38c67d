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

from ..editors import Editor
from .calinet import CaliNet, CaliNetConfig
from .finetune import FTL, FTM, FTLConfig, FTMConfig, last_prompt_position_nll, target_nll
from .grace import GRACE, Codebook, GRACEConfig

__all__ = [
    "BASELINES", "make_baseline",
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
