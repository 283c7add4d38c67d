"""Chapter 9 on SmolLM2: what the lifelong, in-context and unlearning code needs on a LLaMA-family
model and through the frozen-prefix engine.

The library logic is checked on tiny models built here (a 3-block GPT-2 from ``tiny.py`` and a
4-block LLaMA); the tests marked ``smollm2`` run a short stream on the real model and skip without
the model or the real data (``INSTRUCTEDIT_DATA``).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import fact_record, snapshot, tiny_model, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from instructedit_lite.architectures import profile_for
from instructedit_lite.editors.baselines import FTM
from instructedit_lite.editors import check_restored
from instructedit_lite.engine import PrefixEngine
from instructedit_lite.evaluate import GEN_METRICS
from instructedit_lite.editors.ike import IKE, answer_logits, evaluate_in_context
from instructedit_lite.editors.mend import default_weight_names
from instructedit_lite.sequential import answer_predictions, sequential_editing
from instructedit_lite.editors.unlikelihood import Unlikelihood, UnlikelihoodConfig
from instructedit_lite.unlearning import known_facts


def tiny_llama(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits with a trained model's range (see test_baselines)
    return model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    model = tiny_llama(tok)
    return model, PrefixEngine(model, default_weight_names(model, n_last=2))


def rows_of(records):
    """Rows of very different lengths, so that batching by length reorders them."""
    rows = [(r.prompt, r.target_new) for r in records]
    rows += [(" ".join([r.prompt] * 4), r.ground_truth[0]) for r in records if r.ground_truth]
    return rows + [(p.prompt, p.answer) for r in records for p in r.locality_probes]


# ---------------------------------------------------------------------------------------------
# The unlikelihood editor's matrix comes from the architecture profile
# ---------------------------------------------------------------------------------------------


def test_unlikelihood_matrix_is_the_profiles_mlp_output(tok, llama):
    assert UnlikelihoodConfig().module is None
    rec = fact_record("counterfact", 1)
    gpt2 = tiny_model(tok)
    for model, expected in ((gpt2, ["transformer.h.2.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.bias"]),
                            (llama[0], ["model.layers.3.mlp.down_proj.weight"])):
        before = snapshot(model)
        deltas, details = Unlikelihood(steps=2, stop_prob=1e-9).fit(model, tok, rec)
        assert list(deltas) == expected and details["steps"] == 2
        check_restored(model, before)
        # the same name as FT-M's for the same block, and as the profile's template gives it
        profile = profile_for(model)
        assert FTM(layer=-1).parameter_names(model) == expected
        explicit = Unlikelihood(layer=-1, module=profile.mlp_out_module())
        assert list(explicit.fit(model, tok, rec)[0]) == expected


def test_unlikelihood_module_must_name_a_matrix(llama, tok):
    with pytest.raises(ValueError, match="FTM.module: the model has no module"):
        Unlikelihood(module="transformer.h.{layer}.mlp.c_proj").fit(llama[0], tok, fact_record("zsre", 1))


# ---------------------------------------------------------------------------------------------
# known_facts with a limit: the first facts of the full scan
# ---------------------------------------------------------------------------------------------


def test_known_facts_limit_is_a_prefix_of_the_full_scan(tok):
    model = tiny_model(tok)
    records = [fact_record(t, i) for i in range(6) for t in ("counterfact", "wikirecent", "zsre")]
    teach = [replace(r, target_new=r.ground_truth[0]) for r in records if r.ground_truth][1::2]
    with FTM(steps=80, lr=1e-2, layer=-1, eps=None).edited(model, tok, teach[0]):
        full = known_facts(model, tok, records)
        assert full, "the taught fact is known"
        for limit in range(len(full) + 2):
            for chunk in (1, 3, 50):
                assert known_facts(model, tok, records, limit=limit, chunk=chunk) == full[:limit]
    with pytest.raises(ValueError, match="limit must be >= 0 and chunk >= 1"):
        known_facts(model, tok, records, limit=1, chunk=0)


# ---------------------------------------------------------------------------------------------
# Through the engine: the same predictions, in the same order
# ---------------------------------------------------------------------------------------------


def test_answer_predictions_through_the_engine_match_the_model(tok, llama):
    model, engine = llama
    rows = rows_of([fact_record(t, i) for i in range(4) for t in ("counterfact", "zsre")])
    lengths = [len(tok(f"{p} {a}")["input_ids"]) for p, a in rows]
    assert sorted(lengths) != lengths  # the engine path reorders them
    plain = answer_predictions(model, tok, rows)
    for batch_size in (64, 3):
        through = answer_predictions(engine, tok, rows, batch_size=batch_size)
        assert len(through) == len(plain)
        for (p1, t1), (p2, t2) in zip(plain, through):
            assert torch.equal(t1, t2) and torch.equal(p1, p2)


def test_answer_logits_through_the_engine_match_the_model(tok, llama):
    model, engine = llama
    rows = rows_of([fact_record("counterfact", i) for i in range(3)])
    for a, b in zip(answer_logits(model, tok, rows), answer_logits(engine, tok, rows)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)


def test_sequential_stream_through_the_engine_matches_the_model(tok, llama):
    model, engine = llama
    stream = [fact_record(t, i) for i in range(3) for t in ("counterfact", "wikirecent", "zsre")]
    method = FTM(layer=3, steps=5, lr=1e-2, eps=None)  # inside the engine's edited blocks (2, 3)
    before = snapshot(model)
    plain = sequential_editing(method, model, tok, stream, every=3, progress=False)
    check_restored(model, before)
    through = sequential_editing(method, engine, tok, stream, every=3, progress=False)
    check_restored(model, before)
    assert list(through.n_edits) == [0, 3, 6, 9] and (through[through.n_edits == 0].locality == 1.0).all()
    columns = ["retention", "generalization", "locality", "latest"]
    assert np.allclose(plain[columns].to_numpy(), through[columns].to_numpy(), equal_nan=True)
    assert plain.fluency.isna().all()  # no fluency prompts: no generation needed


# ---------------------------------------------------------------------------------------------
# In-context evaluation without generation
# ---------------------------------------------------------------------------------------------


def test_evaluate_in_context_without_generation(tok):
    model = tiny_model(tok)
    pool = [fact_record("counterfact", i, split="train") for i in range(5, 8)]
    records = [fact_record("counterfact", 1), fact_record("zsre", 2)]
    ike = IKE(pool, k=2, retriever="tfidf")
    with_gen = evaluate_in_context([ike], model, tok, records, progress=False)
    without = evaluate_in_context([ike], model, tok, records, progress=False, generation=False)
    assert without[list(GEN_METRICS)].isna().all().all()
    assert not with_gen[list(GEN_METRICS)].isna().all().all()
    shared = ["reliability", "generalization", "portability", "locality", "locality_plain"]
    assert np.allclose(with_gen[shared].to_numpy(float), without[shared].to_numpy(float), equal_nan=True)
    assert (without.locality_plain == 1.0).all()  # no weight changed


# ---------------------------------------------------------------------------------------------
# On SmolLM2 and the real data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    from instructedit_lite import models

    if models.missing():
        pytest.skip("the real model or the real data is missing: " + "; ".join(models.missing()))
    return models.load_model("smollm2", progress=False)


@pytest.mark.smollm2
def test_unlikelihood_on_smollm2_edits_the_last_down_projection(real):
    model, tokenizer = real.model, real.tokenizer
    assert f".mlp.{profile_for(model).mlp_out}." in real.weight_names()[-1]
    rec = next(r for r in real.world.records("counterfact", "test") if r.ground_truth)
    deltas, _ = Unlikelihood(steps=1).fit(model, tokenizer, rec)
    assert list(deltas) == [real.weight_names()[-1]] == ["model.layers.29.mlp.down_proj.weight"]


@pytest.mark.smollm2
def test_a_short_stream_on_smollm2_through_the_engine_restores_the_model(real):
    from instructedit_lite.editors.baselines import baseline_options

    engine = real.for_editing().model
    options = baseline_options(real, smoke=True, placement="same-block")["FT-M"]  # inside the engine's blocks
    method = FTM(**options, eps=None, lr=1e-3)
    stream = [real.world.records(t, "test")[0] for t in ("counterfact", "wikirecent", "zsre")]
    before = {n: p.detach().clone() for n, p in real.model.named_parameters() if ".mlp." in n}
    curves = sequential_editing(method, engine, real.tokenizer, stream, every=1, progress=False)
    assert list(curves.n_edits) == [0, 1, 2, 3]
    assert curves.locality.iloc[0] == 1.0 and curves.retention.iloc[1:].between(0, 1).all()
    assert all(torch.equal(real.model.get_parameter(n), p) for n, p in before.items())
