"""The verdict rules of the paper's claims (instructedit_lite.claims): each verdict on both sides of
its threshold, and experiments 1-3 computed from a table of cases built in the test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from instructedit_lite import claims
from instructedit_lite.experiments import SINGLE, UNSEEN


def ci(low: float, high: float) -> dict[str, float]:
    return {"difference": (low + high) / 2, "low": low, "high": high}


@pytest.mark.parametrize("low,verdict", [(0.12, "reproduces"), (0.10, "reproduces"), (0.02, "direction only"),
                                         (0.0, "does not reproduce"), (-0.2, "does not reproduce")])
def test_multitask_rule(low, verdict):
    assert claims.multitask_verdict(ci(low, low + 0.1)) == verdict


@pytest.mark.parametrize("low,drop,verdict", [(0.05, -0.2, "reproduces"), (0.05, -0.05, "partly"),
                                              (-0.05, -0.2, "partly"), (-0.05, -0.05, "does not reproduce"),
                                              (0.05, -0.10, "partly")])  # a drop of exactly 10 points is not sharp
def test_holdout_rule(low, drop, verdict):
    got, sharp = claims.holdout_verdict(ci(low, low + 0.1), drop)
    assert got == verdict and sharp == (drop < -0.10)


def test_unseen_rule():
    assert claims.unseen_verdict(0.05) == "reproduces"
    assert claims.unseen_verdict(0.0501) == "does not reproduce"
    assert set(claims.MEANINGS["unseen"]) == {"reproduces", "does not reproduce"}


def test_directions_rule():
    idx = ["a", "b", "c"]
    sil_ie, sil_mm = pd.Series([0.6, 0.3, 0.2], idx), pd.Series([0.1, 0.1, 0.05], idx)
    knn_ie, knn_mm = pd.Series([0.9, 0.8], idx[:2]), pd.Series([0.5, 0.6], idx[:2])
    assert claims.directions_verdict(sil_ie, sil_mm, knn_ie, knn_mm) == "reproduces"
    assert claims.directions_verdict(sil_ie * 0.5, sil_mm, knn_ie, knn_mm) == "partly"
    assert claims.directions_verdict(sil_ie * 0.5, sil_mm, knn_ie, knn_mm + 0.25) == "does not reproduce"


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


def synthetic_cases(gain: float, n: int = 30, seed: int = 0) -> pd.DataFrame:
    """Every method the three experiments read, on the four tasks; InstructEdit ahead by ``gain``."""
    rng = np.random.default_rng(seed)
    level = {"base model": 0.1, "FT-L": 0.3, "KE": 0.4, "MEND (multi-task)": 0.5, "InstructEdit": 0.5 + gain,
             UNSEEN: 0.5 + gain, SINGLE: 0.55}
    rows = []
    for method, mean in level.items():
        for task in ("counterfact", "wikirecent", "convsent", "zsre"):
            if method == SINGLE and task == "zsre":
                continue
            for case in range(n):
                noise = rng.normal(0, 0.02)
                rows.append({"method": method, "task": task, "case": case, "reliability": mean + noise,
                             "generalization": mean, "locality": 0.9, "portability": 0.2})
    return pd.DataFrame(rows)


def test_experiment_claims_from_cases():
    strong = claims.experiment_claims(synthetic_cases(0.3))
    assert strong["multitask"]["verdict"] == "reproduces"
    assert strong["multitask"]["vs_mend"]["difference"] == pytest.approx(0.3, abs=0.02)
    assert strong["multitask"]["best_other"] == "MEND (multi-task)"  # every method but InstructEdit, single-task MEND, the base
    assert strong["holdout"]["task"] == "zsre" and not strong["holdout"]["sharp_drop"]
    assert strong["holdout"]["verdict"] == "partly"  # ahead beyond the noise, no sharp drop
    # the unseen instruction is InstructEdit's level plus noise: changes of a few hundredths at most
    assert strong["unseen"]["verdict"] == "reproduces"
    none = claims.experiment_claims(synthetic_cases(0.0))
    assert none["multitask"]["verdict"] == "does not reproduce"
