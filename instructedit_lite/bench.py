"""What an edit costs: one MEND edit against one forward+backward pass of the base model.

MEND's selling point is that an edit costs about as much as one fine-tuning step: one forward and
a partial backward pass to get the gradient factors, a small network, and a weight update.  This
benchmark times both on the same input (an instruction-prefixed edit of the embedded world) with
``instructedit_lite.mend.time_edit_vs_forward_backward``.  The editor is untrained: an
edit's cost depends on its architecture, not on its weights.

Run as ``python -m instructedit_lite.bench`` or ``instructedit-lite bench``; the result is printed
and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .base_model import cache_dir, load_base_model
from .instructions import default_instructions, maybe_instruct
from .mend import MendEditor, time_edit_vs_forward_backward
from .text import prompt_target_batch
from .train import default_config

DEFAULT_NAME = "edit-cost.json"


def default_output() -> Path:
    return cache_dir() / DEFAULT_NAME


def edit_cost(base=None, *, repeats: int = 20, mend_config=None, task: str = "counterfact",
              instructed: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Median seconds of one edit and of one forward+backward, and their ratio, on ``base``.

    ``base`` defaults to :func:`~instructedit_lite.base_model.load_base_model`.  The input is the
    first test record of ``task``, instruction-prefixed unless ``instructed=False``.  The editor
    has the architecture of :func:`~instructedit_lite.train.default_config` unless
    ``mend_config`` is given.  ``threads`` sets ``torch.set_num_threads`` for the measurement.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    base = base or load_base_model()
    mend_config = mend_config or default_config("instruct").mend
    record = base.world.records(task, "test")[0]
    record = maybe_instruct(record, default_instructions() if instructed else None)
    device = next(base.model.parameters()).device
    batch = prompt_target_batch(base.tokenizer, [record.prompt], [record.target_new], device)
    editor = MendEditor(base.model, mend_config, generator=torch.Generator().manual_seed(0))
    timing = time_edit_vs_forward_backward(base.model, editor, batch, repeats=repeats)
    return {
        **timing,
        "repeats": repeats,
        "input_tokens": int(batch["input_ids"].shape[1]),
        "model_parameters": sum(p.numel() for p in base.model.parameters()),
        "editor_parameters": sum(p.numel() for p in editor.parameters()),
        "edited_weights": list(editor.infos),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def run(out: str | Path | None = None, *, repeats: int = 20, threads: int | None = None,
        stream=None) -> dict[str, Any]:
    """Measure, print the result as JSON and write it to ``out`` (default: the cache folder)."""
    result = edit_cost(repeats=repeats, threads=threads)
    path = Path(out) if out is not None else default_output()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    path.write_text(text + "\n")
    stream = stream or sys.stdout
    print(text, file=stream)
    print(f"edit / forward+backward = {result['ratio']:.2f}  (written to {path})", file=stream)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON file to write (default: $INSTRUCTEDIT_CACHE/{DEFAULT_NAME})")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the measurement")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructedit_lite.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.out, repeats=args.repeats, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
