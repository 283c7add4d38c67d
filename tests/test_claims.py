"""The claims' tests (instructedit_lite.inference, instructedit_lite.claims): each outcome on
synthetic differences whose answer is known, intervals that match scipy's and statsmodels', the
minimum detectable effect, clusters, and experiments 1-3 computed from a table of cases built here."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats

from instructedit_lite import claims
from instructedit_lite.experiments import SINGLE, UNSEEN
from instructedit_lite.inference import assess_equivalence, assess_gain, holm, linear_estimate


def test_a_handful_of_noisy_cases_is_inconclusive():
    rng = np.random.default_rng(1)
    a = assess_gain(rng.normal(0.05, 0.3, 5), 0.1486)
    assert a.outcome == "inconclusive" and a.low <= 0 <= 0.1486 <= a.high and a.n == 5
    assert a.cases_needed() > 5


def test_hundreds_of_cases_with_mean_zero_contradict_the_paper():
    rng = np.random.default_rng(2)
    d = rng.normal(0, 0.2, 600)
    d -= d.mean()
    a = assess_gain(d, 0.1486)
    assert a.outcome == "contradicted" and a.high < 0.1486 and a.low < 0
    assert a.cases_needed() == a.n  # decided already


@pytest.mark.parametrize("mean,outcome", [(0.30, "reproduces"), (0.05, "direction only")])
def test_a_clear_gain_is_sized_against_the_effect(mean, outcome):
    rng = np.random.default_rng(3)
    d = rng.normal(mean, 0.1, 400)
    assert assess_gain(d, 0.1486).outcome == outcome


def test_the_iid_interval_is_scipys_t_interval():
    d = np.random.default_rng(4).normal(0.1, 0.25, 37)
    a = assess_gain(d, 0.2)
    ci = stats.ttest_1samp(d, 0).confidence_interval(0.95)
    assert a.low == pytest.approx(ci.low) and a.high == pytest.approx(ci.high) and a.df == 36


@pytest.mark.parametrize("n,s", [(50, 0.2), (400, 0.25)])
def test_mde_is_about_2_8_s_over_root_n(n, s):
    d = np.random.default_rng(5).normal(0, s, n)
    a = assess_gain(d, 0.1)
    sd = np.std(d, ddof=1)
    assert a.mde == pytest.approx(2.8 * sd / math.sqrt(n), rel=0.04)


def test_clusters_widen_the_interval_and_match_statsmodels():
    """Two records of one topic share most of their difference: 40 clusters, not 80 cases."""
    rng = np.random.default_rng(6)
    topic = rng.normal(0.05, 0.3, 40)
    d = np.repeat(topic, 2) + rng.normal(0, 0.05, 80)
    groups = np.repeat(np.arange(40), 2)
    iid, clustered = assess_gain(d, 0.15), assess_gain(d, 0.15, groups=groups)
    assert clustered.high - clustered.low > 1.2 * (iid.high - iid.low)
    assert clustered.clusters == 40 and clustered.n == 80 and clustered.df == 39
    fit = sm.OLS(d, np.ones(len(d))).fit(cov_type="cluster", cov_kwds={"groups": groups})
    assert clustered.se == pytest.approx(float(fit.bse[0]), rel=1e-9)


def test_tasks_weigh_the_same_and_contrasts_subtract():
    values = np.r_[np.full(10, 1.0), np.full(30, 0.0)] + np.tile([0.01, -0.01], 20)
    strata = ["a"] * 10 + ["b"] * 30
    estimate, *_ = linear_estimate(values, strata=strata)
    assert estimate == pytest.approx(0.5)  # not the case mean 0.25
    drop, se, df, n, _ = linear_estimate(values, strata=strata, contrast={"a": 1.0, "b": -1.0})
    assert drop == pytest.approx(1.0) and n == 40 and se > 0


def test_seeds_are_the_unit_of_replication():
    """Cases of three seeds: the interval is over the seeds' estimates, with two degrees of freedom."""
    rng = np.random.default_rng(7)
    seed_effect = {0: 0.02, 1: 0.08, 2: 0.14}
    d = np.concatenate([rng.normal(seed_effect[s], 0.2, 200) for s in range(3)])
    seeds = np.repeat([0, 1, 2], 200)
    strata = np.tile(["x", "y"], 300)
    pooled = assess_gain(d, 0.1486, groups=seeds, strata=strata)
    assert pooled.clusters == 3 and pooled.df == 2
    assert pooled.high - pooled.low > 2 * (assess_gain(d, 0.1486, strata=strata).high
                                           - assess_gain(d, 0.1486, strata=strata).low)


@pytest.mark.parametrize("shift,outcome", [(0.0, "reproduces"), (0.2, "contradicted"), (0.045, "inconclusive")])
def test_equivalence_outcomes(shift, outcome):
    d = np.random.default_rng(8).normal(0, 0.1, 300)
    d = d - d.mean() + shift
    a = assess_equivalence(d, 0.05)
    assert a.outcome == outcome and a.level == pytest.approx(0.90)


def test_too_few_cases_for_a_spread_are_inconclusive_not_an_error():
    a = assess_gain([0.5, 0.5], 0.1, groups=["t", "t"])  # one topic: no spread to estimate
    assert a.outcome == "inconclusive" and math.isinf(a.high) and a.cases_needed() is None


def test_holm_matches_its_definition():
    reject, adjusted = holm([0.01, 0.04, 0.03])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06]) and reject == [True, False, False]


def test_every_tested_claim_is_declared_once_with_its_target():
    keys = [c.key for c in claims.CLAIMS]
    assert len(keys) == len(set(keys))
    for c in claims.CLAIMS:
        assert c.test in ("gain", "equivalence", "rule")
        assert (c.target is not None) == (c.test != "rule") and c.reading
    assert claims.claim("multitask").target == pytest.approx(0.1486)
    assert claims.PAPER_CONVSENT_VIEW in claims.CONVSENT_VIEWS


def test_directions_rule():
    idx = ["a", "b", "c"]
    sil_ie, sil_mm = pd.Series([0.6, 0.3, 0.2], idx), pd.Series([0.1, 0.1, 0.05], idx)
    knn_ie, knn_mm = pd.Series([0.9, 0.8], idx[:2]), pd.Series([0.5, 0.6], idx[:2])
    assert claims.directions_verdict(sil_ie, sil_mm, knn_ie, knn_mm) == "reproduces"
    assert claims.directions_verdict(sil_ie * 0.5, sil_mm, knn_ie, knn_mm) == "partly"
    assert claims.directions_verdict(sil_ie * 0.5, sil_mm, knn_ie, knn_mm + 0.25) == "does not reproduce"


def ci(low: float, high: float) -> dict[str, float]:
    return {"difference": (low + high) / 2, "low": low, "high": high}


def test_scaling_rule():
    rising, flat = pd.Series([0.2, 0.3, 0.4], [1, 2, 3]), pd.Series([0.4, 0.3, 0.35], [1, 2, 3])
    shrinking, steady = pd.Series([0.5, 0.4, 0.3], [1, 2, 3]), pd.Series([0.5, 0.5, 0.49], [1, 2, 3])
    assert claims.scaling_verdict(rising, shrinking, ci(0.05, 0.3))[0] == "reproduces"
    assert claims.scaling_verdict(rising, steady, ci(0.05, 0.3))[0] == "partly"
    assert claims.scaling_verdict(rising, steady, ci(-0.05, 0.3))[0] == "direction only"
    assert claims.scaling_verdict(flat, steady, ci(-0.05, 0.3))[0] == "does not reproduce"


def test_balance_rule():
    assert claims.balance_verdict(0.5, 0.4, ci(0.01, 0.2)) == ("reproduces", True, True)
    assert claims.balance_verdict(0.5, 0.4, ci(-0.01, 0.2)) == ("partly", True, False)
    assert claims.balance_verdict(0.3, 0.4, ci(-0.01, 0.2)) == ("does not reproduce", False, False)


def synthetic_cases(gain: float, n: int = 30, seed: int = 0, drop: float = 0.0) -> pd.DataFrame:
    """Every method the three experiments read, on the four tasks; InstructEdit ahead by ``gain``
    on the training tasks; multi-task MEND and KE lose ``drop`` more than InstructEdit on ZsRE.
    ConvSent's two records of a topic share a case id, as in the published files."""
    rng = np.random.default_rng(seed)
    level = {"base model": 0.1, "FT-L": 0.3, "KE": 0.4, "MEND (multi-task)": 0.5, "InstructEdit": 0.5 + gain,
             UNSEEN: 0.5 + gain, SINGLE: 0.55}
    rows = []
    for method, mean in level.items():
        for task in ("counterfact", "wikirecent", "convsent", "zsre"):
            if method == SINGLE and task == "zsre":
                continue
            shift = -drop if task == "zsre" and method in ("KE", "MEND (multi-task)") else 0.0
            for i in range(n):
                case = i // 2 if task == "convsent" else i
                value = mean + shift + rng.normal(0, 0.02)
                rows.append({"method": method, "task": task, "case": case, "reliability": value,
                             "token_accuracy": value, "reliability_em": float(value > 0.45),
                             "generalization": mean, "locality": 0.9, "portability": 0.2})
    return pd.DataFrame(rows)


def test_experiment_claims_from_cases():
    strong = claims.experiment_claims(synthetic_cases(0.3, drop=0.3))
    assert strong["multitask"]["verdict"] == "reproduces"
    assert strong["multitask"]["vs_mend"]["difference"] == pytest.approx(0.3, abs=0.02)
    assert strong["multitask"]["best_other"] == "MEND (multi-task)"  # every method but InstructEdit, single-task MEND, the base
    assert strong["multitask"]["vs_mend"].clusters == 75  # ConvSent's 30 records are 15 topics
    assert set(strong["multitask"]["views"]) == set(claims.CONVSENT_VIEWS)
    assert strong["holdout"]["task"] == "zsre" and strong["holdout"]["verdict"] == "reproduces"
    assert strong["holdout"]["drop_contrast"].estimate == pytest.approx(0.3, abs=0.02)
    # the unseen instruction is InstructEdit's level plus noise of 0.02: equivalent within 5 points
    assert strong["unseen"]["verdict"] == "reproduces"
    assert set(strong["unseen"]["secondary"]["outcome"]) == {"reproduces"}
    none = claims.experiment_claims(synthetic_cases(0.0))
    assert none["multitask"]["verdict"] == "contradicted"
    assert none["holdout"]["verdict"] == "contradicted"
    few = claims.experiment_claims(synthetic_cases(0.1, n=4))
    assert few["multitask"]["test"].n == 12
    rows = claims.claim_rows(strong)
    assert list(rows["outcome"]) == ["reproduces", "reproduces", "reproduces"]
    phrases = claims.claim_phrases(strong)
    assert phrases["multitask_target"] == "14.86" and phrases["unseen_level"] == "90%"
    json_ready = claims.claims_json(strong)
    assert json_ready["multitask"]["vs_mend"]["outcome"] == "reproduces"


def test_an_inconclusive_claim_says_how_many_cases_would_decide_it():
    noisy = synthetic_cases(0.1, n=4)
    noisy["token_accuracy"] += np.random.default_rng(0).normal(0, 0.4, len(noisy))
    noisy["reliability"] = noisy["token_accuracy"]
    a = claims.experiment_claims(noisy)["multitask"]["test"]
    assert a.outcome == "inconclusive" and a.cases_needed() > a.n
    phrase = claims.claim_phrases(claims.experiment_claims(noisy))["multitask_needed"]
    assert f"about {math.ceil(a.cases_needed() / 3):,} test cases per task (now 4)" in phrase


def test_half_sample_interval_of_a_mean_matches_its_standard_error():
    from instructedit_lite.inference import half_sample_interval

    rng = np.random.default_rng(9)
    x = rng.normal(0.3, 0.2, 400)
    labels = np.repeat(["a", "b"], 200)
    ci = half_sample_interval(lambda i: x[i].mean(), labels, halves=400, seed=0)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert ci.estimate == pytest.approx(x.mean())
    assert (ci.high - ci.low) / 2 == pytest.approx(1.96 * se, rel=0.15)
    with pytest.raises(ValueError, match="at least 4 edits"):
        half_sample_interval(lambda i: 0.0, ["a", "a", "a", "b", "b", "b", "b"])


def test_figure_rules_judge_the_interval_not_the_point():
    idx = ["a", "b"]
    sil_ie, sil_mm = pd.Series([0.7, 0.6], idx), pd.Series([0.2, 0.2], idx)
    knn = pd.Series([0.5, 0.5], idx)
    assert claims.directions_verdict(sil_ie, sil_mm, knn, knn) == "reproduces"
    assert claims.directions_verdict(sil_ie, sil_mm, knn, knn, best_silhouette_low=0.45) != "reproduces"
    assert claims.directions_verdict(sil_ie, sil_mm, knn, knn, min_gain_low=0.05) != "reproduces"
    rising, falling = pd.Series([0.2, 0.3, 0.4], [1, 2, 3]), pd.Series([0.5, 0.4, 0.3], [1, 2, 3])
    assert claims.scaling_verdict(rising, falling, ci(0.05, 0.3))[2]
    assert not claims.scaling_verdict(rising, falling, ci(0.05, 0.3), overlap_fall=ci(0.01, 0.39))[2]
    assert claims.balance_verdict(0.5, 0.4, ci(0.01, 0.2))[1]
    assert not claims.balance_verdict(0.5, 0.4, ci(0.01, 0.2), regularity_gain=ci(-0.02, 0.22))[1]
