"""An editor that did not learn is reported and decides no claim (instructedit_lite.train.learning_problem,
experiments.methods_not_learned, claims.experiment_claims, experiments.reproduce)."""

from __future__ import annotations

import dataclasses

import pandas as pd

from instructedit_lite import claims, experiments
from instructedit_lite import train as tr
from instructedit_lite.base_model import base_config, load_base_model


def frozen_editor(base, seed: int = 0) -> tr.TrainedEditor:
    """REAL TRAINING (a few seconds): multi-task MEND whose learning rates are 0, so it never moves."""
    config = dataclasses.replace(tr.default_config("multi", seed=seed, smoke=True), lr=0.0, alpha_lr=0.0)
    return tr.train_editor(config, base, cache=False, progress=False)


def test_an_editor_that_cannot_learn_is_flagged_and_reproduce_decides_no_claim_on_it(tmp_path):
    base = load_base_model(base_config(smoke=True), progress=False)
    stuck = frozen_editor(base)
    problem = tr.learning_problem(stuck)
    assert problem is not None and "did not learn" in problem and "seed 0" in problem
    assert "multi editor on counterfact, wikirecent, convsent" in problem
    # every editor stands in for the stuck one: no claim may be decided on any of them
    trained = {name: stuck for name in experiments.editor_configs(0, True)}
    not_learned = experiments.methods_not_learned(trained)
    assert {"InstructEdit", "MEND (multi-task)"} <= set(not_learned)
    methods = experiments.build_methods(trained, base=base, baselines=["FT-L"])
    methods = {m: e for m, e in methods.items() if m != experiments.SINGLE}
    records = experiments.evaluation_records(base.source, 2)
    results = experiments.reproduce(tmp_path, smoke=True, base=base, trained=trained, methods=methods,
                                    records=records, fluency_cases=0, generation=False, progress=False)
    for key in ("multitask", "holdout", "unseen"):
        assert results["claims"][key]["verdict"] == claims.NOT_DECIDED
        assert "did not learn" in results["claims"][key]["why"]
    assert results["settings"]["methods_not_learned"] == not_learned
    assert "not decided" in (tmp_path / "results.md").read_text()


def test_a_learned_editor_is_not_flagged():
    summary = {"initial": {"val_reliability": 0.2}, "best": {"val_reliability": 0.6}, "best_step": 40, "steps": 40}
    config = tr.default_config("instruct", smoke=True)
    ok = tr.TrainedEditor(None, config, pd.DataFrame(), pd.DataFrame({"step": [0, 40], "val_reliability": [0.2, 0.6]}),
                          summary)
    assert tr.learning_problem(ok) is None
    kept_start = tr.TrainedEditor(None, config, pd.DataFrame(), pd.DataFrame(), {**summary, "best_step": 0})
    assert "step 0" in tr.learning_problem(kept_start)
    flat = tr.TrainedEditor(None, config, pd.DataFrame(), pd.DataFrame(),
                            {**summary, "best": {"val_reliability": 0.22}})
    assert "less than 0.05 above" in tr.learning_problem(flat)
