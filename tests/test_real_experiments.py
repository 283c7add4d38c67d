"""Chapter 8's pipeline on a tiny random LLaMA and the fixture data: every method through the engine,
the baselines placed inside the edited blocks, experiments 1-3 with verdicts by the stated rules."""

from __future__ import annotations

import pytest
import json

from test_real_data import _knowedit, folder  # noqa: F401  (the fixture data folder in the published layout)
from test_models import tiny_config, tiny_llama, tiny_real
from tiny import tiny_tokenizer

from instructedit_lite import claims, methods
from instructedit_lite import train as tr
from instructedit_lite.editors.baselines import baseline_options
from instructedit_lite.experiments import build_methods, evaluation_records, main_evaluation
from instructedit_lite.editors.ike import evaluate_in_context
from instructedit_lite.real_data import RealData

VERDICTS = {"reproduces", "direction only", "contradicted", "inconclusive"}


def test_every_method_through_the_engine(folder, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    # Recent with test records (the fixture's two records all go to training)
    (folder / "knowedit/wiki_recent_recent_train.json").write_text(json.dumps(_knowedit(30, 20)))
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    real = tiny_real(folder, tokenizer)
    small = tiny_config("instruct", steps=2)
    configs = {name: tr.default_config(c.regime, c.tasks, method=c.method, model=real, steps=2, val_every=2, n_val=1,
                                       checkpoint_every=2, mend=small.mend)
               for name, c in methods.editor_configs(0).items()}
    trained = tr.train_editors(configs, real, processes=1, progress=False)
    in_context = [m.name for m in methods.registered() if m.family == "in-context"]
    built = build_methods(trained, base=real, smoke=True, in_context=in_context)
    assert set(built) == set(methods.method_names())
    evaluator = real.for_editing(small.mend.weight_names)
    assert evaluator.model.lowest == 2
    records = evaluation_records(real.world, 2)
    # IKE (in context, through the engine as chapter 9 runs it): its own evaluation
    ike_cases = evaluate_in_context([built.pop(m) for m in in_context], evaluator.model, real.tokenizer,
                                    records["counterfact"][:1], progress=False)
    assert list(ike_cases.method) == in_context and (ike_cases.locality_plain == 1.0).all()
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
    from instructedit_lite.editors.baselines import make_baseline
    from instructedit_lite.engine import PrefixEngine
    from instructedit_lite.evaluate import evaluate_case

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "right"
    model = tiny_llama(tokenizer)
    weights = tiny_config("instruct").mend.weight_names
    engine = PrefixEngine(model, weights)
    options = baseline_options(tiny_real(folder, tokenizer), weights)[name]
    record = RealData(folder).records("counterfact", "test")[0]
    plain = evaluate_case(make_baseline(name, **options), model, tokenizer, record, generation=False)
    fast = evaluate_case(make_baseline(name, **options), engine, tokenizer, record, generation=False)
    for metric in ("reliability", "locality", "drawdown"):
        assert fast[metric] == pytest.approx(plain[metric], abs=1e-4), metric
    steps = "detail:steps"
    assert fast.get(steps) == plain.get(steps)
    if "detail:loss" in plain:
        assert fast["detail:loss"] == pytest.approx(plain["detail:loss"], rel=1e-3, abs=1e-5)
