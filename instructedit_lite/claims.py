"""The paper's claims as rules: each verdict computed from measured quantities (chapters 5, 6 and 8).

A verdict is never typed: a chapter measures, calls the rule, and glues what it returns.  The
embedded world (chapters 5 and 6) and the real model (chapter 8) go through the same rules, so the
two columns of the claims table (``book/reproducibility.md``) are comparable.  The thresholds are
the book's, stated in each rule; the paper gives none.

:func:`experiment_claims` computes experiments 1-3 from one table of evaluated cases
(:func:`~instructedit_lite.experiments.main_evaluation`), which is what ``reproduce`` reports.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from .tables import paired_difference

__all__ = ["multitask_verdict", "holdout_verdict", "unseen_verdict", "directions_verdict", "scaling_verdict",
           "balance_verdict", "experiment_claims", "MEANINGS", "SHARP_DROP", "COMPARABLE", "CLEAR_GAIN"]

#: Experiment 1: a gain "reproduces" when the low end of its 95% interval is at least this.
CLEAR_GAIN = 0.10
#: Experiment 2: a drop of ZsRE reliability below the training tasks' larger than this is "sharp".
SHARP_DROP = 0.10
#: Experiment 3: the largest change with the unseen instruction that still counts as "comparable".
COMPARABLE = 0.05

#: What each verdict means, by claim, in words the chapters glue.
MEANINGS = {
    "multitask": {
        "reproduces": "the gain is clearly positive, at least 10 points at the low end of its interval",
        "direction only": "the gain is positive beyond the noise, but the low end of its interval is under 10 points",
        "does not reproduce": "the interval of the gain includes zero or lies below it"},
    "unseen": {
        "reproduces": "no change exceeds 5 points: the editor reads the task name and the description's content, "
                      "not its exact wording",
        "does not reproduce": 'at least one change exceeds our 5-point threshold for "comparable"'},
}


def multitask_verdict(vs_mend: Mapping[str, float]) -> str:
    """Experiment 1 (Table 3): InstructEdit minus multi-task MEND, average reliability, with its
    paired interval: "reproduces" when ``low >= CLEAR_GAIN``, "direction only" when ``low > 0``."""
    if vs_mend["low"] >= CLEAR_GAIN:
        return "reproduces"
    return "direction only" if vs_mend["low"] > 0 else "does not reproduce"


def holdout_verdict(vs_mend_zsre: Mapping[str, float], worst_drop: float) -> tuple[str, bool]:
    """Experiment 2: (verdict, sharp drop).  ``worst_drop``: the lowest of KE's and multi-task MEND's
    "ZsRE reliability minus their mean on the fact training tasks"; a drop is sharp below
    ``-SHARP_DROP``.  "reproduces" when the drop is sharp and InstructEdit beats multi-task MEND on
    ZsRE beyond the noise; "partly" when one of the two holds."""
    sharp = worst_drop < -SHARP_DROP
    ahead = vs_mend_zsre["low"] > 0
    return ("reproduces" if sharp and ahead else "partly" if sharp or ahead else "does not reproduce"), sharp


def unseen_verdict(max_abs_delta: float) -> str:
    """Experiment 3: "reproduces" when no metric of any task moves more than ``COMPARABLE`` with the
    held-out instruction."""
    return "reproduces" if max_abs_delta <= COMPARABLE else "does not reproduce"


def directions_verdict(sil_instruct: pd.Series, sil_multi: pd.Series, knn_instruct_lower: pd.Series,
                       knn_multi_lower: pd.Series) -> str:
    """Fig. 4a, per edited matrix: "reproduces" when InstructEdit's best silhouette exceeds 0.5 and
    it beats multi-task MEND's by more than 0.1 on every matrix; "partly" when, below the top block,
    its worst kNN task agreement beats multi-task MEND's best."""
    gain = sil_instruct - sil_multi.loc[sil_instruct.index]
    if sil_instruct.max() > 0.5 and (gain > 0.1).all():
        return "reproduces"
    return "partly" if knn_instruct_lower.min() > knn_multi_lower.max() else "does not reproduce"


def scaling_verdict(reliability: pd.Series, overlap: pd.Series, three_vs_one: Mapping[str, float]) -> tuple[str, bool, bool]:
    """Fig. 4b/4c, over the number of training tasks (index 1, 2, 3): (verdict, reliability part,
    overlap part).  Reliability part: hold-out reliability rises steadily and all tasks beat one
    beyond the noise; overlap part: the overlap falls steadily, by more than 0.05."""
    monotone = bool(reliability.is_monotonic_increasing)
    reliability_ok = monotone and three_vs_one["low"] > 0
    overlap_ok = bool(overlap.is_monotonic_decreasing and overlap.iloc[0] - overlap.iloc[-1] > 0.05)
    verdict = ("reproduces" if reliability_ok and overlap_ok else "partly" if reliability_ok or overlap_ok
               else "direction only" if monotone else "does not reproduce")
    return verdict, reliability_ok, overlap_ok


def balance_verdict(regularity_balanced: float, regularity_unbalanced: float,
                    balanced_vs_unbalanced: Mapping[str, float]) -> tuple[str, bool, bool]:
    """Fig. 4d: (verdict, regularity part, hold-out part).  "reproduces" when the balanced mix gives
    more regular edit directions *and* a better hold-out reliability beyond the noise; "partly"
    when one of the two holds."""
    regular_ok = bool(regularity_balanced > regularity_unbalanced)
    holdout_ok = bool(balanced_vs_unbalanced["low"] > 0)
    verdict = ("reproduces" if regular_ok and holdout_ok else "partly" if regular_ok or holdout_ok
               else "does not reproduce")
    return verdict, regular_ok, holdout_ok


def experiment_claims(cases: pd.DataFrame, *, seed: int = 0, fact_tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """Experiments 1-3 from one evaluation: the measured quantities, their paired intervals and the
    verdicts of the rules above (what chapter 8 and ``reproduce`` state)."""
    from . import tasks as _tasks
    from .experiments import SINGLE, UNSEEN, holdout_table, multitask_table, unseen_table

    trainable = list(_tasks.trainable_tasks())
    if fact_tasks is None:
        fact_tasks = [t for t in trainable if not _tasks.is_sentiment(t)]
    held = _tasks.held_out_tasks()[0]
    table3 = multitask_table(cases)
    rel = table3.xs("average", level="task")["reliability"]
    vs_mend = paired_difference(cases, "InstructEdit", "MEND (multi-task)", "reliability", trainable, seed=seed)
    baselines = [m for m in rel.index if m not in ("InstructEdit", "base model", SINGLE)]
    best_other = max(baselines, key=lambda m: rel[m])
    vs_best = paired_difference(cases, "InstructEdit", best_other, "reliability", trainable, seed=seed)

    holdout = holdout_table(cases)
    fact_rel = table3["reliability"].unstack("task")[list(fact_tasks)].mean(axis=1)
    drop = holdout["reliability"] - fact_rel.reindex(holdout.index)
    vs_mend_zsre = paired_difference(cases, "InstructEdit", "MEND (multi-task)", "reliability", [held], seed=seed)
    worst_drop = float(drop.loc[["KE", "MEND (multi-task)"]].min())
    verdict_holdout, sharp = holdout_verdict(vs_mend_zsre, worst_drop)

    unseen = unseen_table(cases)
    metrics3 = ["reliability", "generalization", "locality"]
    delta = unseen.xs(UNSEEN, level="method")[metrics3] - unseen.xs("InstructEdit", level="method")[metrics3]
    max_abs_delta = float(delta.abs().max().max())
    worst = delta.abs().stack().idxmax()
    worst_ci = paired_difference(cases, UNSEEN, "InstructEdit", worst[1], [worst[0]], seed=seed)
    return {
        "multitask": {"instructedit": float(rel["InstructEdit"]), "multitask_mend": float(rel["MEND (multi-task)"]),
                      "vs_mend": vs_mend, "best_other": best_other, "vs_best_other": vs_best,
                      "verdict": multitask_verdict(vs_mend)},
        "holdout": {"task": held, "reliability": {m: float(v) for m, v in holdout["reliability"].items()},
                    "drop_vs_training": {m: float(v) for m, v in drop.items()}, "worst_drop": worst_drop,
                    "sharp_drop": sharp, "vs_mend": vs_mend_zsre, "verdict": verdict_holdout},
        "unseen": {"max_abs_delta": max_abs_delta, "worst": f"{worst[1]} on {worst[0]}", "worst_ci": worst_ci,
                   "verdict": unseen_verdict(max_abs_delta)},
    }
