"""Meta-training on several processes with Hugging Face Accelerate: data parallel over edits (chapter 4).

MEND's meta-training batch is a set of independent edits, and the base model is frozen, so the
natural split is over edits: each process holds the whole base model and the whole editor, takes
its share of the ``grad_accum`` edits between two optimiser steps, and before the step the
editor's gradients are summed across processes (what one process would have summed alone).
Every process then takes the same optimiser step, so the editors stay identical and any process
could write the checkpoint; the main one does.

MEND's running normalisation is the one piece of state an edit changes before the step: in one
process each edit's rows enter the statistics at once (``TrainConfig.statistics="per_edit"``), so
the second edit of a step is normalised with the first one's rows.  Several processes cannot
reproduce that order, so they train with ``statistics="per_step"``: every edit of a step is
normalised with the statistics as they were at the step's start, and at the step each process's
parts (:meth:`~instructedit_lite.editors.mend.RunningNorm.part`) are merged in the order of the edits.
One process with ``"per_step"`` computes the same editor, up to the order in which the gradients
are summed; a test checks it on two CPU processes.

Launch with ``torchrun`` on CPUs (gloo), or ``accelerate launch --multi_gpu`` on GPUs::

    torchrun --standalone --nproc_per_node 2 -m instructedit_lite.cli train --statistics per_step --out runs/ie
    instructedit-lite train --processes 2 --out runs/ie     # the same, launched for you

(``accelerate launch`` on CPUs needs MPI; torchrun sets the same environment.)  The processes find
each other through Accelerate's ``accelerate.PartialState``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import torch

__all__ = ["Processes", "current", "launch_command"]


class Processes:
    """The process group as the training loop needs it: who am I, which edits are mine, and the
    three exchanges (gradients, running statistics, curve rows)."""

    def __init__(self, state):
        self.state = state
        self.index, self.count = state.process_index, state.num_processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def mine(self, step: int) -> bool:
        """Whether edit number ``step`` (0-based) is this process's: edits are dealt out in turn."""
        return step % self.count == self.index

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every ``.grad`` by its sum over the processes, in one exchange of one flat buffer.
        A parameter that no process gave a gradient keeps ``None`` (Adam skips it, as in one
        process); one that some did gets zeros first."""
        from accelerate.utils import reduce

        has = reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.float32), "sum")
        summed = [p for p, any_grad in zip(params, has.tolist()) if any_grad]
        for p in summed:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = reduce(torch.cat([p.grad.detach().flatten() for p in summed]), "sum")
        for p, g in zip(summed, flat.split([p.numel() for p in summed])):
            p.grad.copy_(g.view_as(p.grad))

    def merge_statistics(self, norms: Sequence[Any], parts: list[tuple[int, int, int, Any]]) -> None:
        """Merge every process's statistics parts into ``norms``, in the order of the edits.

        ``parts``: this process's ``(step, call, norm index, (n, μ, M2))`` since the last step."""
        from accelerate.utils import gather_object

        everyone = gather_object([(step, call, i, tuple(t.cpu() if torch.is_tensor(t) else t for t in part))
                                  for step, call, i, part in parts])
        for step, call, i, part in sorted(everyone, key=lambda x: (x[0], x[1], x[2])):
            norms[i].merge(*part)

    def gather_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every process's curve rows since the last step, in the order of the edits."""
        from accelerate.utils import gather_object

        return sorted(gather_object(list(rows)), key=lambda r: r["step"])

    def wait(self) -> None:
        self.state.wait_for_everyone()


def current() -> Processes | None:
    """The process group this process was launched in, or None for a single process (no
    ``WORLD_SIZE`` above 1 in the environment)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(state) if state.num_processes > 1 else None


def launch_command(processes: int, module: str, args: Sequence[str]) -> list[str]:
    """The command that runs ``python -m module args`` on ``processes`` local processes
    (``torchrun --standalone``: one machine, a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", module, *args]
