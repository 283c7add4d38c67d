"""Meta-training on two CPU processes (gloo) computes the editor one process computes.

Each process takes half of every optimiser step's edits (``train.processes``); the gradients are
summed across them and MEND's statistics take every edit's rows at the step, in the order of the
edits.  Only the order in which the two halves' gradients are added differs from one process: the
statistics agree exactly and the networks to float32 rounding, which Adam's division by the root
of small second moments lifts to about 2e-7 after two steps at rate 1e-3 (stated: absolute 1e-6,
relative 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructedit_lite import train as tr
from instructedit_lite.train.loop import _check_processes
from instructedit_lite.train.processes import Processes, launch_command

HERE = Path(__file__).resolve().parent
WORKER = HERE / "processes_worker.py"
TOL = dict(rtol=1e-5, atol=1e-6)


def train_on(processes: int, out: Path, *extra: str) -> None:
    """Run the worker on ``processes`` processes; fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    if processes == 1:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    else:  # launch_command's torchrun line, with the worker script instead of a module
        cmd = launch_command(processes, "x", [])[:-2] + [str(WORKER), str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_same_editor(a: Path, b: Path) -> None:
    left, right = torch.load(a / "final.pt"), torch.load(b / "final.pt")
    assert left.keys() == right.keys()
    for key in left:
        if ".norm_" in key:  # every edit's rows, once, merged in the same order
            assert torch.equal(left[key], right[key]), key
        else:
            torch.testing.assert_close(left[key], right[key], **TOL, msg=key)
    curves = [json.loads((p / "curves.json").read_text()) for p in (a, b)]
    assert [r["step"] for r in curves[0]] == [r["step"] for r in curves[1]] == list(range(1, 9))
    assert [r["task"] for r in curves[0]] == [r["task"] for r in curves[1]]


@pytest.mark.notebooks  # starts processes: runs with the notebooks in `make test`, not in `make unit`
def test_two_processes_train_the_editor_one_process_trains(tmp_path):
    train_on(1, tmp_path / "one")
    train_on(2, tmp_path / "two")
    assert_same_editor(tmp_path / "one", tmp_path / "two")
    # a run of two processes stopped at its checkpoint resumes on one process to the same editor
    train_on(2, tmp_path / "switch", "--stop", "4")
    assert (tmp_path / "switch" / "run" / tr.CHECKPOINT).exists()
    train_on(1, tmp_path / "switch")
    assert_same_editor(tmp_path / "one", tmp_path / "switch")


class _State:  # a stand-in for accelerate's PartialState
    def __init__(self, index, count):
        self.process_index, self.num_processes = index, count


def test_edits_are_dealt_out_in_turn_and_bad_splits_are_refused():
    two = [Processes(_State(i, 2)) for i in range(2)]
    assert [[s for s in range(8) if p.mine(s)] for p in two] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    per_step = tr.TrainConfig(steps=8, grad_accum=4, val_every=4, checkpoint_every=4, statistics="per_step")
    _check_processes(per_step, two[0], None)  # fine
    with pytest.raises(ValueError, match="statistics='per_step'"):
        _check_processes(tr.TrainConfig(steps=8, grad_accum=4), two[0], None)
    with pytest.raises(ValueError, match="grad_accum .3. must be a multiple of the number of processes"):
        _check_processes(tr.TrainConfig(grad_accum=3, val_every=3, checkpoint_every=3, statistics="per_step"),
                         two[0], None)
    with pytest.raises(ValueError, match="val_every .6. must be a multiple of grad_accum"):
        _check_processes(tr.TrainConfig(grad_accum=4, val_every=6, checkpoint_every=4, statistics="per_step"),
                         two[0], None)
    with pytest.raises(ValueError, match="max_steps_this_call .5."):
        _check_processes(per_step, None, 5)
    with pytest.raises(ValueError, match="checkpoint_every"):
        tr.TrainConfig(grad_accum=4, checkpoint_every=6, statistics="per_step")
    # the default keeps every cached editor's key; "per_step" trains (and caches) another editor
    assert "statistics" not in tr.TrainConfig().key_data()
    assert tr.TrainConfig(statistics="per_step").key() != tr.TrainConfig().key()


def test_statistics_parts_merge_to_the_running_update():
    from instructedit_lite.editors.mend.networks import RunningNorm

    rows = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    at_once, later = RunningNorm(3), RunningNorm(3)
    later.pending = []
    for r in rows:
        at_once.update(r)
        later.update(r)
    assert later.count == 0 and len(later.pending) == 3  # kept, not taken in
    for part in later.pending:
        later.merge(*part)
    assert torch.equal(at_once.count, later.count)
    torch.testing.assert_close(at_once.mean, later.mean) and torch.testing.assert_close(at_once.m2, later.m2)


def test_the_paper_scale_memory_table_is_the_arithmetic():
    """train/scale.py's table (its docstring) is what memory_table computes, and the editor sizes
    follow from the networks: 4 · rank · (d_in + d_out) per shape (two blocks of U and V)."""
    import re

    from instructedit_lite.train import scale
    from instructedit_lite.train.config import PAPER_CONFIGS

    computed = scale.memory_table()
    rows = re.findall(r"^(GPT2-XL|LLaMA-2-7B), \w+ +([\d.]+) GB +([\d.]+) GB +([\d.]+) GB +([\d.]+) GB",
                      scale.__doc__, re.M)
    assert [r[0] for r in rows] == ["GPT2-XL", "LLaMA-2-7B"]
    for (_, *stated), name in zip(rows, ("gpt2-xl", "llama-2-7b")):
        got = [computed[name][k] for k in ("base", "editor", "activations", "total")]
        assert [float(x) for x in stated] == [round(g, 1) for g in got], (name, got)
    gpt2 = scale.editor_parameters(PAPER_CONFIGS["gpt2-xl"], scale.PAPER_SIZES["gpt2-xl"])
    assert abs(gpt2 - 2 * 4 * 1920 * (1600 + 6400)) / gpt2 < 0.005  # two shapes; biases, modes: the rest
    assert computed["llama-2-7b"]["total"] < 24 and computed["gpt2-xl"]["total"] < 16


def test_train_on_processes_needs_an_output_folder(capsys):
    from instructedit_lite import cli

    assert cli.main(["train", "--smoke", "--processes", "2"]) == 2
    assert "needs --out" in capsys.readouterr().err
