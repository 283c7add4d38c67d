"""The paper's scale: memory per process for meta-training GPT2-XL and LLaMA-2-7B, and how to launch it.

Meta-training runs data parallel over edits (:mod:`~instructedit_lite.train.processes`): every
process holds the whole frozen base model and the whole editor, so the memory a process needs does
not shrink with the number of processes; what grows with them is the number of edits per second.
:func:`memory_per_process` works the bytes out from the declarations, term by term:

* **base model**: its parameters × the bytes of their type (float32 4, bfloat16 2); frozen, so no
  gradients or optimiser state;
* **editor**: MEND's networks, one per shape of edited matrix (``d_in x d_out``), each two residual
  low-rank blocks over ``d_in + d_out`` coordinates (``U``, ``V``: 2 · rank · (d_in + d_out)
  parameters a block), counted by building them on PyTorch's meta device; float32 with Adam: 4
  bytes for the value, 4 for the gradient, 8 for Adam's two moments, 16 a parameter;
* **activations**: for each edited matrix and each token of a step's rows, the gradient factors
  ``u`` and ``δ`` kept for the editor (``d_in + d_out`` floats), the edited blocks' activations
  kept for the backward pass (about ``4 · d_model + 3 · d_mlp`` floats a token and block, a
  generous count), and the logits (vocabulary floats a token, twice: edit and locality passes).

``tokens`` (default 512) is a step's rows per process: an edit batch with its locality rows. The
results (:data:`PAPER_SIZES`, from each model's card) for the paper's settings
(``train.config.PAPER_CONFIGS``: rank 1,920, the MLP matrices of the last
three blocks):

=================  =============  ===========  ===========  ===========  ==================
model, base type   base           editor       activations  total        fits
=================  =============  ===========  ===========  ===========  ==================
GPT2-XL, float32   6.2 GB         2.0 GB       0.5 GB       8.7 GB       a 16 GB GPU
LLaMA-2-7B, bf16   13.5 GB        3.7 GB       0.7 GB       17.9 GB      a 24 GB GPU
=================  =============  ===========  ===========  ===========  ==================

(:func:`memory_table` computes it; a test checks the table against it.)  No sharding is needed: on
GPUs of at least these sizes, 1-8 processes each hold a copy.  Below them, the frozen base model
would be sharded (PyTorch FSDP through Accelerate), which this project does not do yet.

Launch on one machine with N GPUs (``accelerate launch`` sets up the process group that
:mod:`~instructedit_lite.train.processes` finds)::

    accelerate launch --multi_gpu --num_processes N -m instructedit_lite.cli train \\
        --model gpt2-xl --paper gpt2-xl --data DATA --statistics per_step --out runs/gpt2-xl

and on CPUs ``instructedit-lite train --processes N ...`` (torchrun, gloo).  ``grad_accum`` must be
a multiple of N: the paper's 2 allows two processes; more processes need a larger ``grad_accum``
(the same edits per optimiser step on more processes), or each process takes that many edits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..editors.mend.networks import GradientTransform
from .config import PAPER_CONFIGS, TrainConfig

__all__ = ["ModelSize", "PAPER_SIZES", "editor_parameters", "memory_per_process", "memory_table"]


@dataclass(frozen=True)
class ModelSize:
    """What the memory arithmetic needs of a model: its parameter count and widths."""

    params: int
    d_model: int
    d_mlp: int
    vocab: int


#: The paper's models, from their model cards (GPT2-XL: 1.56 B parameters; LLaMA-2-7B: 6.74 B).
PAPER_SIZES = {"gpt2-xl": ModelSize(params=1_557_611_200, d_model=1600, d_mlp=6400, vocab=50257),
               "llama-2-7b": ModelSize(params=6_738_415_616, d_model=4096, d_mlp=11008, vocab=32000)}


def _shapes(config: TrainConfig, size: ModelSize) -> list[tuple[int, int]]:
    """(d_in, d_out) of every edited matrix: an MLP input matrix maps d_model → d_mlp, the output
    matrix d_mlp → d_model."""
    out_names = ("c_proj", "down_proj")
    return [(size.d_mlp, size.d_model) if any(n in w for n in out_names) else (size.d_model, size.d_mlp)
            for w in config.mend.weight_names]


def editor_parameters(config: TrainConfig, size: ModelSize) -> int:
    """Parameters of MEND's editor for ``config`` on a model of ``size``: its networks (one per
    shape, built on the meta device) and one step size per edited matrix."""
    shapes = _shapes(config, size)
    total = len(shapes)  # the step sizes α
    with torch.device("meta"):
        for shape in sorted(set(shapes)):
            net = GradientTransform(*shape, config.mend, shapes.count(shape))
            total += sum(p.numel() for p in net.parameters())
    return total


def memory_per_process(config: TrainConfig, size: ModelSize, *, base_bytes: int = 4,
                       tokens: int = 512) -> dict[str, float]:
    """Bytes one process needs to meta-train ``config`` on a model of ``size`` (see the module)."""
    shapes = _shapes(config, size)
    blocks = len({w.split(".mlp")[0] for w in config.mend.weight_names})
    activations = 4 * tokens * (sum(i + o for i, o in shapes) + blocks * (4 * size.d_model + 3 * size.d_mlp)
                                + 2 * size.vocab)
    out = {"base": float(size.params * base_bytes), "editor": 16.0 * editor_parameters(config, size),
           "activations": float(activations)}
    out["total"] = sum(out.values())
    return out


def memory_table() -> dict[str, dict[str, float]]:
    """The module's table, in GB: GPT2-XL in float32, LLaMA-2-7B in bfloat16."""
    rows = {"gpt2-xl": 4, "llama-2-7b": 2}
    return {name: {k: v / 1e9 for k, v in memory_per_process(PAPER_CONFIGS[name], PAPER_SIZES[name],
                                                             base_bytes=b).items()}
            for name, b in rows.items()}
