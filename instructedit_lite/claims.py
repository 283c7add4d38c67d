"""The paper's claims, declared once, and the rules that decide them (chapters 5, 6 and 8).

:data:`CLAIMS` is the one declaration: what the paper says and where, the quantity measured, its
metric, the kind of test and the paper's effect (or the book's margin) with how it was read.
Chapters 5, 6 and 8, ``reproduce`` and the reproducibility page derive their rules, tables and
sentences from it; nothing else states a threshold.

Experiments 1-3 are tests on paired differences (:mod:`~instructedit_lite.inference`):
:func:`~instructedit_lite.inference.assess_gain` asks whether a gain is there and of the paper's size,
:func:`~instructedit_lite.inference.assess_equivalence`
whether two settings are equivalent within a margin; each answers "reproduces", "direction only"
(gains only), "contradicted" or "inconclusive", with the interval, the number of cases and the
minimum detectable effect.  Figure 4's analyses have no per-case scores; their rules
(:func:`directions_verdict`, :func:`scaling_verdict`, :func:`balance_verdict`) combine
descriptive measures with the interval of a paired reliability difference.

:func:`experiment_claims` computes experiments 1-3 from one table of evaluated cases
(:func:`~instructedit_lite.experiments.main_evaluation`), which is what the chapters and
``reproduce`` report.  Where the table holds several training seeds (a ``seed`` column), the seed
is the cluster: intervals are over seeds and cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd

from . import methods as _methods
from . import tasks as _tasks
from .inference import (Assessment, Interval, assess_equivalence, assess_gain, half_sample_interval, holm,  # noqa: F401
                        tost_pvalue)
from .methods import SINGLE, UNSEEN
from .paired import CONVSENT_VIEWS, PAPER_CONVSENT_VIEW, compare, equivalent, paired_cases, paper_average  # noqa: F401

# The statistics (instructedit_lite.inference) and the paired comparisons (instructedit_lite.paired)
# are importable from here too: the chapters call claims.compare, claims.assess_gain and so on.
__all__ = ["Claim", "CLAIMS", "claim", "experiment_claims", "claim_rows", "claim_phrases", "claim_phrase_names",
           "view_rows", "claims_json", "CLAIM_METHODS", "NOT_DECIDED", "multitask_verdict", "holdout_verdict",
           "unseen_verdict", "directions_verdict", "scaling_verdict", "balance_verdict", "SILHOUETTE_CLEAR",
           "SILHOUETTE_GAIN", "OVERLAP_FALL"]

@dataclass(frozen=True)
class Claim:
    """One claim of the paper and how the book tests it."""

    key: str       # the name the chapters and results use
    label: str     # short, for tables
    paper: str     # the paper's words, paraphrased
    where: str     # where the paper says it
    measured: str  # the quantity the book measures
    metric: str    # its primary metric
    test: str      # "gain", "equivalence" or "rule"
    target: float | None  # the effect (gain) or the margin (equivalence), metric units
    reading: str   # how the target was read from the paper, and what another reading would change


#: Fig. 4a: a silhouette above this is a separation "with clear margins"; each matrix must gain more
#: than SILHOUETTE_GAIN over the editor without instructions.
SILHOUETTE_CLEAR, SILHOUETTE_GAIN = 0.5, 0.1
#: Fig. 4c: the overlap must fall by more than this from one to three training tasks.
OVERLAP_FALL = 0.05

#: Every claim of the paper the book tests, declared once (chapters 5, 6 and 8 decide them).
CLAIMS: tuple[Claim, ...] = (
    Claim("multitask", "1: multi-task editing (Table 3)",
          "In the multi-task setting InstructEdit raises the average reliability over the same editor "
          "trained without instructions, by 14.86%.", "abstract; Table 3",
          "InstructEdit minus multi-task MEND, reliability averaged over the three training tasks (each "
          "task weighs the same), paired on the same test cases",
          "reliability; ConvSent: token accuracy of a wanted response", "gain", 0.1486,
          "14.86% read as percentage points of average reliability (the paper's tables report rates in "
          "percent). Read relative to multi-task MEND's reliability r, it would be 0.1486 r (about 7 "
          "points at r = 0.5): a smaller effect, easier to reach and harder to rule out."),
    Claim("holdout", "2: hold-out ZsRE",
          "On a task no editor was trained on (ZsRE), previous editors drop sharply; InstructEdit holds up.",
          "section 4, hold-out editing",
          "how much more multi-task MEND loses than InstructEdit from the two fact training tasks to "
          "ZsRE: (InstructEdit minus MEND) on ZsRE minus the same on CounterFact and Recent, paired on "
          "the same test cases",
          "reliability", "gain", 0.10,
          "The paper gives no size for 'sharply'; the book reads it as 10 points of reliability lost "
          "beyond InstructEdit's own drop. A larger reading makes 'reproduces' harder to reach."),
    Claim("unseen", "3: unseen instructions",
          "With instructions it has never seen, InstructEdit's results are comparable to those with the "
          "instructions it was trained with.", "section 4, unseen instructions",
          "InstructEdit with the held-out tenth description minus with a seen one, reliability averaged "
          "over the four tasks (primary); generalization, locality and each task's reliability as "
          "secondary rows, corrected for multiplicity (Holm)",
          "reliability; ConvSent: token accuracy of a wanted response", "equivalence", 0.05,
          "'Comparable' has no number in the paper; the book's margin is 5 points either way. A wider "
          "margin is easier to show and says less."),
    Claim("directions", "Fig. 4a: edit directions",
          "With instructions the edit directions of the tasks separate with clear margins; without, "
          "they overlap.", "Fig. 4a",
          "silhouette of the task labels and nearest-neighbour task agreement of the editor's "
          "transformed gradients, per edited matrix", "silhouette, kNN agreement", "rule", None,
          f"'Clear margins' read as a silhouette above {SILHOUETTE_CLEAR} on some matrix, with a gain of more "
          f"than {SILHOUETTE_GAIN} over multi-task MEND on every matrix."),
    Claim("scaling", "Fig. 4b/4c: task scaling",
          "More training tasks give a better editor on the held-out task and less overlap of the edit "
          "regions.", "Fig. 4b, 4c",
          "ZsRE reliability and the overlap of ZsRE's edit region, with 1, 2 and 3 training tasks",
          "reliability, overlap", "rule", None,
          "Reliability must rise at each step and 3 tasks beat 1 beyond the noise; the overlap must fall "
          f"at each step and by more than {OVERLAP_FALL}."),
    Claim("balance", "Fig. 4d: data balance",
          "Balancing the dominant ConvSent data makes the edit directions more regular and the editor "
          "better on the held-out task.", "Fig. 4d",
          "mean within-task cosine of the edit directions and ZsRE reliability, balanced against "
          "unbalanced mix", "regularity, reliability", "rule", None,
          "More regular (a higher mean cosine) and better on ZsRE beyond the noise."),
)



def claim(key: str) -> Claim:
    """The declaration of one claim."""
    for c in CLAIMS:
        if c.key == key:
            return c
    raise KeyError(f"no claim {key!r}; declared: {[c.key for c in CLAIMS]}")


def multitask_verdict(vs_mend: Assessment) -> str:
    """Experiment 1: the outcome of the gain test of InstructEdit over multi-task MEND."""
    return vs_mend.outcome


def holdout_verdict(drop_contrast: Assessment) -> str:
    """Experiment 2: the outcome of the gain test of how much more MEND drops than InstructEdit."""
    return drop_contrast.outcome


def unseen_verdict(primary: Assessment) -> str:
    """Experiment 3: the outcome of the primary equivalence test (reliability, tasks combined)."""
    return primary.outcome


def directions_verdict(sil_instruct: pd.Series, sil_multi: pd.Series, knn_instruct_lower: pd.Series,
                       knn_multi_lower: pd.Series, *, best_silhouette_low: float | None = None,
                       min_gain_low: float | None = None) -> str:
    """Fig. 4a, per edited matrix: "reproduces" when InstructEdit's best silhouette exceeds
    :data:`~instructedit_lite.claims.SILHOUETTE_CLEAR` and it beats multi-task MEND's by more than
    :data:`~instructedit_lite.claims.SILHOUETTE_GAIN`
    on every matrix, each judged by the low end of its interval where one is given
    (``best_silhouette_low``; ``min_gain_low``, the lowest of the matrices' gains' low ends);
    "partly" when, below the top block, its worst kNN task agreement beats multi-task MEND's best."""
    gain = sil_instruct - sil_multi.loc[sil_instruct.index]
    best = sil_instruct.max() if best_silhouette_low is None else best_silhouette_low
    worst_gain = gain.min() if min_gain_low is None else min_gain_low
    if best > SILHOUETTE_CLEAR and worst_gain > SILHOUETTE_GAIN:
        return "reproduces"
    return "partly" if knn_instruct_lower.min() > knn_multi_lower.max() else "does not reproduce"


def scaling_verdict(reliability: pd.Series, overlap: pd.Series, three_vs_one: Mapping[str, float], *,
                    overlap_fall: Mapping[str, float] | None = None) -> tuple[str, bool, bool]:
    """Fig. 4b/4c, over the number of training tasks (index 1, 2, 3): (verdict, reliability part,
    overlap part).  Reliability part: hold-out reliability rises steadily and all tasks beat one
    beyond the noise (the low end of the 95% interval above 0); overlap part: the overlap falls
    steadily, by more than :data:`~instructedit_lite.claims.OVERLAP_FALL` (the low end of ``overlap_fall``'s
    interval, the
    overlap with one task minus with all, where given)."""
    monotone = bool(reliability.is_monotonic_increasing)
    reliability_ok = monotone and three_vs_one["low"] > 0
    fall = overlap.iloc[0] - overlap.iloc[-1] if overlap_fall is None else overlap_fall["low"]
    overlap_ok = bool(overlap.is_monotonic_decreasing and fall > OVERLAP_FALL)
    verdict = ("reproduces" if reliability_ok and overlap_ok else "partly" if reliability_ok or overlap_ok
               else "direction only" if monotone else "does not reproduce")
    return verdict, reliability_ok, overlap_ok


def balance_verdict(regularity_balanced: float, regularity_unbalanced: float,
                    balanced_vs_unbalanced: Mapping[str, float], *,
                    regularity_gain: Mapping[str, float] | None = None) -> tuple[str, bool, bool]:
    """Fig. 4d: (verdict, regularity part, hold-out part).  "reproduces" when the balanced mix gives
    more regular edit directions (the low end of ``regularity_gain``'s interval above 0, where
    given) *and* a better hold-out reliability beyond the noise; "partly" when one of the two holds."""
    gain = regularity_balanced - regularity_unbalanced if regularity_gain is None else regularity_gain["low"]
    regular_ok = bool(gain > 0)
    holdout_ok = bool(balanced_vs_unbalanced["low"] > 0)
    verdict = ("reproduces" if regular_ok and holdout_ok else "partly" if regular_ok or holdout_ok
               else "does not reproduce")
    return verdict, regular_ok, holdout_ok


def _unseen_secondary(cases: pd.DataFrame, tasks: Sequence[str], margin: float, seed: int) -> pd.DataFrame:
    """Experiment 3's secondary rows, each an equivalence test, Holm-corrected together."""
    rows = []
    for metric in ("generalization", "locality"):
        have = [t for t in tasks if cases.loc[cases.task == t, metric].notna().any()]
        if not have:
            continue
        name = f"{metric}, {len(have)} task{'' if len(have) == 1 else 's'}"
        rows.append((name, equivalent(cases, UNSEEN, "InstructEdit", metric, have, margin, seed=seed)))
    for task in tasks:
        rows.append((f"reliability, {task}",
                     equivalent(cases, UNSEEN, "InstructEdit", "reliability", [task], margin, seed=seed)))
    pvalues = [tost_pvalue(a) for _, a in rows]
    reject, adjusted = holm(pvalues)
    table = pd.DataFrame([{"quantity": name, "difference": a.estimate, "low (90%)": a.low, "high (90%)": a.high,
                           "n": a.n, "p (TOST)": p, "p (Holm)": q,
                           "outcome": "reproduces" if r else ("contradicted" if a.outcome == "contradicted"
                                                              else "inconclusive")}
                          for (name, a), p, q, r in zip(rows, pvalues, adjusted, reject)])
    return table.set_index("quantity")


#: The methods each tested claim compares: a claim is not decided when one of them did not learn.
CLAIM_METHODS = {"multitask": ("InstructEdit", "MEND (multi-task)"), "holdout": ("InstructEdit", "MEND (multi-task)"),
                 "unseen": ("InstructEdit",)}
#: The verdict of a claim that compares a method whose editor did not learn.
NOT_DECIDED = "not decided"


def experiment_claims(cases: pd.DataFrame, *, seed: int = 0, fact_tasks: Sequence[str] | None = None,
                      not_learned: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Experiments 1-3 from one evaluation: the measured quantities, their tests and outcomes
    (what chapters 5 and 8 and ``reproduce`` state).  Each claim's ``"verdict"`` is its test's
    outcome; ``"test"`` is the :class:`~instructedit_lite.inference.Assessment` it rests on.  ``not_learned``:
    method → why its
    editor did not learn (:func:`~instructedit_lite.experiments.methods_not_learned`); a claim that
    compares such a method is "not decided", with the reason in ``"why"``, and its test is still
    shown."""
    trainable = list(_tasks.trainable_tasks())
    if fact_tasks is None:
        fact_tasks = [t for t in trainable if not _tasks.is_sentiment(t)]
    held = _tasks.held_out_tasks()[0]

    c1 = claim("multitask")
    vs_mend = compare(cases, "InstructEdit", "MEND (multi-task)", "reliability", trainable, effect=c1.target, seed=seed)
    views = {v: compare(cases, "InstructEdit", "MEND (multi-task)", "reliability", trainable, effect=c1.target,
                        view=v, seed=seed) for v in CONVSENT_VIEWS}
    compared = [m for m in _methods.table_methods("multitask") if m in set(cases.method)]
    rel = paper_average(cases[cases.method.isin(compared)], trainable)
    baselines = [m for m in rel.index if m not in ("InstructEdit", "base model", SINGLE)]
    best_other = max(baselines, key=lambda m: rel[m])
    vs_best = compare(cases, "InstructEdit", best_other, "reliability", trainable, effect=c1.target, seed=seed)

    c2 = claim("holdout")
    contrast = {held: 1.0, **{t: -1.0 / len(fact_tasks) for t in fact_tasks}}
    drop_contrast = compare(cases, "InstructEdit", "MEND (multi-task)", "reliability", [held, *fact_tasks],
                            effect=c2.target, contrast=contrast, seed=seed)
    vs_mend_zsre = compare(cases, "InstructEdit", "MEND (multi-task)", "reliability", [held], seed=seed)
    drops = {}
    for m in ("KE", "MEND (multi-task)", "InstructEdit"):
        if m in set(cases.method):  # a method's own drop: its ZsRE mean minus its fact tasks' mean
            drops[m] = compare(cases, m, None, "reliability", [held, *fact_tasks], contrast=contrast, seed=seed)
    holdout_rel = {m: float(cases[(cases.method == m) & (cases.task == held)]["reliability"].mean())
                   for m in _methods.compared_methods() if m in set(cases.method)}
    fact_rel = paper_average(cases, fact_tasks)
    drop_vs_training = {m: v - float(fact_rel[m]) for m, v in holdout_rel.items() if m in fact_rel.index}

    c3 = claim("unseen")
    all_tasks = [t for t in _tasks.task_names() if t in set(cases[cases.method == UNSEEN].task)]
    primary = equivalent(cases, UNSEEN, "InstructEdit", "reliability", all_tasks, c3.target, seed=seed)
    secondary = _unseen_secondary(cases, all_tasks, c3.target, seed)
    results = {
        "multitask": {"instructedit": float(rel["InstructEdit"]), "multitask_mend": float(rel["MEND (multi-task)"]),
                      "vs_mend": vs_mend, "views": views, "best_other": best_other, "vs_best_other": vs_best,
                      "test": vs_mend, "verdict": multitask_verdict(vs_mend)},
        "holdout": {"task": held, "reliability": holdout_rel, "drop_vs_training": drop_vs_training,
                    "drops": drops, "vs_mend": vs_mend_zsre, "drop_contrast": drop_contrast,
                    "test": drop_contrast, "verdict": holdout_verdict(drop_contrast)},
        "unseen": {"primary": primary, "secondary": secondary, "test": primary, "verdict": unseen_verdict(primary),
                   "max_abs_delta": float(secondary["difference"].abs().max())},
    }
    for key, methods in CLAIM_METHODS.items():
        reasons = [f"{m}: {(not_learned or {})[m]}" for m in methods if m in (not_learned or {})]
        results[key]["why"] = "; ".join(reasons)
        if reasons:
            results[key]["verdict"] = NOT_DECIDED
    return results


def _needed_phrase(a: Assessment, tasks: int) -> str:
    """How many test cases per task would decide an inconclusive test (from its mde)."""
    if a.outcome != "inconclusive":
        return ""
    needed = a.cases_needed()
    if needed is None:
        return "its spread could not be estimated from so few cases"
    what = "the paper's effect" if a.kind == "gain" else "the margin"
    return (f"about {math.ceil(needed / tasks):,} test cases per task (now {math.ceil(a.n / tasks):,}) would bring "
            f"the minimum detectable effect down to {what}")


def claim_rows(results: Mapping[str, Any]) -> pd.DataFrame:
    """One row per tested claim (experiments 1-3): the paper's target, the estimate with its
    interval, n, the mde and the outcome; what the chapters and the reproducibility page show."""
    rows = []
    for key in ("multitask", "holdout", "unseen"):
        c, a = claim(key), results[key]["test"]
        rows.append({"claim": c.label, "test": c.test, "paper's effect / margin (points)": round(100 * c.target, 2),
                     "estimate (points)": round(100 * a.estimate, 1),
                     "interval (points)": f"[{100 * a.low:+.1f}, {100 * a.high:+.1f}] ({100 * a.level:.0f}%)",
                     "cases": a.n, "clusters": a.clusters, "mde (points)": round(100 * a.mde, 1),
                     "outcome": results[key]["verdict"]})
    return pd.DataFrame(rows).set_index("claim")


def claim_phrases(results: Mapping[str, Any]) -> dict[str, str]:
    """The glued text of experiments 1-3: ``<claim>_outcome``, ``_estimate``, ``_ci``, ``_n``,
    ``_clusters``, ``_mde``, ``_meaning``, ``_target`` and ``_needed`` (empty unless inconclusive)."""
    out = {}
    for key in ("multitask", "holdout", "unseen"):
        c, a = claim(key), results[key]["test"]
        tasks = len(set(paired_tasks(results, key)))
        decided = results[key]["verdict"] != NOT_DECIDED
        out.update({f"{key}_outcome": results[key]["verdict"], f"{key}_estimate": f"{100 * a.estimate:+.1f}",
                    f"{key}_ci": f"{100 * a.low:+.1f} to {100 * a.high:+.1f}", f"{key}_level": f"{100 * a.level:.0f}%",
                    f"{key}_n": f"{a.n:,}", f"{key}_clusters": f"{a.clusters:,}",
                    f"{key}_mde": f"{100 * a.mde:.1f}",
                    f"{key}_meaning": a.meaning if decided else f"no claim is decided on an editor that did not learn "
                                                                 f"({results[key]['why']})",
                    f"{key}_target": f"{100 * c.target:g}",
                    f"{key}_needed": (_needed_phrase(a, tasks) or "no more cases are needed to decide it") if decided
                    else "more test cases cannot decide it; a trained editor can"})
    return out


def paired_tasks(results: Mapping[str, Any], key: str) -> list[str]:
    """The tasks a claim's test pools (for the per-task case counts)."""
    if key == "multitask":
        return list(_tasks.trainable_tasks())
    if key == "holdout":
        return [results["holdout"]["task"], *[t for t in _tasks.trainable_tasks() if not _tasks.is_sentiment(t)]]
    return list(_tasks.task_names())


def claims_json(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results`` of :func:`experiment_claims` as plain data for a JSON file (assessments as
    dictionaries, tables as lists of rows)."""

    def plain(value):
        if isinstance(value, Assessment):
            return value.as_dict()
        if isinstance(value, pd.DataFrame):
            return value.reset_index().to_dict(orient="records")
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(results)


def claim_phrase_names() -> list[str]:
    """The names :func:`claim_phrases` returns (a chapter glues them, or "n/a" where it cannot run)."""
    fields = ("outcome", "estimate", "ci", "level", "n", "clusters", "mde", "meaning", "target", "needed")
    return [f"{key}_{f}" for key in ("multitask", "holdout", "unseen") for f in fields]


def view_rows(results: Mapping[str, Any]) -> pd.DataFrame:
    """Claim 1 under each ConvSent view: the gain, its interval and the outcome."""
    c = claim("multitask")
    rows = [{"ConvSent scored by": view + (" (the paper's)" if view == PAPER_CONVSENT_VIEW else ""),
             "gain (points)": round(100 * a.estimate, 1), "95% interval": f"[{100 * a.low:+.1f}, {100 * a.high:+.1f}]",
             "mde (points)": round(100 * a.mde, 1), f"outcome against {100 * c.target:g} points": a.outcome}
            for view, a in results["multitask"]["views"].items()]
    return pd.DataFrame(rows).set_index("ConvSent scored by")
