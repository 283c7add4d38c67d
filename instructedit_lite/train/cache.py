"""Finished editors cached on disk, keyed by base model and configuration, trained side by side (chapter 4)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..atomic import atomic_write_text, building
from ..base_model import cache_dir, from_spec
from ..config import jsonable
from ..mend import MendEditor
from ..parallel import cores, map_in_processes
from . import loop
from .config import TrainConfig
from .examples import records_for

__all__ = ["TrainedEditor", "editor_dir", "load_trained_editor", "train_editor", "train_editors", "learning_problem",
           "LEARNING_MARGIN"]

#: An editor has learned when its kept checkpoint is not the untrained one (step 0) and its mean
#: validation reliability is at least this far above the untrained editor's (whose step size of
#: 1e-4 on an identity network leaves the model almost unedited).
LEARNING_MARGIN = 0.05

@dataclass
class TrainedEditor:
    """A trained editor (the best by validation loss), its curves and summary."""

    editor: MendEditor
    config: TrainConfig
    curves: Any  # pandas.DataFrame, one row per edit
    validation: Any  # pandas.DataFrame, one row per validation
    summary: dict[str, Any]
    path: Path | None = None
    loaded: bool = False  # True when it came from the cache


def editor_dir(config: TrainConfig, base) -> Path:
    """``cache_dir()/editor-<base key>-<config key>``."""
    return cache_dir() / f"editor-{base.key}-{config.key()}"


def load_trained_editor(path: str | os.PathLike, model) -> TrainedEditor:
    """A finished run's folder (``summary.json``, ``editor-best.pt``, tables) as a TrainedEditor."""
    path = Path(path)
    summary = json.loads((path / "summary.json").read_text())
    config = TrainConfig.from_dict(summary["config"])
    editor = loop.load_editor(path / "editor-best.pt", model, config.method).eval()
    return TrainedEditor(editor, config, pd.read_csv(path / "curves.csv"),
                         pd.read_csv(path / "validation.csv"), summary, path, loaded=True)


def train_editor(config: TrainConfig, base, *, cache: bool = True, progress: bool = True) -> TrainedEditor:
    """Train an editor for ``base`` (a :class:`~instructedit_lite.base_model.BaseModel`), or load it.

    With ``cache`` the run lives in :func:`editor_dir`: a finished run (``summary.json`` present)
    is loaded instead of trained, an interrupted one resumes from its checkpoint.  Without, it
    trains from scratch in a temporary folder.
    """
    train_records, val_records = records_for(config, base.source)
    if cache:
        folder = editor_dir(config, base)
        with building(folder):  # another process training the same editor: wait, then load it
            if (folder / "summary.json").exists():
                return load_trained_editor(folder, base.model)
            atomic_write_text(folder / "config.json", json.dumps(config.to_dict(), indent=1))
            result = loop.train(config, base.model, base.tokenizer, train_records=train_records,
                                val_records=val_records, out_dir=folder, progress=progress)
        return TrainedEditor(result.editor, config, pd.DataFrame(result.curves), pd.DataFrame(result.validation),
                             jsonable(result.summary), folder)
    with tempfile.TemporaryDirectory(prefix="instructedit-train-") as tmp:
        result = loop.train(config, base.model, base.tokenizer, train_records=train_records, val_records=val_records,
                       out_dir=tmp, progress=progress)
    return TrainedEditor(result.editor, config, pd.DataFrame(result.curves), pd.DataFrame(result.validation),
                         jsonable(result.summary), None)


def _train_in_worker(config_dict: dict[str, Any], spec: tuple, cache: str) -> str:
    """Body of one worker process of :func:`train_editors`: rebuild the base model from its
    picklable ``spec`` and train (or load) one cached editor."""
    os.environ["INSTRUCTEDIT_CACHE"] = cache  # one torch thread: map_in_processes sets it

    base = from_spec(spec)
    trained = train_editor(TrainConfig.from_dict(config_dict), base, progress=False)
    return str(trained.path)


def train_editors(configs: Mapping[str, TrainConfig], base, *, processes: int | None = None,
                  progress: bool = True) -> dict[str, TrainedEditor]:
    """Train (or load from the cache) several editors, ``processes`` of them at a time.

    Each run is single-threaded (the embedded model's matrices are too small to gain from more
    threads), so on a machine with ``n`` cores ``n`` runs go side by side in separate processes
    (default: ``min(cores, runs still to train)``, cores from ``INSTRUCTEDIT_WORKERS`` when set).
    Every run goes through :func:`train_editor`, with its cache, checkpoints and resume, so the
    result is the same as training them one by one: each editor depends only on its own
    configuration and seed.  Returns name → TrainedEditor.
    """
    todo = {name: c for name, c in configs.items() if not (editor_dir(c, base) / "summary.json").exists()}
    processes = processes or min(cores(), len(todo) or 1)
    # A model built in memory (no spec) cannot be rebuilt in another process: train it here.
    if len(todo) > 1 and processes > 1 and getattr(base, "spec", None) is not None:
        map_in_processes(_train_in_worker, [(c.to_dict(), base.spec, str(cache_dir())) for c in todo.values()],
                         processes, desc="editors", progress=progress)  # a worker's error is raised here
    return {name: train_editor(c, base, progress=progress) for name, c in configs.items()}


def learning_problem(trained: TrainedEditor, margin: float = LEARNING_MARGIN) -> str | None:
    """None when the editor learned; otherwise why not, naming the editor, its seed and its
    validation curve: its kept checkpoint is step 0 (the untrained editor), or its validation
    reliability is less than ``margin`` above the untrained editor's.  A claim is never decided on
    such an editor (:func:`~instructedit_lite.claims.experiment_claims`)."""
    s, c = trained.summary, trained.config
    start, best = s["initial"]["val_reliability"], s["best"]["val_reliability"]
    curve = ", ".join(f"{int(v['step'])}: {v['val_reliability']:.3f}"
                      for _, v in trained.validation.iterrows()) if "step" in trained.validation else ""
    who = f"the {c.regime} editor on {', '.join(c.tasks)} (seed {c.seed}, {s['steps']} edits)"
    if s["best_step"] == 0:
        why = "kept its untrained checkpoint (step 0): its validation loss never fell below the untrained editor's"
    elif best < start + margin:
        why = (f"reached a validation reliability of {best:.3f}, less than {margin:g} above the untrained "
               f"editor's {start:.3f}")
    else:
        return None
    return f"{who} did not learn: it {why}" + (f" (validation reliability by step: {curve})" if curve else "")
