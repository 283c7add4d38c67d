"""Unlearning on the tiny world: the old answer's probability falls, the weights come back exactly."""

import contextlib
from dataclasses import replace

import pytest
import torch
from tiny import fact_record, snapshot, tiny_model, tiny_tokenizer

from instructedit_lite.editors.baselines import FTM
from instructedit_lite.editors import check_restored
from instructedit_lite.editors.ike import IKE
from instructedit_lite.records import RecordError
from instructedit_lite.text import target_logprob
from instructedit_lite.editors.unlikelihood import Unlikelihood
from instructedit_lite.unlearning import (REFUSAL, evaluate_unlearning, forget_record, known_facts,
                                          summarize_unlearning, unlearning_methods)


@contextlib.contextmanager
def taught(model, tok, records):
    """The model with each record's old answer fine-tuned in (FT-M towards the truth, 2nd block's c_proj)."""
    with contextlib.ExitStack() as stack:
        for r in records:
            stack.enter_context(FTM(steps=60, lr=1e-2, layer=-2, eps=None).edited(model, tok, replace(r, target_new=r.ground_truth[0])))
        yield


@pytest.fixture(scope="module")
def world():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits with a trained model's range (see test_baselines)
    return tok, model


def test_forget_record_needs_an_old_answer():
    rec = fact_record("counterfact", 1)
    assert forget_record(rec).target_new == REFUSAL and forget_record(rec).ground_truth == rec.ground_truth
    with pytest.raises(RecordError, match="hand/wikirecent/test, record 1, field 'ground_truth'"):
        forget_record(fact_record("wikirecent", 1))


def test_unlikelihood_drives_the_old_answer_down_and_restores(world):
    tok, model = world
    rec = fact_record("counterfact", 1)
    old = rec.ground_truth[0]
    with taught(model, tok, [rec]):  # a random model knows nothing: teach it the fact first
        before_w, flags = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
        before = target_logprob(model, tok, [rec.prompt], [old], reduction="sum")[0]
        assert known_facts(model, tok, [rec]) == [rec]
        method = Unlikelihood(steps=30, stop_prob=0.01)
        with method.edited(model, tok, rec) as info:
            after = target_logprob(model, tok, [rec.prompt], [old], reduction="sum")[0]
        assert after < before - 2.0 and info.details["steps"] > 0
        check_restored(model, before_w)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_known_facts_keeps_only_what_the_model_says(world):
    tok, model = world
    records = [fact_record("counterfact", i) for i in range(4)]
    # Make the model "know" record 0's old answer by fine-tuning it in (FT-M towards the truth).
    teach = replace(records[0], target_new=records[0].ground_truth[0])
    with FTM(steps=40, layer=-1, lr=5e-3, eps=None).edited(model, tok, teach):
        known = known_facts(model, tok, records)
    assert records[0] in known and len(known) < 4


def test_evaluate_unlearning_table(world):
    tok, model = world
    records = [fact_record("zsre", i) for i in (1, 2)]
    pool = [fact_record("counterfact", i, split="train") for i in (5, 6, 7)]
    methods = [Unlikelihood(steps=10), IKE(pool, k=2, retriever="tfidf")]
    with taught(model, tok, records[:1]):
        before_w = snapshot(model)
        cases = evaluate_unlearning(methods, model, tok, records, progress=False)
        check_restored(model, before_w)
    assert len(cases) == 2 * 2 * 2
    table = summarize_unlearning(cases)
    # The unlikelihood edit lowers the old answer's probability on the edit prompt.
    assert table.loc[("FT (unlikelihood)", "after"), "old_prob"] < table.loc[("FT (unlikelihood)", "before"), "old_prob"]
    # "before" is the same unedited model for every method.
    befores = cases[cases.phase == "before"].groupby("case").old_prob.nunique()
    assert (befores == 1).all()
    assert cases[cases.phase == "after"].locality.between(0, 1).all()


def test_the_four_unlearning_methods_share_the_matrix_and_the_budget(world):
    from instructedit_lite.editors.mend import MendConfig, MendEditor
    from instructedit_lite.editors.unlikelihood import UnlikelihoodConfig

    tok, model = world
    config = UnlikelihoodConfig(layer=-2, steps=7, lr=1e-3)
    editor = MendEditor(model, MendConfig(rank=4), generator=torch.Generator().manual_seed(0))
    pool = [fact_record("counterfact", i, split="train") for i in (5, 6, 7)]
    ftm, unlikely, ike, mend = unlearning_methods(config, editor, None, pool, tokenizer=tok, k=2, max_tokens=64,
                                                  retriever="tfidf")
    assert [m.name for m in (ftm, unlikely, ike, mend)] == ["FT-M (refusal)", "FT (unlikelihood)", "IKE (refusal)",
                                                              "InstructEdit (refusal)"]
    # FT-M differs from the unlikelihood editor only in its loss: same block, steps, rate, no box
    settings = ftm.config
    assert (settings.layer, settings.steps, settings.lr, settings.eps) == (config.layer, config.steps, config.lr, None)
    assert ike.k == 2 and ike.retriever.kind == "tfidf"
