"""Evaluation (instructedit_lite.evaluate): one edit per case on the original model, exact undo,
the right rows scored with the right prompts, tidy tables written to disk."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from instructedit_lite import answers
from instructedit_lite import evaluate as ev
from instructedit_lite import generation, metrics, sampling
from instructedit_lite.editors import EditInfo, Editor, MendMethod, Unedited, WeightEditor
from instructedit_lite.instructions import default_instructions
from instructedit_lite.editors.mend import MendConfig, MendEditor
from instructedit_lite.text import prompt_target_batch
from tiny import hand_records, snapshot, tiny_decoder, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def records():
    return hand_records(n=2)


class TargetBias(Editor):
    """A hook on the LM head that adds a large bias to the tokens of the edit's first target row:
    the edit succeeds on every prompt (poor locality)."""

    name = "bias"

    def __init__(self, strength: float = 50.0):
        self.strength = strength
        self.seen: list[str] = []

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        self.seen.append(record.prompt)
        ids = tokenizer(" " + record.target_new, add_special_tokens=False)["input_ids"]
        bias = torch.zeros(model.config.vocab_size)
        bias[ids] = self.strength
        handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
        try:
            yield EditInfo(0.0, {"n_ids": len(ids)})
        finally:
            handle.remove()


class Leaky(WeightEditor):
    """A broken editor: changes the weights and does not undo it."""

    name = "leaky"

    def deltas(self, model, tokenizer, record):
        return {}

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        with torch.no_grad():
            model.lm_head.weight.add_(0.01)
        yield EditInfo()


def test_unedited_model_scores_are_the_pre_edit_scores(model, tok, records):
    before = snapshot(model)
    cases = ev.evaluate_methods([Unedited()], model, tok, records, progress=False)
    assert len(cases) == 8
    assert (cases.locality == 1.0).all() and (cases.drawdown.abs() < 1e-6).all()
    assert cases[cases.task == "convsent"].portability.isna().all()
    assert cases[cases.task != "convsent"][["reliability", "generalization", "portability"]].notna().all().all()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_strong_edit_succeeds_and_costs_locality(model, tok, records):
    # one-token targets, so that a bias on the target's token makes it the argmax everywhere
    recs = {"counterfact": [dataclasses.replace(r, target_new="great") for r in records["counterfact"]]}
    cases = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, recs, progress=False)
    facts = cases.set_index("method")
    assert (facts.loc["bias", "reliability_em"] == 1.0).all()
    assert (facts.loc["bias", "reliability"].values > facts.loc["base model", "reliability"].values).all()
    assert (facts.loc["bias", "locality"] < 1.0).any()
    assert (facts.loc["bias", "drawdown"] > 0).all()


class WordBias(Editor):
    """A hook on the LM head that favours the given tokens by ``strength`` logits everywhere."""

    name = "word bias"

    def __init__(self, token_ids, strength: float):
        self.token_ids, self.strength = list(token_ids), strength

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        bias = torch.zeros(model.config.vocab_size)
        bias[self.token_ids] = self.strength
        handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
        try:
            yield EditInfo()
        finally:
            handle.remove()


def _sentiment_only_ids(tok, rec):
    """Tokens of the wanted responses that no unwanted response has ("hate", "awful", ...)."""
    ids = lambda texts: {t for r in texts for t in tok(" " + r, add_special_tokens=False)["input_ids"]}
    return sorted(ids(rec.wanted_responses) - ids(rec.unwanted_responses))


def test_convsent_success_follows_the_wanted_sentiment(model, tok, records):
    rec = records["convsent"][0]
    case = ev.evaluate_case(WordBias(_sentiment_only_ids(tok, rec), 3.0), model, tok, rec)
    base = ev.evaluate_case(Unedited(), model, tok, rec)
    assert case["reliability"] > base["reliability"]
    assert case["reliability"] > 0.5 and case["reliability_em"] == 1.0
    assert math.isnan(case["portability"])


def test_convsent_es_is_the_references_with_its_topic_factor(model, tok, records):
    """EasyEdit's ``es``: token-pooled log-probabilities, times min(1, exp(l+_post - l+_pre))."""
    rec = records["convsent"][0]
    method = TargetBias(50.0)  # wins the contrast by making *every* response token-for-token unlikely
    case = ev.evaluate_case(method, model, tok, rec)
    q = rec.prompt
    rows = [(q, r) for r in rec.wanted_responses] + [(q, r) for r in rec.unwanted_responses]
    batch = prompt_target_batch(tok, *map(list, zip(*rows)))
    n = len(rec.wanted_responses)

    def logits():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    with torch.no_grad():
        pre = logits()
        with method.edited(model, tok, rec):
            post = logits()
    lab = batch["labels"]
    pos_post, neg_post = metrics.pooled_logprob(post[:n], lab[:n]), metrics.pooled_logprob(post[n:], lab[n:])
    pos_pre = metrics.pooled_logprob(pre[:n], lab[:n])
    z_sent = torch.sigmoid(pos_post - neg_post).item()
    z_topic = min(1.0, math.exp((pos_post - pos_pre).item()))
    es = ev._convsent_scores(["reliability/0/wanted"] * n + ["reliability/0/unwanted"] * (len(rows) - n),
                             post, lab, pre)["reliability"]
    assert es == pytest.approx(z_sent * z_topic, rel=1e-5)
    assert z_topic < 0.5  # the factor matters here: without it this edit would look like a success
    assert case["reliability"] < 0.5 and case["reliability_em"] == 1.0  # the sentiment "wins", ES says no


def test_convsent_token_accuracy_is_the_papers_column(model, tok, records):
    rec = records["convsent"][1]
    method = TargetBias(50.0)
    case = ev.evaluate_case(method, model, tok, rec)
    batch = prompt_target_batch(tok, [rec.prompt], [rec.target_new])
    with torch.no_grad(), method.edited(model, tok, rec):
        post = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert case["token_accuracy"] == pytest.approx(metrics.token_accuracy(post, batch["labels"]).item())
    assert case["token_accuracy"] != pytest.approx(case["reliability"])  # not the ES
    fact = ev.evaluate_case(method, model, tok, records["counterfact"][0])
    assert fact["token_accuracy"] == fact["reliability"]  # fact tasks: the same token accuracy


def test_a_leaked_edit_is_caught(tok, records):
    model = tiny_model(tok, seed=1)
    with pytest.raises(RuntimeError, match="not restored"):
        ev.evaluate_methods([Leaky()], model, tok, records, progress=False)


def test_instructed_method_sees_the_instruction_and_locality_rows_do_not(model, tok, records):
    method = TargetBias()
    method.instructions = default_instructions()
    rec = records["counterfact"][0]
    ev.evaluate_case(method, model, tok, rec)
    assert method.seen[-1].startswith("Task: counterfact") and method.seen[-1].endswith(rec.prompt)
    assert all(not p.startswith("Task:") for p, _ in ev.locality_rows(rec))
    method.unseen = True
    ev.evaluate_case(method, model, tok, rec)
    assert default_instructions().unseen("counterfact") in method.seen[-1]


def test_mend_method_edits_and_restores(model, tok, records):
    editor = MendEditor(model, MendConfig(rank=8, alpha_init=1.0), generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    cases = ev.evaluate_methods([MendMethod(editor, "MEND")], model, tok, records, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert (cases.edit_seconds > 0).all()
    assert (cases.locality < 1.0).any()  # a step of size 1 on the raw gradient does change the model


def test_fluency_only_for_the_first_cases(model, tok, records):
    cases = ev.evaluate_methods([Unedited()], model, tok, records, fluency_cases=1, fluency_tokens=8, progress=False)
    per_task = cases.groupby("task").fluency.apply(lambda s: int(s.notna().sum()))
    assert (per_task == 1).all()
    assert cases.generated.notna().sum() == 4


def test_duplicate_method_names_are_an_error(model, tok, records):
    with pytest.raises(ValueError, match="distinct"):
        ev.evaluate_methods([Unedited(), Unedited()], model, tok, records, progress=False)


def test_tables_and_files(model, tok, records, tmp_path):
    cases = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, records, progress=False)
    summary = ev.summarize(cases)
    assert summary.loc[("bias", "counterfact"), "n"] == 2
    assert summary.loc[("bias", "counterfact"), "reliability"] == pytest.approx(
        cases[(cases.method == "bias") & (cases.task == "counterfact")].reliability.mean())
    average = ev.average_over_tasks(summary)
    assert average.loc["bias", "locality"] == pytest.approx(summary.loc["bias"].locality.mean())
    paths = ev.write_results(cases, tmp_path, "run")
    assert len(pd.read_csv(paths["cases"])) == len(cases)
    data = json.loads(paths["summary"].read_text())
    assert data["bias"]["convsent"]["portability"] is None  # NaN becomes null, not invalid JSON
    assert data["bias"]["counterfact"]["reliability"] == pytest.approx(summary.loc[("bias", "counterfact"), "reliability"])


def test_paired_difference_and_its_interval():
    rows = []
    for task in ("a", "b"):
        for case in range(40):
            rows.append({"method": "x", "task": task, "case": case, "reliability": 1.0 if case % 2 else 0.5})
            rows.append({"method": "y", "task": task, "case": case, "reliability": 0.5})
    cases = pd.DataFrame(rows)
    result = ev.paired_difference(cases, "x", "y", tasks=["a", "b"])
    assert result["difference"] == pytest.approx(0.25)
    assert result["low"] < 0.25 < result["high"] and result["high"] - result["low"] < 0.2
    same = ev.paired_difference(cases, "y", "y")
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="same a cases"):
        ev.paired_difference(cases[~((cases.method == "y") & (cases.case == 0))], "x", "y")


def test_paired_difference_pairs_records_that_share_a_case_id():
    """ConvSent's two records of one topic (one per sentiment) share a case id: the n-th pairs with
    the n-th, so the difference is the plain mean difference, also when a topic has one record."""
    ids = [0, 0, 1, 1, 2]
    x, y = [1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0]
    cases = pd.DataFrame([{"method": m, "task": "convsent", "case": c, "reliability": v}
                          for m, values in (("x", x), ("y", y)) for c, v in zip(ids, values)])
    result = ev.paired_difference(cases, "x", "y")
    assert result["difference"] == pytest.approx(np.mean(np.subtract(x, y)))  # 0.2, not a cross-product mean
    assert result["low"] <= result["difference"] <= result["high"]


# --- generation success (greedy answers) and fluency text ------------------------------------


class ForwardOnly(torch.nn.Module):
    """A model seen only through ``forward(input_ids, attention_mask).logits`` (no ``generate``, no
    KV cache), like the frozen-prefix engine; its parameters are the model's."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    @property
    def lm_head(self):
        return self.inner.lm_head


def test_greedy_tokens_match_generate_on_a_ragged_batch(model, tok):
    prompts = ["Ada Brun was born in", "What do you think of the band Zorbi?", "Oslo"]
    ours = generation.greedy_tokens(model, tok, prompts, [5, 3, 4])
    for prompt, got in zip(prompts, ours):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(got),
                             min_new_tokens=len(got), do_sample=False, pad_token_id=0)
        assert got == out[0, ids.shape[1]:].tolist()


def test_answer_normalisation_and_prefix_check():
    assert generation.normalize('  "The  Hague",\n') == "the hague"
    assert generation.begins_with(" the hague is a city", ["The Hague"])
    assert generation.begins_with(" ...Paris, France", ["Lyon", "paris"])  # an alias
    assert not generation.begins_with(" in Paris", ["Paris"])  # must begin with the answer
    assert not generation.begins_with("", ["Paris"])


def test_generation_success_of_the_unedited_and_of_a_strong_edit(model, tok, records):
    recs = {"counterfact": [dataclasses.replace(r, target_new="great") for r in records["counterfact"]],
            "convsent": records["convsent"]}
    cases = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, recs, progress=False).set_index("method")
    facts, sent = cases[cases.task == "counterfact"], cases[cases.task == "convsent"]
    assert sent[list(ev.GEN_METRICS)].isna().all().all()  # ConvSent: not defined
    assert (facts.loc["base model", "gen_locality"] == 1.0).all()  # nothing changed
    assert (facts.loc["base model", "gen_reliability"] == 0.0).all()  # a random model does not say "great"
    assert (facts.loc["bias", "gen_reliability"] == 1.0).all()
    assert (facts.loc["bias", "gen_generalization"] == 1.0).all()
    assert (facts.loc["bias", "gen_locality"] < 1.0).all()  # it says "great" everywhere
    # a greedy answer with the target's tokens is a teacher-forced exact match
    assert (facts.gen_reliability >= facts.reliability_em).all()


@contextlib.contextmanager
def logits_shifted_by_input(model, bias):
    """Hooks that add ``bias(input_ids, vocab size)`` to the model's logits at every position (a
    hook-based edit that sees the whole sequence, as the evaluation decodes such edits)."""
    seen = {}

    def keep_ids(module, args, kwargs):
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def shift(module, inputs, out):
        return out + bias(seen["ids"], out.shape[-1])

    handles = [model.register_forward_pre_hook(keep_ids, with_kwargs=True),
               model.lm_head.register_forward_hook(shift)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class SecondTokenOnly(Editor):
    """Makes the target's second token the argmax right after its first one, and nothing else: the
    teacher-forced score gives half credit, the model never says the answer."""

    name = "second token"

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        first, second = tokenizer(" " + record.target_new, add_special_tokens=False)["input_ids"][:2]

        def bias(ids, vocab):
            to_second = torch.zeros(vocab)
            to_second[second] = 100.0
            return (ids == first).float()[..., None] * to_second

        with logits_shifted_by_input(model, bias):
            yield EditInfo()


def test_teacher_forcing_flatters_and_generation_does_not(model, tok, records):
    rec = dataclasses.replace(records["counterfact"][0], target_new="is great")
    assert len(tok(" is great", add_special_tokens=False)["input_ids"]) == 2
    case = ev.evaluate_case(SecondTokenOnly(), model, tok, rec)
    assert case["reliability"] == 0.5 and case["reliability_em"] == 0.0
    assert case["gen_reliability"] == 0.0


def test_generation_goes_through_the_models_forward(model, tok, records):
    """A forward-only wrapper (as the engine is) gives the same scores as the model itself."""
    recs = {"counterfact": records["counterfact"]}
    kwargs = dict(fluency_cases=1, fluency_tokens=12, progress=False)
    plain = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, recs, **kwargs)
    wrapped = ev.evaluate_methods([Unedited(), TargetBias()], ForwardOnly(model), tok, recs, **kwargs)
    columns = list(ev.METRICS)
    pd.testing.assert_frame_equal(plain[columns], wrapped[columns])
    assert plain.generated.tolist()[:2] == wrapped.generated.tolist()[:2]


def test_generation_can_be_turned_off(model, tok, records):
    cases = ev.evaluate_methods([Unedited()], model, tok, {"zsre": records["zsre"]}, generation=False,
                                progress=False)
    assert cases[list(ev.GEN_METRICS)].isna().all().all()
    assert set(ev.GEN_METRICS) <= set(ev.summarize(cases).columns)


def test_fluency_defaults_to_easyedit_sampling_seeded_per_case(model, tok, records):
    recs = {"counterfact": records["counterfact"][:1]}
    one = ev.evaluate_methods([Unedited()], model, tok, recs, fluency_cases=1, fluency_tokens=30, progress=False)
    two = ev.evaluate_methods([Unedited()], model, tok, recs, fluency_cases=1, fluency_tokens=30, progress=False)
    other = ev.evaluate_methods([Unedited()], model, tok, recs, fluency_cases=1, fluency_tokens=30, seed=1,
                                progress=False)
    text = one.generated[0]
    prompt = records["counterfact"][0].prompt
    assert text.startswith(prompt)  # the prompt is part of the scored text, as in generate_fast
    assert one.fluency[0] == metrics.fluency_easyedit(text)
    assert two.generated[0] == text  # seeded: a rerun agrees
    assert other.generated[0] != text  # ... and the seed is used
    greedy = ev.evaluate_methods([Unedited()], model, tok, recs, fluency_cases=1, fluency_tokens=30,
                                 fluency="greedy", progress=False)
    assert greedy.generated[0] == sampling.greedy_text(model, tok, prompt, 30)
    assert greedy.fluency[0] == metrics.fluency(greedy.generated[0])
    with pytest.raises(ValueError, match="fluency must be one of"):
        ev.evaluate_methods([Unedited()], model, tok, recs, fluency="nucleus", progress=False)


def test_top_k_one_sampling_is_greedy_and_a_long_prompt_gets_no_text(model, tok):
    prompt = "Ada Brun was born in"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    sampled = sampling.sample_text(model, tok, prompt, max_out_len=n_prompt + 6, top_k=1)
    assert sampled == prompt + sampling.greedy_text(model, tok, prompt, 6)
    assert sampling.sample_text(model, tok, prompt, max_out_len=n_prompt) == prompt  # as generate_fast


def test_an_answer_is_decided_only_when_more_text_cannot_change_it():
    assert generation.decided(" Paris is", ["Paris"])  # begins with the answer: success for good
    assert generation.decided(" in the", ["Paris", "Lyon"])  # left every answer: failure for good
    assert not generation.decided(" Par", ["Paris"]) and not generation.decided(" ", ["Paris"])
    assert not generation.decided(" Z\ufffd", ["Zürich"])  # half a character: wait for the rest


def test_stopping_early_gives_the_same_generation_success(model, tok, records):
    """Decoding stops once an answer is decided; the success is the one of the full-length answer."""
    for method in (Unedited(), TargetBias()):
        for rec in (records["counterfact"] + records["zsre"]):
            rec = method.prepare(dataclasses.replace(rec, target_new="great") if rec.index % 2 else rec)
            rows = answers.gen_rows(rec)
            counts = [max(answers.answer_tokens(tok, a) for a in ans) + answers.GEN_EXTRA_TOKENS for _, _, ans in rows]
            with method.edited(model, tok, rec):
                full = generation.greedy_tokens(model, tok, [p for _, p, _ in rows], counts)
                scores = answers.gen_scores(model, tok, rec, None)
            for kind in ("reliability", "generalization", "portability"):
                hits = [generation.begins_with(answers.answer_text(tok, ids), ans)
                        for (k, _, ans), ids in zip(rows, full) if k == kind]
                assert scores[f"gen_{kind}"] == pytest.approx(sum(hits) / len(hits))


def test_sampled_text_is_the_same_with_and_without_the_kv_cache(model, tok):
    prompt = "What do you think of the band Zorbi?"
    texts = [sampling.sample_text(model, tok, prompt, max_out_len=40, generator=torch.Generator().manual_seed(3),
                                    use_cache=cache) for cache in (True, False)]
    assert texts[0] == texts[1]
    assert generation._kv_cache_is_exact(model) and not generation._kv_cache_is_exact(ForwardOnly(model))
    with TargetBias().edited(model, tok, hand_records(n=1)["counterfact"][0]):  # a hook: no cache
        assert not generation._kv_cache_is_exact(model)


@pytest.mark.parametrize("name", ["GRACE", "CaliNet"])
def test_a_position_wise_hook_keeps_the_kv_cache_and_its_answers(model, tok, name):
    """GRACE's codebook and CaliNet's slots change a position from its own input only: decoding
    through them keeps the KV cache, and the cached answers are the full forward passes' ones."""
    from instructedit_lite.editors.baselines import make_baseline

    record = hand_records(n=1)["counterfact"][0]
    prompts = [record.prompt, *record.rephrase, "Ada Brun was born in"]
    method = make_baseline(name, **({"n_iter": 20} if name == "GRACE" else {"steps": 20}))
    with method.edited(model, tok, record):
        assert generation._kv_cache_is_exact(model)
        cached = generation.greedy_tokens(model, tok, prompts, 8)
        full = generation.greedy_tokens(model, tok, prompts, 8, use_cache=False)
        unmarked = model.transformer.h[0].register_forward_hook(lambda m, i, o: None)
        try:  # any other hook may look along the sequence: full forward passes
            assert not generation._kv_cache_is_exact(model)
        finally:
            unmarked.remove()
    assert cached == full
    assert generation._kv_cache_is_exact(model)


def test_greedy_text_is_the_same_with_and_without_the_kv_cache(model, tok):
    prompt = "Ada Brun was born in"
    assert sampling.greedy_text(model, tok, prompt, 20, use_cache=True) == sampling.greedy_text(
        model, tok, prompt, 20, use_cache=False)
    tokens = generation.greedy_tokens(model, tok, [prompt], 5)[0]
    assert sampling.greedy_text(model, tok, prompt, 5) == tok.decode(tokens)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_equals_full_passes_on_a_ragged_batch(tok, arch):
    """The KV-cached batch (right padding left in the cache, masked; per-row position ids) gives
    the tokens of full forward passes, for GPT-2's absolute and LLaMA's rotary positions."""
    if arch == "gpt2":
        net = tiny_model(tok, seed=2)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        net = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=256)).eval()
    prompts = ["Ada Brun was born in", "What do you think of the band Zorbi? I", "Oslo", "Cy Lorm works as a"]
    cached = generation.greedy_tokens(net, tok, prompts, [6, 3, 5, 4], use_cache=True)
    full = generation.greedy_tokens(net, tok, prompts, [6, 3, 5, 4], use_cache=False)
    assert cached == full and [len(c) for c in cached] == [6, 3, 5, 4]
    one_by_one = [generation.greedy_tokens(net, tok, [p], n, use_cache=False)[0] for p, n in zip(prompts, [6, 3, 5, 4])]
    assert full == one_by_one  # the padding of a batch changes nothing


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_with_a_shared_prefix_read_it_once_and_decode_the_same(tok, arch, monkeypatch):
    """An in-context edit puts the same demonstrations before every probe: the cached decoding reads
    that prefix in one pass of one row and repeats its cache for every row; the tokens are those of
    full forward passes and of the unshared cache."""
    net = tiny_model(tok, seed=2) if arch == "gpt2" else tiny_decoder(tok, "llama", n_layer=2)
    context = "New Fact: Ada Brun was born in Oslo\nPrompt: Ada Brun was born in Oslo\n\n" * 3
    probes = ["Ada Brun was born in", "What do you think of the band Zorbi? I", "Oslo", "Cy Lorm works as a"]
    prompts = [context + "New Fact: Ada Brun was born in Oslo\nPrompt: " + p for p in probes]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    padded = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = torch.tensor(row)
    shared = generation.shared_prefix(padded, [len(r) for r in ids])
    assert shared >= 20 and all(r[:shared] == ids[0][:shared] for r in ids) and len({r[shared] for r in ids}) > 1
    assert generation.shared_prefix(padded[:1], [len(ids[0])]) == 0  # one row: nothing to share
    counts = [6, 3, 5, 4]
    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN", 10**6)
    unshared = generation.greedy_tokens(net, tok, prompts, counts, use_cache=True)
    monkeypatch.setattr(generation, "SHARED_PREFIX_MIN", 8)
    calls = []
    hook = net.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                         with_kwargs=True)
    try:
        cached = generation.greedy_tokens(net, tok, prompts, counts, use_cache=True)
    finally:
        hook.remove()
    assert calls[0] == (1, shared)  # the prefix, one row
    assert calls[1] == (len(prompts), padded.shape[1] - shared)  # then each row's own tokens
    full = generation.greedy_tokens(net, tok, prompts, counts, use_cache=False)
    assert cached == full == unshared


def test_generation_success_skips_prompts_longer_than_the_context():
    """An in-context edit can fill the context: its rows get None (scored NaN), the others are still decoded."""
    from instructedit_lite.generation import greedy_tokens_within

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    long_prompt = " ".join(["word"] * (model.config.n_positions - 1))
    out = greedy_tokens_within(model, tok, ["Ada Brun was born in", long_prompt], [3, 3])
    assert out[0] is not None and len(out[0]) == 3 and out[1] is None
    assert greedy_tokens_within(model, tok, [long_prompt], 3) == [None]


def test_generalization_ref_is_the_references_fallback_to_the_edit_prompt(model, tok, records):
    """Without a rephrase the reference scores the edit prompt, so its Generalization
    equals Reliability; ``generalization`` stays NaN, ``generalization_ref`` follows the reference."""
    with_rephrase = dataclasses.replace(records["counterfact"][0], target_new="great")  # one token
    without = dataclasses.replace(with_rephrase, rephrase=())
    bias = TargetBias()
    row = ev.evaluate_case(bias, model, tok, with_rephrase, generation=False)
    assert row["generalization_ref"] == row["generalization"]
    row = ev.evaluate_case(bias, model, tok, without, generation=False)
    assert math.isnan(row["generalization"])
    assert row["generalization_ref"] == row["reliability"] and row["reliability"] > 0.9


def test_worker_processes_give_the_same_table_row_for_row(model, tok, records):
    from instructedit_lite.editors.baselines import FTL, GRACE

    editor = MendEditor(model, MendConfig(rank=8, alpha_init=1.0), generator=torch.Generator().manual_seed(0))
    methods = [Unedited(), MendMethod(editor, "MEND"), FTL(steps=3), GRACE(n_iter=5)]
    kwargs = dict(fluency_cases=1, fluency_tokens=12, progress=False)
    one = ev.evaluate_methods(methods, model, tok, records, **kwargs)
    two = ev.evaluate_methods(methods, model, tok, records, processes=2, **kwargs)
    assert len(one) == sum(len(r) for r in records.values()) * len(methods)
    pd.testing.assert_frame_equal(one.drop(columns="edit_seconds"), two.drop(columns="edit_seconds"))


def test_a_plan_is_its_parts_tables_one_after_the_other_in_processes_or_not(model, tok, records, monkeypatch):
    """Two parts share records (as chapter 8's engines do): the plan's table is the concatenation
    of the parts' own tables, in one process or two, and the unedited model's locality answers are
    decoded once per record, not once per part."""
    from instructedit_lite.editors.baselines import FTL

    first = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, records, progress=False, wild_tokens=6)
    facts = {"counterfact": records["counterfact"]}
    second = ev.evaluate_methods([FTL(steps=3)], model, tok, facts, progress=False, wild_tokens=6)
    expected = pd.concat([first, second], ignore_index=True).drop(columns="edit_seconds")
    parts = [([Unedited(), TargetBias()], model, tok, records), ([FTL(steps=3)], model, tok, facts)]
    decoded = []
    real_answers = ev.locality_answers
    monkeypatch.setattr(ev, "locality_answers", lambda *a, **k: decoded.append(a[2]) or real_answers(*a, **k))
    one = ev.evaluate_plan(parts, progress=False, wild_tokens=6)
    fact_calls = [r for r in decoded if r.task == "counterfact"]  # (ConvSent has no answers to decode)
    assert len(fact_calls) == len(facts["counterfact"])  # once per record, though both parts read them
    pd.testing.assert_frame_equal(one.drop(columns="edit_seconds"), expected)
    monkeypatch.undo()
    two = ev.evaluate_plan(parts, progress=False, wild_tokens=6, processes=2)
    pd.testing.assert_frame_equal(two.drop(columns="edit_seconds"), expected)


def test_a_worker_receives_the_shared_arguments_once_and_keeps_them_between_jobs():
    from instructedit_lite.parallel import map_in_processes

    out = map_in_processes(_append_to_shared, [(1,), (2,), (3,)], 1, progress=False, shared=([],))
    assert out == [[1], [1, 2], [1, 2, 3]]  # one worker, one list, in the order given
    assert map_in_processes(_append_to_shared, [(5,)], 1, progress=False, shared=([0],)) == [[0, 5]]


def _append_to_shared(seen: list, x: int) -> list:
    seen.append(x)
    return list(seen)


def test_wild_answers_are_cut_at_a_stop_and_matched_after_normalisation():
    assert generation.wild_answer(" Paris. It is a city") == "Paris"
    assert generation.wild_answer(" the Eiffel\nTower") == "the Eiffel"
    assert generation.wild_answer(" St. Louis") == "St"  # any "." stops, as in the reference
    assert generation.answer_normalize(' "The  Hague"!') == "hague"  # SQuAD: articles and punctuation go
    assert generation.exact_answer("the Hague", ["Hague"]) and not generation.exact_answer("Hague, city", ["Hague"])
    assert generation.contains_answer("born in Paris", ["Paris"]) and not generation.contains_answer("Parisian", ["Paris"])
    assert not generation.exact_answer("", [""])


class SaysTarget(Editor):
    """Makes the model say the target after any prompt; ``stop``: and then a full stop (the tokens
    after the target's last one favour "."), else the target again and again."""

    def __init__(self, stop: bool):
        self.stop, self.name = stop, "says target, stops" if stop else "says target, rambles"

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        target = tokenizer(" " + record.target_new, add_special_tokens=False)["input_ids"]
        period = tokenizer(".", add_special_tokens=False)["input_ids"][0]

        def bias(ids, vocab):
            last = (ids == target[-1])[..., None].float() if self.stop else 0.0
            to_target, to_period = torch.zeros(vocab), torch.zeros(vocab)
            to_target[target[0]], to_period[period] = 100.0, 200.0
            return to_target + last * to_period

        with logits_shifted_by_input(model, bias):
            yield EditInfo()


def test_wild_counts_an_answer_only_when_the_model_stops_after_it(model, tok, records):
    recs = {"counterfact": [dataclasses.replace(r, target_new="great") for r in records["counterfact"]],
            "convsent": records["convsent"]}
    assert len(tok(" great", add_special_tokens=False)["input_ids"]) == 1
    cases = ev.evaluate_methods([Unedited(), SaysTarget(stop=True), SaysTarget(stop=False)], model, tok, recs,
                                progress=False).set_index("method")
    facts, sent = cases[cases.task == "counterfact"], cases[cases.task == "convsent"]
    assert sent[list(ev.WILD_METRICS)].isna().all().all()  # ConvSent: not defined
    assert (facts.loc["base model", "wild_locality"] == 1.0).all()  # nothing changed
    assert (facts.loc["base model", "wild_reliability"] == 0.0).all()
    stops, rambles = facts.loc["says target, stops"], facts.loc["says target, rambles"]
    assert (stops.wild_reliability == 1.0).all() and (stops.wild_answer == "great").all()
    # "great great great ...": the prefix check and the contains-match count it, WILD's exact match not
    assert (rambles.gen_reliability == 1.0).all() and (rambles.wild_contains_reliability == 1.0).all()
    assert (rambles.wild_reliability == 0.0).all()
    assert (rambles.wild_answer.str.split().str.len() == generation.WILD_MAX_TOKENS).all()  # it ran to the cap
    capped = ev.evaluate_methods([SaysTarget(stop=False)], model, tok, {"counterfact": recs["counterfact"]},
                                 wild_tokens=5, progress=False)
    assert (capped.wild_answer == " ".join(["great"] * 5)).all()


def test_wild_columns_follow_the_generation_switch(model, tok, records):
    cases = ev.evaluate_methods([Unedited()], model, tok, {"zsre": records["zsre"]}, generation=False,
                                progress=False)
    assert cases[list(ev.WILD_METRICS)].isna().all().all() and cases.wild_answer.isna().all()
    cases = ev.evaluate_methods([Unedited()], model, tok, {"zsre": records["zsre"]}, wild_tokens=0, progress=False)
    assert cases[list(ev.WILD_METRICS)].isna().all().all() and cases.gen_reliability.notna().all()


def test_a_changed_locality_answer_stops_at_its_first_new_token(model, tok, records):
    record = records["counterfact"][0]
    before = ev.locality_wild(model, tok, record, max_tokens=8)
    assert ev.locality_wild(model, tok, record, max_tokens=8, before=before) == before
    changed = [[t + 1 for t in ids] for ids in before]
    after = ev.locality_wild(model, tok, record, max_tokens=8, before=changed)
    assert all(len(ids) == 1 for ids in after)  # decided at the first token


@pytest.mark.parametrize("wild_tokens", [0, 6])
def test_one_decoding_gives_every_answer_column_of_the_separate_ones(model, tok, records, wild_tokens):
    """said_scores decodes each prompt of a case once and reads it as every view: the columns are
    those of gen_scores and wild_scores, each decoding on its own."""
    for method in (Unedited(), TargetBias()):
        for rec in records["counterfact"] + records["zsre"] + records["convsent"][:1]:
            pre_greedy, pre_wild = answers.locality_answers(model, tok, rec, max_tokens=wild_tokens)
            assert pre_greedy == answers.locality_greedy(model, tok, rec)
            assert pre_wild == (answers.locality_wild(model, tok, rec, max_tokens=wild_tokens) if wild_tokens else None)
            prepared = method.prepare(rec)
            with method.edited(model, tok, prepared):
                gen, wild, said = answers.said_scores(model, tok, prepared, pre_greedy, pre_wild, wild_tokens)
                alone = answers.gen_scores(model, tok, prepared, pre_greedy)
                wild_alone, said_alone = (answers.wild_scores(model, tok, prepared, pre_wild, wild_tokens) if wild_tokens
                                          else (dict.fromkeys(ev.WILD_METRICS, float("nan")), None))
            assert pd.Series(gen).equals(pd.Series(alone)) and pd.Series(wild).equals(pd.Series(wild_alone))
            assert said == said_alone


def test_views_end_where_each_would_end_alone(model, tok):
    prompts = ["Ada Brun was born in", "The capital of Zorbi is"]
    full = generation.greedy_tokens(model, tok, prompts, 9)
    views = [[(3, None), (9, lambda ids: len(ids) == 5), (7, None)], [(2, None)]]
    found = generation.greedy_views(model, tok, prompts, views)
    assert found == [[full[0][:3], full[0][:5], full[0][:7]], [full[1][:2]]]
    too_long = [[(generation.context_limit(model), None), (1, None)]]
    assert generation.greedy_views(model, tok, prompts[:1], too_long) == [[None, full[0][:1]]]


def test_answer_views_put_the_three_views_side_by_side(model, tok, records):
    from instructedit_lite import tables

    cases = ev.evaluate_methods([Unedited()], model, tok, {"counterfact": records["counterfact"],
                                                           "convsent": records["convsent"][:1]},
                                wild_tokens=4, progress=False)
    side = tables.answer_views(tables.summarize(cases), ["counterfact"])
    assert list(side.columns[:5]) == [("reliability", "exact match"), ("reliability", "teacher-forced"),
                                      ("reliability", "prefix"), ("reliability", "WILD"), ("reliability", "WILD contains")]
    assert len(side.columns) == 5 + 3 * 3
    facts = cases[cases.task == "counterfact"]
    for (kind, view), column in ((("reliability", "WILD"), "wild_reliability"), (("locality", "prefix"), "gen_locality"),
                                 (("reliability", "exact match"), "reliability_em")):
        assert side.loc["base model", (kind, view)] == pytest.approx(facts[column].mean())
