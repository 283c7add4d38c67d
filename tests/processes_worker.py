"""Meta-training on the hand-made world of test_train.py, alone or under torchrun (test_processes.py).

Writes ``OUT/final.pt`` (the final editor's state) and ``OUT/curves.json`` from the main process;
``--stop N`` stops after N edits (the checkpoint stays in ``OUT/run`` to resume from)."""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_train as tt  # noqa: E402
from instructedit_lite.base_model import train_tokenizer  # noqa: E402
from instructedit_lite.instructions import DESCRIPTIONS, TEMPLATE  # noqa: E402
from instructedit_lite.train.processes import current  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--stop", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [f"{p} was born in {c}. {p} works as a {j}." for p, c, j in zip(tt.PEOPLE, tt.CITIES, tt.JOBS)]
    lines += [s.format(t=t) for t in tt.TOPICS for s in tt.POS + tt.NEG]
    lines += [TEMPLATE] + [d for ds in DESCRIPTIONS.values() for d in ds]
    tokenizer = train_tokenizer(lines, vocab_size=500)
    config = tt.tiny_config(steps=args.steps, grad_accum=4, val_every=4, checkpoint_every=4, statistics="per_step")
    out = Path(args.out)
    result = tt.run(config, tokenizer, out_dir=out / "run", max_steps_this_call=args.stop)
    procs = current()
    if procs is None or procs.is_main:
        torch.save(result.final_editor.state_dict(), out / "final.pt")
        (out / "curves.json").write_text(json.dumps(result.curves))


if __name__ == "__main__":
    main()
