"""Chapter 8's pipeline on a tiny random LLaMA and the fixture data: every method through the engine,
the baselines placed inside the edited blocks, experiments 1-3 with verdicts by the stated rules."""

from __future__ import annotations

import pytest
import json

from test_real_data import _knowedit, folder  # noqa: F401  (the fixture data folder in the published layout)
from test_real_model import tiny_llama
from tiny import tiny_tokenizer

from instructedit_lite import claims, methods
from instructedit_lite import real_experiments as rx
from instructedit_lite import real_model as rm
from instructedit_lite.experiments import evaluation_records, main_evaluation
from instructedit_lite.mend import MendConfig
from instructedit_lite.real_data import RealData

VERDICTS = {"reproduces", "direction only", "contradicted", "inconclusive"}


def test_baselines_edit_inside_the_edited_blocks():
    assert rx.BASELINE_OPTIONS == {"FT-L": {"layer": 27}, "FT-M": {"layer": 27},
                                   "GRACE": {"layer": 27, "n_iter": rx.GRACE_STEPS}, "CaliNet": {"layer": 29}}
    assert all(o.get("steps", o.get("n_iter")) == 2 for o in rx.baseline_options(smoke=True).values())
    assert rx.baseline_options(rm.edited_weights(n_layers=4, n_last=2))["CaliNet"] == {"layer": 3}
    with pytest.raises(ValueError, match="not inside a block"):
        rx.baseline_options(["lm_head.weight"])


def test_scaling_and_balance_editors_carry_the_real_settings():
    scaling = rx.scaling_configs(seed=0)
    assert [c.tasks for c in scaling.values()] == [("wikirecent",), ("wikirecent", "counterfact"),
                                                   rm.real_config("instruct").tasks]
    assert scaling[3].key() == rm.real_config("instruct").key()  # chapter 7's InstructEdit, from its cache
    balance = rx.balance_configs(seed=0)
    assert {c.steps for c in (*scaling.values(), balance["balanced (ConvSent 1,427)"])} == {rm.real_config().steps}
    assert balance["unbalanced (paper's data)"].steps > rm.real_config().steps  # the same fact edits
    assert all(c.mend.weight_names == rm.edited_weights() for c in balance.values())
    assert rx.scaling_configs(size="smoke")[1].steps == rm.real_config(size="smoke").steps


def test_every_method_through_the_engine(folder, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    # Recent with test records (the fixture's two records all go to training)
    (folder / "knowedit/wiki_recent_recent_train.json").write_text(json.dumps(_knowedit(30, 20)))
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    real = rm.RealModel(tiny_llama(tokenizer), tokenizer, RealData(folder), key="tiny")
    weights = rm.edited_weights(n_layers=4, n_last=2)
    configs = {name: rm.real_config(c.regime, c.tasks, size="smoke", method=c.method, steps=2, val_every=2,
                                    n_val=1, checkpoint_every=2, mend=MendConfig(rank=4, weight_names=weights))
               for name, c in methods.editor_configs(0).items()}
    trained = {name: rm.train_real_editor(c, real, progress=False) for name, c in configs.items()}
    built = rx.methods_for(real, trained, smoke=True)
    assert set(built) == set(methods.method_names())
    evaluator = rx.evaluator(real, configs["InstructEdit"])
    assert evaluator.model.lowest == 2
    records = evaluation_records(real.world, 2)
    cases = main_evaluation(built, evaluator, records, fluency_cases=0, progress=False)
    assert set(cases.method) == set(built)
    counts = cases.groupby(["method", "task"]).size()
    assert all(n == len(records[task]) for (_, task), n in counts.items())
    found = claims.experiment_claims(cases)
    assert {found[k]["verdict"] for k in ("multitask", "holdout", "unseen")} <= VERDICTS
    assert found["holdout"]["task"] == "zsre"
    # generation success is scored on the fact tasks (greedy decoding with the full model)
    assert cases[cases.task == "counterfact"].gen_reliability.notna().all()


@pytest.mark.parametrize("name", ["FT-L", "FT-M", "CaliNet", "GRACE"])
def test_baselines_through_the_engine_equal_the_plain_model(folder, name):  # noqa: F811
    """The engine runs the LM head only at scored positions: the same edit, the same scores."""
    from instructedit_lite.baselines import make_baseline
    from instructedit_lite.engine import PrefixEngine
    from instructedit_lite.evaluate import evaluate_case

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    model = tiny_llama(tokenizer)
    weights = rm.edited_weights(n_layers=4, n_last=2)
    engine = PrefixEngine(model, weights)
    options = rx.baseline_options(weights)[name]
    record = RealData(folder).records("counterfact", "test")[0]
    plain = evaluate_case(make_baseline(name, **options), model, tokenizer, record, generation=False)
    fast = evaluate_case(make_baseline(name, **options), engine, tokenizer, record, generation=False)
    for metric in ("reliability", "locality", "drawdown"):
        assert fast[metric] == pytest.approx(plain[metric], abs=1e-4), metric
    steps = "detail:steps"
    assert fast.get(steps) == plain.get(steps)
    if "detail:loss" in plain:
        assert fast["detail:loss"] == pytest.approx(plain["detail:loss"], rel=1e-3, abs=1e-5)
