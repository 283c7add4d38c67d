"""The editors of Figure 4b-4d: task scaling and data balance (chapter 6; chapter 8 on SmolLM2).

:func:`scaling_configs` trains InstructEdit on one, two and three tasks; :func:`balance_configs`
trains it on the paper's unbalanced and balanced task mixes, on the same budget of fact edits
(:func:`fact_edits`).  :mod:`~instructedit_lite.experiments` re-exports every name here.
"""

from __future__ import annotations

from typing import Any

from . import tasks as _tasks
from .train import TrainConfig, default_config

__all__ = ["ANALYSIS_STEPS", "BALANCE_STEPS", "scaling_configs", "paper_weights", "balance_configs", "fact_edits",
           "UNBALANCED", "BALANCED"]


#: Edits of chapter 6's scaling and balance editors in its default build: half the book's
#: default, so that the chapter runs in about four minutes on two cores (its ``full`` parameter
#: trains the default).
ANALYSIS_STEPS = 1000


def scaling_configs(seed: int = 0, smoke: bool = False, steps: int | None = None, *, size: str | None = None,
                    model: Any = "embedded") -> dict[int, TrainConfig]:
    """InstructEdit trained on 1, 2, ... tasks, adding them in the tasks' ``scaling_rank`` order
    (the paper's: Recent, + CounterFact, + ConvSent), with the same number of edits each
    (``steps``; default: the book's, so the last one is chapter 4's InstructEdit).  ``model`` and
    ``size``: as in :func:`~instructedit_lite.train.default_config` (on SmolLM2 the last one is
    chapter 7's InstructEdit)."""
    trainable = _tasks.trainable_tasks()
    order = sorted(trainable, key=lambda t: _tasks.get_task(t).scaling_rank)
    n_all = len(order)
    changes = {} if steps is None else {"steps": steps}
    changes.update(seed=seed, smoke=smoke, size=size, model=model)
    return {n: default_config("instruct", tuple(order[:n]), **changes) if n < n_all
            else default_config("instruct", **changes) for n in range(1, n_all + 1)}


def paper_weights(balanced: bool = False) -> dict[str, float]:
    """Task weights in the proportions of the paper's training data: each training task's
    ``paper_train`` (ConvSent 14,390 of 16,415 records, 88%), or with ``balanced`` its
    ``paper_balanced`` (ConvSent 1,427 of 3,452, 41%; the paper's Fig. 4d)."""
    out = {}
    for t in _tasks.trainable_tasks():
        task = _tasks.get_task(t)
        if task.paper_train is None:
            raise ValueError(f"task {t!r} has no paper_train size: give it one in register_task(Task(..., "
                             "paper_train=N)) to train with the paper's task mixes")
        out[t] = float(task.paper_balanced or task.paper_train) if balanced else float(task.paper_train)
    return out


#: Chapter 6's mix with the proportions of the paper's full training data (ConvSent 88%).
UNBALANCED = "unbalanced (paper's data)"
#: Chapter 6's mix with the paper's balanced ConvSent of 1,427 records (41%).
BALANCED = "balanced (ConvSent 1,427)"


def balance_configs(seed: int = 0, smoke: bool = False, steps: int | None = None, *, size: str | None = None,
                    model: Any = "embedded") -> dict[str, TrainConfig]:
    """InstructEdit trained with the paper's unbalanced task mix (ConvSent 88% of the edits) and
    with its balanced one (41%) on the same budget of fact edits.

    The balanced editor makes ``steps`` edits (default: the book's); the unbalanced one makes
    ``steps × 16,415 / 3,452`` (about 4.8 times as many), so both expect the same number of
    CounterFact and Recent edits (:func:`fact_edits`) and differ only in the ConvSent edits on top.
    With equal steps the unbalanced editor would see a fifth of the fact edits, and a hold-out gap
    would measure that rather than the balance.  Records, seed and every other setting are the same
    (:func:`paper_weights`)."""
    changes = {} if steps is None else {"steps": steps}
    common = dict(seed=seed, smoke=smoke, size=size, model=model)
    unbalanced, balanced = paper_weights(), paper_weights(balanced=True)
    kept = default_config("instruct", task_weights=balanced, **common, **changes)
    longer = round(kept.steps * sum(unbalanced.values()) / sum(balanced.values()))
    return {UNBALANCED: default_config("instruct", task_weights=unbalanced, steps=longer, **common),
            BALANCED: kept}


def fact_edits(config: TrainConfig) -> float:
    """The expected number of fact edits (every training task but ConvSent) in ``config``'s stream:
    its steps times the fact tasks' share of its task weights."""
    weights = config.task_weights or {}
    if not weights:
        raise ValueError("fact_edits: the configuration has no task weights (its mix is "
                         f"{config.mixing!r}); give it task_weights")
    facts = sum(w for t, w in weights.items() if _tasks.get_task(t).kind == "fact")
    return config.steps * facts / sum(weights.values())


#: Edits of chapter 6's balanced editor in its default build (the unbalanced one makes about 4.8
#: times as many for the same fact edits: :func:`balance_configs`); its ``full`` parameter trains
#: the book's default.
BALANCE_STEPS = 300
