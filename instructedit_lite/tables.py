"""The per-case table of :mod:`~instructedit_lite.evaluate` made into summaries, result files and
paired bootstrap intervals (chapter 5)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from .atomic import atomic_write_text
from .config import jsonable

__all__ = ["METRICS", "GEN_METRICS", "WILD_METRICS", "VIEWS", "ANSWER_KINDS", "answer_views", "summarize", "average_over_tasks", "nested", "write_results", "timed",
           "case_scores", "paired_difference"]

#: Generation-success columns (greedy decoding, chapter 5).
GEN_METRICS = ("gen_reliability", "gen_generalization", "gen_portability", "gen_locality")
#: WILD columns (free greedy decoding until a stop, exact match; ``wild_contains_*``: the answer
#: contains an acceptable one), the field's current protocol (chapter 5).
WILD_METRICS = ("wild_reliability", "wild_generalization", "wild_portability", "wild_locality",
                "wild_contains_reliability", "wild_contains_generalization", "wild_contains_portability")
#: Metric columns of the per-case table, in display order.
METRICS = ("reliability", "reliability_em", "token_accuracy", "generalization", "generalization_em",
           "generalization_ref", "portability",
           "portability_em", "locality", "drawdown", *GEN_METRICS, *WILD_METRICS, "fluency")


#: The views of what an edited model does, by the column prefix of each (chapters 5 and 8): the
#: paper's teacher-forced scores, generation success (a prefix test) and WILD.
VIEWS = {"teacher-forced": "", "prefix": "gen_", "WILD": "wild_"}
#: The scores every view has.
ANSWER_KINDS = ("reliability", "generalization", "portability", "locality")


def answer_views(table: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Every view of each method side by side, averaged over ``tasks`` (fact tasks: ConvSent's
    answers have no generated view): columns ``(score, view)`` for the :data:`ANSWER_KINDS` and
    :data:`VIEWS`, reliability also by teacher-forced exact match (first) and by WILD's
    contains-match.  ``table``: a summary indexed by method and task (``multitask_table``)."""
    facts = table[table.index.get_level_values("task").isin(list(tasks))]
    by_method = facts.groupby(level="method", sort=False)
    side = pd.concat({(k, view): facts[f"{p}{k}"] for k in ANSWER_KINDS for view, p in VIEWS.items()},
                     axis=1).groupby(level="method", sort=False).mean()
    side[("reliability", "exact match")] = by_method["reliability_em"].mean()
    side[("reliability", "WILD contains")] = by_method["wild_contains_reliability"].mean()
    order = [("reliability", "exact match")] + [
        (k, view) for k in ANSWER_KINDS for view in (*VIEWS, *(["WILD contains"] if k == "reliability" else []))]
    return side[order]


def summarize(cases: pd.DataFrame, by: Sequence[str] = ("method", "task"),
              columns: Iterable[str] | None = None) -> pd.DataFrame:
    """Mean of every metric per group (NaN where a metric does not apply), with the case count;
    ``columns`` default to :data:`METRICS` and ``edit_seconds``."""
    if columns is None:
        columns = METRICS + ("edit_seconds",)
    columns = [c for c in columns if c in cases]
    grouped = cases.groupby(list(by), sort=False)
    out = grouped[columns].mean()
    out.insert(0, "n", grouped.size())
    return out


def average_over_tasks(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-method mean of the per-task means (each task weighs the same, as in the paper)."""
    return summary.drop(columns="n").groupby(level="method", sort=False).mean()


def nested(summary: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """A ``(method, task)`` summary as ``{method: {task: {metric: value}}}`` (NaN → None)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (method, task), row in summary.iterrows():
        out.setdefault(method, {})[task] = jsonable(row.to_dict())
    return out


def write_results(cases: pd.DataFrame, out_dir: str | Path, name: str = "evaluation") -> dict[str, Path]:
    """``<name>-cases.csv`` (one row per case) and ``<name>.json`` (method → task → metric means),
    each written atomically.  Returns the paths."""
    out = Path(out_dir)
    summary = summarize(cases)
    paths = {"cases": out / f"{name}-cases.csv", "summary": out / f"{name}.json"}
    atomic_write_text(paths["cases"], cases.to_csv(index=False))
    atomic_write_text(paths["summary"], json.dumps(nested(summary), indent=1))
    return paths


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def case_scores(cases: pd.DataFrame, method: str, task: str, column: str,
                keys: Sequence[str] = ("case",)) -> pd.Series:
    """``method``'s ``column`` on ``task``, indexed by ``keys`` and the record's rank among those
    with the same keys.  A case id can repeat within a task (a ConvSent topic edited towards each
    sentiment is two records of one file row): the n-th record with an id pairs with the n-th of
    another method, in table order."""
    rows = cases[(cases.method == method) & (cases.task == task)]
    return rows.set_index([*keys, rows.groupby(list(keys)).cumcount()])[column]


def paired_difference(cases: pd.DataFrame, a: str, b: str, metric: str = "reliability",
                      tasks: Sequence[str] | None = None, *, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Method ``a`` minus method ``b`` on ``metric``, averaged over ``tasks`` (each task weighs the
    same), with a 95% paired bootstrap interval: the cases of each task are resampled together for
    both methods, since both edited the same records."""
    tasks = list(tasks) if tasks is not None else sorted(cases.task.unique())
    rng = np.random.default_rng(seed)
    diffs, boots = [], []

    for task in tasks:
        pa, pb = case_scores(cases, a, task, metric), case_scores(cases, b, task, metric)
        if len(pa) == 0 or len(pb) == 0 or set(pa.index) != set(pb.index):
            raise ValueError(f"paired_difference: {a!r} and {b!r} were not evaluated on the same {task} cases")
        d = (pa - pb.loc[pa.index]).to_numpy()
        diffs.append(d.mean())
        boots.append(d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1))
    boot = np.mean(boots, axis=0)
    return {"difference": float(np.mean(diffs)), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975))}
