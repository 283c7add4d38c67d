"""IKE: demonstrations, retrieval without leaks, the context on every probe, no weight change."""

import numpy as np
import pytest
from tiny import fact_record, snapshot, tiny_model, tiny_tokenizer

from instructedit_lite.editors import check_restored
from instructedit_lite.editors.baselines import FTM
from instructedit_lite.editors.ike import (IKE, REFERENCE_MIX, Retriever, demonstrations, evaluate_in_context,
                                           fact_line, in_context_locality, query_sentence)
from instructedit_lite.editors.ike_costs import context_cost, context_mediation
from instructedit_lite.engine import PrefixEngine
from instructedit_lite.evaluate import locality_rows
from instructedit_lite.editors.mend import default_weight_names
from instructedit_lite.instructions import default_instructions


@pytest.fixture(scope="module")
def world():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    pool = [fact_record("counterfact", i, split="train") for i in range(8)]
    return tok, model, pool


def test_three_kinds_of_demonstrations(world):
    _, _, pool = world
    demos = demonstrations(pool[:2])
    r = pool[0]
    assert [d.kind for d in demos] == ["copy", "update", "retain", "retain"] * 2
    head = f"New Fact: {r.prompt} {r.target_new}\nPrompt: "
    assert demos[0].text == f"{head}{r.prompt} {r.target_new}\n\n"
    assert demos[1].text == f"{head}{r.rephrase[0]} {r.target_new}\n\n"
    probe = r.locality_probes[0]
    assert demos[2].text == f"{head}{probe.prompt} {probe.answer}\n\n"


def test_retrieval_never_leaks_the_test_fact(world):
    _, _, pool = world
    test = fact_record("zsre", 2)  # same subject (and fact) as pool[2]
    ike = IKE(pool, k=6, retriever="tfidf")
    # Without the filter the test subject's own demonstrations would be the nearest ones ...
    top = ike.retriever.search(query_sentence(test), 1)
    assert ike.demos[top[0]].subject == test.subject
    # ... with it, none of them is used, and the k slots are still filled from other edits.
    chosen = ike.retrieve(test)
    assert len(chosen) == 6
    assert all(d.subject != test.subject for d in chosen)
    for text in [test.prompt, fact_line(test), *test.rephrase]:
        assert all(text not in d.text for d in chosen)
    # A pool edit of another subject whose probe repeats the test prompt is filtered too.
    echo = fact_record("counterfact", 5, split="train")
    echo = type(echo).from_dict({**echo.to_dict(), "rephrase": [test.prompt]})
    assert not any(test.prompt in d.text for d in IKE([echo] + pool[3:], k=20, retriever="tfidf").retrieve(test))


def test_prepare_puts_the_context_before_every_probe(world):
    tok, _, pool = world
    test = fact_record("zsre", 2)
    ike = IKE(pool, k=3, retriever="tfidf")
    demos = ike.retrieve(test)
    rec = ike.prepare(test)
    context = "".join(d.text for d in reversed(demos)) + f"New Fact: {fact_line(test)}\nPrompt: "
    assert rec.prompt == context + test.prompt
    assert rec.rephrase == tuple(context + q for q in test.rephrase)
    assert [p.prompt for p in rec.locality_probes] == [context + p.prompt for p in test.locality_probes]
    assert [p.prompt for p in rec.portability_probes] == [context + p.prompt for p in test.portability_probes]
    assert rec.prompt.rstrip().endswith(demos[0].text.strip() + "\n\nNew Fact: " + fact_line(test) + "\nPrompt: " + test.prompt)
    # The budget drops the least similar demonstrations first.
    full = len(tok(rec.prompt + " " + test.target_new, add_special_tokens=False)["input_ids"])
    short = IKE(pool, k=3, retriever="tfidf", tokenizer=tok, max_tokens=full - 1).prepare(test)
    assert short.prompt.endswith(demos[0].text + f"New Fact: {fact_line(test)}\nPrompt: {test.prompt}")
    assert demos[-1].text not in short.prompt
    with pytest.raises(ValueError, match="hand/zsre/test, record 2, field 'prompt'"):
        IKE(pool, k=3, retriever="tfidf", tokenizer=tok, max_tokens=5).prepare(test)


def test_the_own_copy_demonstration_goes_next_to_the_query(world):
    """EasyEdit's IKE appends the test fact's own copy demonstration after the retrieved ones; it
    stays when demonstrations are dropped to fit."""
    tok, _, pool = world
    test = fact_record("zsre", 2)
    plain = IKE(pool, k=3, retriever="tfidf").prepare(test)
    own = f"New Fact: {fact_line(test)}\nPrompt: {fact_line(test)}\n\n"
    query = f"New Fact: {fact_line(test)}\nPrompt: {test.prompt}"
    with_own = IKE(pool, k=3, retriever="tfidf", own_copy=True).prepare(test)
    assert with_own.prompt == plain.prompt.removesuffix(query) + own + query
    bare = IKE(pool, k=0, retriever="tfidf", own_copy=True).prepare(test)  # the longest row decides
    rows = [(bare.prompt, test.target_new), *((q, test.target_new) for q in bare.rephrase)]
    rows += [(p.prompt, p.answers[0]) for p in bare.portability_probes + bare.locality_probes]
    rows += [(x, test.ground_truth[0]) for x in (bare.prompt, *bare.rephrase) if test.ground_truth]
    tight = max(len(tok(x + " " + a, add_special_tokens=False)["input_ids"]) for x, a in rows)
    alone = IKE(pool, k=3, retriever="tfidf", own_copy=True, tokenizer=tok, max_tokens=tight).prepare(test)
    assert alone.prompt == own + query  # every retrieved demonstration dropped, the own copy kept


def test_the_reference_mix_takes_each_kind_from_another_nearest_edit(world):
    """The original IKE: copy, update and retain demonstrations in fixed numbers, each from another
    of the pool edits nearest to the test fact, the nearest next to the query."""
    _, _, pool = world
    test = fact_record("zsre", 2)
    mix = {"copy": 1, "update": 2, "retain": 3}
    ike = IKE(pool, retriever="tfidf", mix=mix)
    assert ike.k == 6 and sum(REFERENCE_MIX.values()) == 32 and REFERENCE_MIX["update"] == 12
    chosen = ike.retrieve(test)
    assert {kind: sum(d.kind == kind for d in chosen) for kind in mix} == mix
    assert len({d.fact for d in chosen}) == 6 and all(d.subject != test.subject for d in chosen)
    # ordered by their edit's rank: the copy demonstrations' scores, best first
    scores = ike.retriever.scores(query_sentence(test))
    copy_score = {d.fact: scores[i] for i, d in enumerate(ike.demos) if d.kind == "copy"}
    assert [copy_score[d.fact] for d in chosen] == sorted((copy_score[d.fact] for d in chosen), reverse=True)
    # the six edits are the six nearest allowed ones
    nearest = sorted((f for f in copy_score if pool[2].prompt not in f), key=lambda f: -copy_score[f])[:6]
    assert {d.fact for d in chosen} == set(nearest)
    # an edit without a rephrase makes no update: a kind the pool cannot fill stays short
    bare = [type(r).from_dict({**r.to_dict(), "rephrase": []}) for r in pool[:6]]
    short = IKE(bare + pool[6:], retriever="tfidf", mix={"update": 4, "retain": 2}).retrieve(test)
    updates = [d for d in short if d.kind == "update"]
    assert len(updates) == 2 and {d.subject for d in updates} == {pool[6].subject, pool[7].subject}
    assert sum(d.kind == "retain" for d in short) == 2
    with pytest.raises(ValueError, match="mix must map kinds"):
        IKE(pool, retriever="tfidf", mix={"copy": 2, "paraphrase": 1})


def test_instruction_wraps_the_whole_input(world):
    _, _, pool = world
    test = fact_record("zsre", 2)
    rec = IKE(pool, k=2, retriever="tfidf", instructions=default_instructions()).prepare(test)
    assert rec.prompt.startswith("Task: zsre\nDescription: ") and "\nInput: New Fact: " in rec.prompt


def test_no_weight_changes_and_locality_taken_with_the_context(world):
    tok, model, pool = world
    before = snapshot(model)
    ike = IKE(pool, k=2, retriever="tfidf")
    tests = [fact_record("zsre", i) for i in (1, 2)]
    cases = evaluate_in_context([ike, FTM(steps=5)], model, tok, tests, progress=False)
    check_restored(model, before)
    ftm = cases[cases.method == "FT-M"]
    assert (ftm.locality == ftm.locality_plain).all()  # a weight editor keeps the standard measure
    cases = cases[cases.method == "IKE"]
    # Without the context the probes see the unchanged model: the plain measure cannot move ...
    assert (cases.locality_plain == 1.0).all()
    # ... with it, the random model's answers do change: the measure that counts for IKE.
    assert (cases.locality < 1.0).any() and (cases.drawdown > 0).all()
    agree, kl = in_context_locality(model, tok, tests[0], ike.prepare(tests[0]))
    assert cases.locality.iloc[0] == pytest.approx(agree) and cases.drawdown.iloc[0] == pytest.approx(kl)


def test_through_the_engine_a_case_reads_its_context_once_with_the_same_scores(world):
    tok, model, pool = world
    tiny = tiny_model(tok, n_layer=4)
    engine = PrefixEngine(tiny, default_weight_names(tiny, n_last=2))
    ike = IKE(pool, k=3, retriever="tfidf")
    tests = [fact_record("zsre", 1)]
    plain_rows = [p for p, _ in locality_rows(tests[0])] + [tests[0].prompt, *tests[0].rephrase]
    longest_plain = max(len(tok(p)["input_ids"]) for p in plain_rows) + 8
    passes = []  # the rows with the context computed below the edited blocks, per precompute call
    precompute = engine.precompute

    def counting(rows, **kw):
        passes.append(sum(len(r) > longest_plain and tuple(r) not in engine.cache for r in rows))
        return precompute(rows, **kw)

    engine.precompute = counting
    through = evaluate_in_context([ike], engine, tok, tests, progress=False, generation=False)
    plain = evaluate_in_context([ike], tiny, tok, tests, progress=False, generation=False)
    assert passes[0] > 1 and sum(passes[1:]) == 0  # every context row in the first call, none later
    columns = ["reliability", "generalization", "locality", "drawdown", "locality_plain"]
    assert np.allclose(through[columns].to_numpy(float), plain[columns].to_numpy(float), atol=1e-5, equal_nan=True)


def test_context_cost_grows_only_with_all_edits_in_context(world):
    tok, model, pool = world
    table = context_cost(model, tok, pool, stored=[1, 4, 8], k=2, max_tokens=100, retriever="tfidf")
    every = table[table["mode"] == "all"].set_index("stored_edits")
    near = table[table["mode"] == "retrieved"].set_index("stored_edits")
    assert every.context_tokens.is_monotonic_increasing and every.context_tokens[8] > 3 * every.context_tokens[1]
    assert near.context_tokens.max() < every.context_tokens[8]
    assert not every.fits[8] and np.isnan(every.seconds[8]) and near.fits.all()
    assert every.fact_in_context.all()


def test_context_mediation_rows(world):
    tok, model, pool = world
    records = [fact_record("zsre", 1), fact_record("wikirecent", 1)]  # WikiRecent has no old answer
    table = context_mediation(model, tok, IKE(pool, k=2, retriever="tfidf"), records)
    assert list(table.task) == ["zsre"]
    assert set(table.columns) >= {"knew_old", "still_old", "gives_new"}


def test_minilm_retriever_finds_the_paraphrase():
    sentences = ["The capital of France is Paris.", "Bananas are yellow fruit.", "The violin has four strings."]
    retriever = Retriever(sentences, "minilm")
    assert retriever.kind == "minilm"
    assert retriever.search("Which city is the French capital?", 1) == [0]
    assert retriever.search("How many strings does a violin have?", 2, allowed=np.array([True, True, False]))[0] != 2
    assert np.allclose(np.linalg.norm(retriever.embeddings, axis=1), 1.0, atol=1e-5)
