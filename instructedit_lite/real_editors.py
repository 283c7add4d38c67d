"""Every meta-trained editor of the book, on the real model: declared once, trained side by side (chapter 7).

The editors a method needs are declared in the method registry (:mod:`~instructedit_lite.methods`:
InstructEdit, multi-task MEND, one single-task MEND per training task, KE).  :func:`real_editor_configs`
carries each declaration over to SmolLM2 (its regime, tasks and method, with the real model's
settings of :func:`~instructedit_lite.real_model.real_config`), so that a method registered once has
its real-model editor too.  :func:`train_real_editors` trains the ones not yet cached in worker
processes of one thread each, which uses two cores better than one run on two threads does
(measured: ``docs/measurements.md``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from . import train as tr
from .base_model import cache_dir
from .methods import editor_configs
from .parallel import cores, map_in_processes
from .real_model import editor_dir, load_real_model, real_config, train_real_editor
from .tasks import is_sentiment

__all__ = ["real_editor_configs", "train_real_editors"]


def real_editor_configs(seed: int = 0, size: str = "default") -> dict[str, tr.TrainConfig]:
    """Name → SmolLM2 configuration of every editor a registered method needs (in registry order)."""
    return {name: real_config(c.regime, c.tasks, size=size, seed=seed, method=c.method)
            for name, c in editor_configs(seed).items()}


def _cost(config: tr.TrainConfig) -> float:
    """A run's expected cost in fact steps (uniform mixing), for the order and the progress bar:
    a ConvSent step costs about three (chapter 7's table of step costs)."""
    return config.steps * (1 + 2 * sum(map(is_sentiment, config.tasks)) / len(config.tasks))


def _train_in_worker(config_dict: dict[str, Any], folder: str, seed: int, cache: str) -> dict[str, Any]:
    """One worker of :func:`train_real_editors`: load the model and the data, train one editor."""
    os.environ["INSTRUCTEDIT_CACHE"] = cache  # one torch thread: map_in_processes sets it

    real = load_real_model(folder, seed, progress=False)
    return train_real_editor(tr.TrainConfig.from_dict(config_dict), real, progress=False).summary


def train_real_editors(configs: Mapping[str, tr.TrainConfig], real, *, processes: int | None = None,
                       progress: bool = True) -> dict[str, tr.TrainedEditor]:
    """Train (or load from the cache) several real-model editors, ``processes`` at a time.

    Each run goes through :func:`~instructedit_lite.real_model.train_real_editor` (its own engine,
    cache, checkpoints and resume) and depends only on its configuration and seed.  Default
    processes: ``min(cores, editors still to train)``.  Returns name → TrainedEditor.
    """
    todo = {n: c for n, c in configs.items() if not (editor_dir(c, real) / "summary.json").exists()}
    processes = processes or min(cores(), len(todo) or 1)
    if len(todo) > 1 and processes > 1:
        # Longest first, so that no core idles at the end beside the longest run.
        order = sorted(todo.values(), key=_cost, reverse=True)
        jobs = [(c.to_dict(), str(real.source.folder), real.source.seed, str(cache_dir())) for c in order]
        map_in_processes(_train_in_worker, jobs, processes, desc="editors", weights=[_cost(c) for c in order],
                         progress=progress)
    return {name: train_real_editor(c, real, progress=progress) for name, c in configs.items()}
