"""Two methods compared on the same evaluated cases (chapters 5, 6 and 8; :mod:`~instructedit_lite.claims`).

A case table (:func:`~instructedit_lite.experiments.main_evaluation`) has one row per method and
test case.  :func:`paired_cases` lines up two methods' scores case by case and labels each
difference with its task (a stratum) and its cluster (a ConvSent topic's records are one; with a
``seed`` column, every case of a seed is one); :func:`compare` and :func:`equivalent` hand them to
the tests of :mod:`~instructedit_lite.inference`.

ConvSent has three scores that could stand for "reliability" (:data:`~instructedit_lite.paired.CONVSENT_VIEWS`); the
comparisons use the paper's (:data:`~instructedit_lite.paired.PAPER_CONVSENT_VIEW`) unless told otherwise.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from . import tasks as _tasks
from .inference import Assessment, assess_equivalence, assess_gain
from .tables import case_scores

__all__ = ["CONVSENT_VIEWS", "PAPER_CONVSENT_VIEW", "metric_column", "paired_cases", "compare", "equivalent",
           "paper_average"]

#: ConvSent's scores that could stand for "reliability" (the column of the case table for each).
CONVSENT_VIEWS = {"token accuracy": "token_accuracy", "ES": "reliability", "win rate": "reliability_em"}
#: The one the claims use: the reference's test script scores a ConvSent edit like a fact edit, by the
#: teacher-forced token accuracy of a wanted response after the question (chapter 5, "The metrics").
PAPER_CONVSENT_VIEW = "token accuracy"


def metric_column(task: str, metric: str, view: str = PAPER_CONVSENT_VIEW) -> str:
    """The column of ``metric`` on ``task``: ConvSent's "reliability" is the chosen view's."""
    return CONVSENT_VIEWS[view] if metric == "reliability" and _tasks.is_sentiment(task) else metric


def paired_cases(cases: pd.DataFrame, a: str, b: str | None, metric: str = "reliability",
                 tasks: Sequence[str] | None = None, *, view: str = PAPER_CONVSENT_VIEW) -> pd.DataFrame:
    """One row per test case that both methods edited: ``task``, ``cluster`` and ``diff`` (a minus b;
    ``b=None``: a's own scores).

    A case id can repeat within a task (a ConvSent topic edited towards each sentiment is two
    records of one file row): the n-th record with an id pairs with the n-th
    (:func:`~instructedit_lite.tables.case_scores`), and both belong to one cluster.  With a
    ``seed`` column the cluster is the seed (the unit of replication).  Cases where the metric is
    undefined are left out, and so is a task where it is undefined on every case."""
    tasks = list(tasks) if tasks is not None else list(dict.fromkeys(cases.task))
    seeded = "seed" in cases.columns and cases["seed"].nunique() > 1
    keys = ("seed", "case") if seeded else ("case",)
    out = []
    for task in tasks:
        column = metric_column(task, metric, view)
        pa = case_scores(cases, a, task, column, keys).astype(float)
        pb = pa * 0.0 if b is None else case_scores(cases, b, task, column, keys).astype(float)
        if len(pa) == 0 or len(pb) == 0 or set(pa.index) != set(pb.index):
            raise ValueError(f"{a!r} and {b!r} were not evaluated on the same {task} cases")
        d = (pa - pb.loc[pa.index]).dropna()
        if d.empty:
            continue  # the metric is not defined on this task (e.g. no rephrases in its file)
        clusters = [f"seed {i[0]}" if seeded else f"{task}/{i[0]}" for i in d.index]
        out.append(pd.DataFrame({"task": task, "cluster": clusters, "diff": d.to_numpy()}))
    if not out:
        raise ValueError(f"{metric!r} is not defined on any case of {a!r} and {b!r} in {tasks}")
    return pd.concat(out, ignore_index=True)


def compare(cases: pd.DataFrame, a: str, b: str | None, metric: str = "reliability",
            tasks: Sequence[str] | None = None, *, effect: float = 0.0, contrast: Mapping[str, float] | None = None,
            view: str = PAPER_CONVSENT_VIEW, seed: int = 0) -> Assessment:
    """:func:`~instructedit_lite.inference.assess_gain` of ``a`` minus ``b`` on the same cases: each
    task weighs the same (or ``contrast``), ConvSent topics (or seeds) are clusters."""
    p = paired_cases(cases, a, b, metric, tasks, view=view)
    return assess_gain(p["diff"], effect, groups=p["cluster"], strata=p["task"], contrast=contrast, seed=seed)


def equivalent(cases: pd.DataFrame, a: str, b: str, metric: str, tasks: Sequence[str], margin: float, *,
               seed: int = 0) -> Assessment:
    """:func:`~instructedit_lite.inference.assess_equivalence` of ``a`` and ``b`` on the same cases."""
    p = paired_cases(cases, a, b, metric, tasks)
    return assess_equivalence(p["diff"], margin, groups=p["cluster"], strata=p["task"], seed=seed)


def paper_average(cases: pd.DataFrame, tasks: Sequence[str], *, view: str = PAPER_CONVSENT_VIEW) -> pd.Series:
    """Each method's reliability averaged over ``tasks`` (each weighs the same), ConvSent in ``view``."""
    means = {}
    for task in tasks:
        rows = cases[cases.task == task]
        means[task] = rows.groupby("method", sort=False)[metric_column(task, "reliability", view)].mean()
    return pd.DataFrame(means).dropna().mean(axis=1)
