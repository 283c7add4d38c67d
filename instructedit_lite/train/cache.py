"""Finished editors cached on disk, keyed by base model and configuration, trained side by side (chapter 4)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..atomic import atomic_write_text, building
from ..config import jsonable
from ..editors.mend import MendEditor
from ..engine import PrefixEngine
from ..models import from_spec
from ..parallel import cores, map_in_processes
from ..paths import cache_dir
from ..tasks import is_sentiment
from . import loop
from .config import TrainConfig
from .examples import records_for
from .prefix import training_rows

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


def train_editor(config: TrainConfig, base, *, cache: bool = True, progress: bool = True,
                 engine: PrefixEngine | None = None, use_engine: bool | None = None) -> TrainedEditor:
    """Train an editor for ``base`` (a :class:`~instructedit_lite.base_model.BaseModel`) on its
    records (``base.world``), or load it.

    With ``cache`` the run lives in :func:`editor_dir`: a finished run (``summary.json`` present)
    is loaded instead of trained, an interrupted one resumes from its checkpoint, and a second
    process asking for the same editor waits for the first.  Without, it trains from scratch in a
    temporary folder.  A real-scale model trains through the frozen-prefix engine
    (``use_engine``, default: ``base.scale == "real"``; ``engine``: one to reuse, its cached
    prefixes included); the one-off prefix computation is timed apart (``summary["prefix_seconds"]``,
    ``"prefix_rows"``, ``"prefix_bytes"``).
    """
    folder = editor_dir(config, base)
    with contextlib.ExitStack() as stack:
        if cache:
            stack.enter_context(building(folder))  # another process training the same editor: wait, then load it
            if (folder / "summary.json").exists():
                return load_trained_editor(folder, base.model)
        out = folder if cache else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="instructedit-train-")))
        train_records, val_records = records_for(config, base.world)
        instructions = base.instructions() if config.instructed else None
        model, extra = base.model, {}
        if base.scale == "real" if use_engine is None else use_engine:
            engine = engine if engine is not None else PrefixEngine(base.model, config.mend.weight_names, key=base.key)
            rows = training_rows(config, base.tokenizer, train_records, val_records, instructions)
            start = time.perf_counter()
            new = engine.precompute(rows, progress=progress)
            extra = {"prefix_seconds": time.perf_counter() - start, "prefix_rows": new, "engine": True,
                     "prefix_bytes": engine.cache.nbytes, "prefix_bytes_per_token": engine.cache.bytes_per_token()}
            model = engine
        if cache:
            atomic_write_text(folder / "config.json", json.dumps(config.to_dict(), indent=1))
        result = loop.train(config, model, base.tokenizer, train_records=train_records, val_records=val_records,
                            out_dir=out, instructions=instructions, progress=progress)
        summary = jsonable({**result.summary, **extra})
        if extra and result.finished:
            atomic_write_text(Path(out) / "summary.json", json.dumps(summary, indent=1))
    return TrainedEditor(result.editor, config, pd.DataFrame(result.curves), pd.DataFrame(result.validation),
                         summary, folder if cache else None)


def _cost(config: TrainConfig) -> float:
    """A run's expected cost in fact steps (uniform mixing), for the order and the progress bar:
    a ConvSent step costs about three (chapter 7's table of step costs)."""
    return config.steps * (1 + 2 * sum(map(is_sentiment, config.tasks)) / len(config.tasks))


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

    Each run is single-threaded, so on a machine with ``n`` cores ``n`` runs go side by side in
    separate processes (default: ``min(cores, runs still to train)``, cores from
    ``INSTRUCTEDIT_WORKERS`` when set), the longest first, so that no core idles at the end beside
    the longest run; on two cores this uses them better than one run on two threads does
    (measured: docs/measurements.md).  Every run goes through :func:`train_editor`, with its cache,
    checkpoints and resume, so the result is the same as training them one by one: each editor
    depends only on its own configuration and seed.  Returns name → TrainedEditor.
    """
    todo = {name: c for name, c in configs.items() if not (editor_dir(c, base) / "summary.json").exists()}
    processes = processes or min(cores(), len(todo) or 1)
    # A model built in memory (no spec) cannot be rebuilt in another process: train it here.
    if len(todo) > 1 and processes > 1 and getattr(base, "spec", None) is not None:
        order = sorted(todo.values(), key=_cost, reverse=True)
        map_in_processes(_train_in_worker, [(c.to_dict(), base.spec, str(cache_dir())) for c in order],
                         processes, desc="editors", weights=[_cost(c) for c in order],
                         progress=progress)  # a worker's error is raised here
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
