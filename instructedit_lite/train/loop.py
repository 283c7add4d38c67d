"""The meta-training loop with its checkpoints and bit-for-bit resume (chapter 4)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import atomic_torch_save, atomic_write_text
from ..config import jsonable
from ..editors.ke import KEEditor
from ..editors.mend import MendEditor
from ..editors.mend.networks import RunningNorm
from ..instructions import InstructionSet, default_instructions
from ..progress import bar_disabled
from ..records import EditRecord
from .config import TrainConfig
from .examples import build_example, schedule, task_probabilities
from .losses import meta_losses
from .processes import current as current_processes
from .validation import validate

__all__ = ["TrainResult", "train", "make_editor", "load_editor", "CHECKPOINT", "CHECKPOINT_FORMAT"]

#: Bumped when the checkpoint's layout changes.
CHECKPOINT_FORMAT = 1

def _cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    """What :func:`train` returns: the best and the last editor, curves and a summary.

    ``editor`` is the checkpoint with the lowest validation loss among the trained ones (step 0, the
    untrained editor, is validated as the curves' baseline only).  ``finished`` is False when the
    call stopped early (``max_steps_this_call``; before a trained editor was validated, ``editor``
    is the current one); calling :func:`train` again with the same output folder resumes.
    ``summary["train_seconds"]`` is the wall time of the training loop over all calls, its periodic
    validations included (the step-0 validation of the untrained editor is not);
    ``summary["validation_seconds"]`` is the time of all validations.
    """

    editor: MendEditor
    final_editor: MendEditor
    curves: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    summary: dict[str, Any]
    finished: bool


def make_editor(config: TrainConfig, model, generator: torch.Generator | None = None):
    """The untrained editor of ``config.method`` for ``model``: a MendEditor or a KEEditor."""
    if config.method == "ke":
        return KEEditor(model, config.ke_config(), generator=generator)
    return MendEditor(model, config.mend, generator=generator)


def load_editor(path: str | os.PathLike, model, method: str = "mend"):
    """A saved editor of ``method`` (see :func:`make_editor`) for ``model``."""
    if method == "ke":
        return KEEditor.load(path, model)
    return MendEditor.load(path, model)


@contextlib.contextmanager
def _frozen(model) -> Any:
    """The base model in eval mode with every ``requires_grad`` off; flags and mode restored."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    try:
        model.eval()
        model.requires_grad_(False)
        yield model
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace("model.", "").replace(".weight", "")


def train(config: TrainConfig, model, tokenizer, *, train_records: Mapping[str, list[EditRecord]],
          val_records: Mapping[str, list[EditRecord]], out_dir: str | os.PathLike | None = None,
          instructions: InstructionSet | None = None, progress: bool = True,
          max_steps_this_call: int | None = None,
          callback: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Meta-train an editor for ``model`` on ``train_records`` (task → records).

    With ``out_dir``, checkpoints go to ``out_dir/checkpoint.pt`` every ``checkpoint_every`` edits
    and at the end (also when stopping after ``max_steps_this_call`` edits), and a run that finds a
    checkpoint there resumes from it; the finished run also writes the best and the final editor,
    the curves (CSV) and a summary (JSON).  ``callback(step, row)`` is called after every edit.
    The base model's weights are never changed.

    Launched on several processes (``torchrun``, ``accelerate launch``;
    :mod:`~instructedit_lite.train.processes`), each process takes its share of every optimiser
    step's edits and the gradients are summed across them; this needs
    ``config.statistics == "per_step"``, a ``grad_accum`` the process count divides and a
    ``val_every`` that ``grad_accum`` divides.  Every process returns the same result; only the
    main one writes files.
    """
    missing = [t for t in config.tasks if t not in train_records]
    if missing:
        raise ValueError(f"train: no training records for {missing}")
    if config.instructed and instructions is None:
        instructions = default_instructions()
    out = Path(out_dir) if out_dir is not None else None
    procs = current_processes()
    per_step = config.statistics == "per_step"
    _check_processes(config, procs, max_steps_this_call)
    sizes = {t: len(train_records[t]) for t in config.tasks}
    plan = schedule(config, sizes)

    editor = make_editor(config, model, generator=torch.Generator().manual_seed(config.seed))
    editor.train()
    # fused: one kernel for the whole update; the per-tensor loop took a quarter of a rank-1,920
    # step on SmolLM2 (32.5 M editor parameters; docs/measurements.md)
    opt_net = torch.optim.Adam(editor.network_parameters(), lr=config.lr, fused=True)
    opt_alpha = torch.optim.Adam(editor.alpha_parameters(), lr=config.alpha_lr, fused=True)
    params = list(editor.parameters())
    alpha_names = {id(editor.alpha(n)): _short(n) for n in editor.infos}
    norms = [m for m in editor.modules() if isinstance(m, RunningNorm)] if per_step else []
    parts: list[tuple[int, int, int, tuple]] = []  # per_step: statistics parts since the last step

    step, skipped, optimizer_steps = 0, 0, 0
    curves: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    seconds = 0.0
    if out is not None and (out / CHECKPOINT).exists():
        ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt["config_key"] != config.key():
            raise ValueError(f"{out / CHECKPOINT}: checkpoint of another configuration or format "
                             f"({ckpt.get('config_key')} vs {config.key()}); remove it or use another folder")
        editor.load_state_dict(ckpt["editor"])  # includes the running statistics: never reset
        opt_net.load_state_dict(ckpt["opt_net"])
        opt_alpha.load_state_dict(ckpt["opt_alpha"])
        for p, g in zip(params, ckpt["grads"]):
            p.grad = None if g is None else g.to(p.device)
        step, skipped, optimizer_steps = ckpt["step"], ckpt["skipped"], ckpt["optimizer_steps"]
        curves, validation, best, seconds = ckpt["curves"], ckpt["validation"], ckpt["best"], ckpt["seconds"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])

    def checkpoint() -> None:
        if out is None or (procs is not None and not procs.is_main):
            return
        atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "config": config.to_dict(), "config_key": config.key(),
            "step": step, "skipped": skipped, "optimizer_steps": optimizer_steps, "seconds": seconds,
            "editor": _cpu_state(editor), "opt_net": opt_net.state_dict(), "opt_alpha": opt_alpha.state_dict(),
            "grads": [None if p.grad is None else p.grad.detach().cpu().clone() for p in params],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "curves": curves, "validation": validation, "best": best,
        }, out / CHECKPOINT)

    def run_validation() -> None:
        nonlocal best
        start = time.perf_counter()
        metrics = validate(model, editor, tokenizer, val_records, config, instructions=instructions)
        row = {"step": step, "optimizer_steps": optimizer_steps, **metrics,
               "seconds": time.perf_counter() - start}
        validation.append(row)
        # The untrained editor (step 0) is the curves' baseline, never the kept editor: like the
        # reference trainer, which validates first after its first interval of training.  Its
        # validation loss is c_edit·L_e with no locality cost at all, so early in training, while
        # the edits still disturb the locality rows, it would often win and the run would return
        # an editor that edits nothing (train.learning_problem flags a kept editor that did not learn).
        if step > 0 and (best is None or metrics["val_loss"] < best["val_loss"]):
            best = {"step": step, "val_loss": metrics["val_loss"], "metrics": row, "state": _cpu_state(editor)}

    def patience_spent() -> bool:
        """``config.patience`` validations in a row after the kept one, none with a lower loss."""
        return bool(config.patience) and best is not None and \
            sum(v["step"] > best["step"] for v in validation) >= config.patience

    def optimizer_step() -> float:
        nonlocal skipped, optimizer_steps
        norm = torch.nn.utils.clip_grad_norm_(params, config.clip)
        if torch.isfinite(norm):
            opt_net.step()
            opt_alpha.step()
            optimizer_steps += 1
        else:
            skipped += 1
        opt_net.zero_grad(set_to_none=True)
        opt_alpha.zero_grad(set_to_none=True)
        return float(norm)

    stop_at = config.steps if max_steps_this_call is None else min(config.steps, step + max_steps_this_call)
    bar = tqdm(total=config.steps, initial=step, desc=f"meta-training ({config.regime})",
               disable=bar_disabled(progress))
    running = None
    rows: list[dict[str, Any]] = []  # computed since they were last added to the curves
    with _frozen(model):
        if not validation:  # the untrained editor: the baseline of the curves
            run_validation()
        while step < stop_at and not patience_spent():
            start = time.perf_counter()
            task, index = plan[step]
            if procs is None or procs.mine(step):
                for norm in norms:
                    norm.pending = []
                rng = np.random.default_rng([config.seed, 2, step])
                example = build_example(train_records[task][index], config, instructions=instructions, rng=rng)
                losses = meta_losses(model, editor, tokenizer, example, config)
                (losses["total"] / config.grad_accum).backward()
                for i, norm in enumerate(norms):  # per_step: the statistics take these rows at the step
                    parts += [(step, j, i, part) for j, part in enumerate(norm.pending)]
                    norm.pending = None
                rows.append({"step": step + 1, "task": task, "L_e": losses["edit"].item(),
                             "L_loc": losses["loc"].item(), "total": losses["total"].item(),
                             "grad_norm": float("nan"), "skipped": skipped,
                             **{f"alpha:{alpha_names[id(a)]}": a.item() for a in editor.alpha_parameters()}})
            step += 1
            seconds += time.perf_counter() - start
            if step % config.grad_accum == 0 or step == config.steps:  # the optimiser step
                start = time.perf_counter()
                if procs is not None:
                    procs.sum_gradients(params)
                    rows = procs.gather_rows(rows)
                    procs.merge_statistics(norms, parts)
                else:
                    for _, _, i, part in sorted(parts, key=lambda x: x[:3]):
                        norms[i].merge(*part)
                parts = []
                grad_norm = optimizer_step()
                last = next(r for r in rows if r["step"] == step)  # it records the step's outcome
                last.update({"grad_norm": grad_norm, "skipped": skipped},
                            **{f"alpha:{alpha_names[id(a)]}": a.item() for a in editor.alpha_parameters()})
                seconds += time.perf_counter() - start
            elif procs is not None:
                continue  # the other processes' rows arrive at the step
            for row in rows:
                curves.append(row)
                if math.isfinite(row["total"]):
                    running = row["total"] if running is None else 0.98 * running + 0.02 * row["total"]
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}" if running is not None else "nan", skipped=skipped)
                if callback is not None:
                    callback(row["step"], row)
            rows = []
            if step % config.val_every == 0 or step == config.steps:
                start = time.perf_counter()
                run_validation()
                seconds += time.perf_counter() - start
                bar.set_postfix(loss=f"{running:.3f}" if running is not None else "nan",
                                val=f"{validation[-1]['val_loss']:.3f}", skipped=skipped)
            if step % config.checkpoint_every == 0 or step == stop_at or patience_spent():
                checkpoint()
    bar.close()

    if best is None:  # stopped (max_steps_this_call) before any validation of a trained editor
        best = {"step": step, "val_loss": float("nan"), "metrics": {"step": step}, "state": _cpu_state(editor)}
    final_editor = editor
    best_editor = copy.deepcopy(editor)
    best_editor.load_state_dict(best["state"])
    best_editor.eval()
    summary = {
        "config": config.to_dict(), "config_key": config.key(), "steps": step,
        "optimizer_steps": optimizer_steps, "skipped_steps": skipped, "train_seconds": seconds,
        "validation_seconds": sum(v["seconds"] for v in validation),
        "best_step": best["step"], "best_val_loss": best["val_loss"],
        "best": {k: v for k, v in best["metrics"].items()},
        "initial": validation[0], "final": validation[-1],
        "train_sizes": sizes, "val_sizes": {t: len(v) for t, v in val_records.items()},
        "task_probabilities": task_probabilities(config, sizes),
        "alphas": {_short(n): editor.alpha(n).item() for n in editor.infos},
        "early_stopped": step < config.steps and patience_spent(),
    }
    finished = step >= config.steps or patience_spent()
    if finished and out is not None and (procs is None or procs.is_main):
        best_editor.save(out / "editor-best.pt")
        final_editor.save(out / "editor-final.pt")
        _write_tables(out, curves, validation)
        atomic_write_text(out / "summary.json", json.dumps(jsonable(summary), indent=1))
    if procs is not None:
        procs.wait()  # the main process's files are written when any process returns
    return TrainResult(best_editor, final_editor, curves, validation, summary, finished)


def _check_processes(config: TrainConfig, procs, max_steps_this_call: int | None) -> None:
    """ValueError, saying what to change, where a run cannot split its steps over the processes."""
    if config.statistics == "per_step" and max_steps_this_call is not None and max_steps_this_call % config.grad_accum:
        raise ValueError(f"train: max_steps_this_call ({max_steps_this_call}) must be a multiple of grad_accum "
                         f"({config.grad_accum}) with statistics='per_step': a stop falls between optimiser steps")
    if procs is None:
        return
    if config.statistics != "per_step":
        raise ValueError(f"train: {procs.count} processes need TrainConfig(statistics='per_step'): in one process "
                         "an edit's rows enter MEND's statistics before the next edit, an order processes "
                         "working side by side cannot keep")
    if config.grad_accum % procs.count:
        raise ValueError(f"train: TrainConfig.grad_accum ({config.grad_accum}) must be a multiple of the number "
                         f"of processes ({procs.count}): each takes as many of a step's edits")
    if config.val_every % config.grad_accum:
        raise ValueError(f"train: TrainConfig.val_every ({config.val_every}) must be a multiple of grad_accum "
                         f"({config.grad_accum}) on several processes: they validate after an optimiser step")


def _write_tables(out: Path, curves: list[dict], validation: list[dict]) -> None:
    atomic_write_text(out / "curves.csv", pd.DataFrame(curves).to_csv(index=False))
    atomic_write_text(out / "validation.csv", pd.DataFrame(validation).to_csv(index=False))

