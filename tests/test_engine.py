"""The frozen-prefix engine gives the plain model's logits, MEND edits, meta-losses and meta-gradients
(within float32 tolerance) on a tiny GPT-2 and tiny LLaMA, Mistral and Qwen2 models, and really skips
the lower blocks."""

import copy

import pytest
import torch
from tiny import DECODERS, convsent_record, fact_record, tiny_decoder, tiny_model, tiny_tokenizer

import instructedit_lite.train as tr
from instructedit_lite.engine import PrefixEngine, gather_positions, model_inputs, scored_batch
from instructedit_lite.instructions import default_instructions
from instructedit_lite.editors.mend import MendConfig, MendEditor, default_weight_names, lm_loss
from instructedit_lite.text import prompt_target_batch, shifted_predictions

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["gpt2", *DECODERS])
def setup(request, tokenizer):
    """(model, engine, weight names): edits in the top two of four blocks, so two are cached."""
    model = tiny_model(tokenizer, n_layer=4) if request.param == "gpt2" else tiny_decoder(tokenizer, request.param)
    names = default_weight_names(model, n_last=2)
    return model, PrefixEngine(model, names), names


def batch_of(tokenizer):
    prompts = ["Ada Brun was born in", "The birthplace of Bo Kest is", "Cy Lorm works as a"]
    return prompt_target_batch(tokenizer, prompts, ["Lima", "Oslo", "pilot"])


def random_editor(model, names, seed=0):
    """An editor whose networks are not the identity, so ΔW depends on them (not only on ∇W)."""
    editor = MendEditor(model, MendConfig(rank=4, weight_names=names), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in editor.network_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for a in editor.alpha_parameters():
            a.fill_(1e-2)
    return editor


def test_logits_equal_and_lower_blocks_run_once(setup, tokenizer):
    model, engine, _ = setup
    batch = batch_of(tokenizer)
    mask = batch["attention_mask"].bool()
    full = model(**model_inputs(batch)).logits
    calls = []
    block = engine.blocks[0]
    forward = block.forward  # counted by a wrapper: a hook below the cut is an error (see below)

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counted
    try:
        got = engine(**model_inputs(batch)).logits
        assert len(calls) == 1  # the one pass that filled the cache
        again = engine(**model_inputs(batch)).logits
        assert len(calls) == 1  # cached: the lower blocks never run again
    finally:
        del block.forward
    assert got.shape == full.shape
    torch.testing.assert_close(got[mask], full[mask], **TOL)
    torch.testing.assert_close(again, got)
    assert len(engine.cache) == 3
    # A row cached from one batch fits another batch with other padding.
    other = prompt_target_batch(tokenizer, ["Ada Brun was born in"], ["Lima"])
    torch.testing.assert_close(engine(**model_inputs(other)).logits[0], got[0, : other["input_ids"].shape[1]], **TOL)


def test_scored_positions_give_the_same_losses(setup, tokenizer):
    model, engine, _ = setup
    batch = batch_of(tokenizer)
    scored = scored_batch(batch)
    full = model(**model_inputs(batch)).logits
    compact = engine(**model_inputs(scored)).logits
    assert compact.shape[1] < full.shape[1]  # the LM head ran on fewer positions
    torch.testing.assert_close(compact[:, :-1], gather_positions(full, scored["positions"])[:, :-1], **TOL)
    torch.testing.assert_close(lm_loss(compact, scored["labels"]), lm_loss(full, batch["labels"]), **TOL)
    pred_c, mask_c = shifted_predictions(compact, scored["labels"])
    pred_f, mask_f = shifted_predictions(full, batch["labels"])
    assert mask_c.sum() == mask_f.sum()
    assert pred_c[mask_c].tolist() == pred_f[mask_f].tolist()


def test_scored_batch_layout():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, -100, -100, -100]])
    out = scored_batch({"input_ids": torch.zeros_like(labels), "labels": labels})
    assert out["positions"].tolist() == [[1, 2, 0], [0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 7, 8], [-100, 5, -100]]


@pytest.mark.parametrize("compact", [False, True])
def test_mend_edit_equal(setup, tokenizer, compact):
    model, engine, names = setup
    batch = batch_of(tokenizer)
    plain_editor = random_editor(model, names)
    engine_editor = copy.deepcopy(plain_editor)
    want = plain_editor.compute_deltas(model, batch)
    got = engine_editor.compute_deltas(engine, scored_batch(batch) if compact else batch)
    for name in names:
        assert want[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name], **TOL)
    # the running statistics saw the same rows
    for (k, a), b in zip(plain_editor.state_dict().items(), engine_editor.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=k)


def meta_step(model, editor, tokenizer, example, config):
    losses = tr.meta_losses(model, editor, tokenizer, example, config)
    losses["total"].backward()
    grads = {n: p.grad.clone() for n, p in editor.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_meta_losses_and_gradients_equal(setup, tokenizer, monkeypatch):
    """Through the engine, training batches carry scored positions (``train.losses._batch``)."""
    model, engine, names = setup
    model.requires_grad_(False)  # frozen, as train() does
    config = tr.TrainConfig(regime="instruct", n_responses=2, mend=MendConfig(rank=4, weight_names=names))
    instructions = default_instructions()
    for record in (fact_record("counterfact", 0), convsent_record(1)):
        example = tr.build_example(record, config, instructions=instructions)
        want_l, want_g = meta_step(model, random_editor(model, names), tokenizer, example, config)
        seen = []
        with monkeypatch.context() as mp:  # record that the engine path really is the compact one
            forward = engine.forward
            mp.setattr(engine, "forward", lambda *a, **k: seen.append("positions" in k) or forward(*a, **k))
            got_l, got_g = meta_step(engine, random_editor(model, names), tokenizer, example, config)
        assert seen and all(seen)
        for key in want_l:
            torch.testing.assert_close(got_l[key], want_l[key], **TOL, msg=key)
        assert want_g.keys() == got_g.keys() and len(want_g) > 0
        assert any(g.abs().sum() > 0 for g in want_g.values())
        for key in want_g:
            torch.testing.assert_close(got_g[key], want_g[key], rtol=1e-3, atol=1e-5, msg=key)


def test_errors_and_cache_file(setup, tokenizer, tmp_path):
    model, engine, names = setup
    with pytest.raises(ValueError, match="not inside a block"):
        PrefixEngine(model, names + ["lm_head.weight"])
    left = prompt_target_batch(tokenizer, ["Ada Brun was born in", "Bo"], ["Lima", "x"])
    left["attention_mask"] = left["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        engine(**model_inputs(left))
    batch = batch_of(tokenizer)
    engine(**model_inputs(batch))
    path = tmp_path / "prefix.pt"
    engine.cache.save(path)
    fresh = PrefixEngine(model, names)
    assert fresh.cache.load(path) == 3 and fresh.cache.nbytes == engine.cache.nbytes > 0
    torch.testing.assert_close(fresh(**model_inputs(batch)).logits, engine(**model_inputs(batch)).logits)
    other = PrefixEngine(model, names[-1:])  # another lowest block: another key
    assert other.cache_path() != engine.cache_path() == fresh.cache_path()
    with pytest.raises(ValueError, match="prefix.pt"):
        other.cache.load(path)


def test_shared_groups_split_sorted_rows_by_their_common_beginning():
    from instructedit_lite.engine import shared_groups

    rows = sorted([(1, 2, 3, 4, 5), (1, 2, 3, 4, 6, 7), (1, 2, 3, 9), (8, 8), (1, 2, 3, 4)])
    groups = shared_groups(rows, min_shared=3)
    assert [len(m) for _, m in groups] == [4, 1]
    shared, members = groups[0]
    assert shared == 3 and all(len(r) > shared for r in members)  # each row keeps a token of its own
    assert groups[1] == (0, [(8, 8)])
    assert [len(m) for _, m in shared_groups(rows, min_shared=0)] == [1] * 5  # 0: no sharing
    # a run stops where its shared part would fall below half: 3 of 12 tokens is too few
    long = sorted([(5, 5, 5, 7, 1), (5,) * 12 + (1,), (5,) * 12 + (2,)])
    assert [(s, len(m)) for s, m in shared_groups(long, 2)] == [(12, 2), (0, 1)]


@pytest.mark.parametrize("arch", ["gpt2", *DECODERS])
def test_shared_prefix_states_equal_the_plain_ones(arch, tokenizer):
    """Rows that share an instruction run it once; their cached states equal a plain pass's."""
    model = tiny_model(tokenizer, n_layer=4) if arch == "gpt2" else tiny_decoder(tokenizer, arch)
    names = default_weight_names(model, n_last=2)
    instruction = "Task: counterfact. Description: change the fact in the input to the new target. Input:"
    prompts = [f"{instruction} {p}" for p in ("Ada Brun was born in", "Bo Kest works as a", "Cy Lorm")]
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts + ["Dee Vo lives in"]]
    shared, plain = PrefixEngine(model, names, min_shared=4), PrefixEngine(model, names, min_shared=0)
    passes = []
    run_shared = shared._shared_past
    shared._shared_past = lambda tokens: passes.append(len(tokens)) or run_shared(tokens)
    assert shared.precompute(rows) == plain.precompute(rows) == 4
    assert len(passes) == 1 and passes[0] >= 10  # the instruction ran once, on its own
    assert shared.cache.rows.keys() == plain.cache.rows.keys()
    for key, states in plain.cache.rows.items():
        torch.testing.assert_close(shared.cache.rows[key], states, **TOL)
    # and the sharing really happened: the three instructed rows form one group
    from instructedit_lite.engine import shared_groups

    groups = shared_groups(sorted(tuple(r) for r in rows), 4)
    assert sorted(len(m) for _, m in groups) == [1, 3]


def test_evaluation_through_the_engine_scores_like_the_plain_model(setup, tokenizer):
    """Compact logits (the engine's) give every teacher-forced score of the full ones, for MEND and
    for KE (which reads the edit's tokens through the engine's input embedding)."""
    from tiny import convsent_record, fact_record

    from instructedit_lite.editors import MendMethod, Unedited
    from instructedit_lite.evaluate import evaluate_methods
    from instructedit_lite.editors.ke import KEConfig, KEEditor

    model, engine, names = setup
    ke = KEEditor(model, KEConfig(weight_names=names, lstm_hidden=8, condition_dim=16, head_hidden=8),
                  generator=torch.Generator().manual_seed(0))
    methods = [Unedited(), MendMethod(random_editor(model, names), "MEND"), MendMethod(ke.eval(), "KE")]
    records = [fact_record("counterfact", 0), fact_record("wikirecent", 1), convsent_record(0)]
    plain = evaluate_methods(methods, model, tokenizer, records, generation=False, progress=False)
    compact = evaluate_methods(methods, engine, tokenizer, records, generation=False, progress=False)
    columns = ["reliability", "token_accuracy", "portability", "locality", "drawdown"]
    assert (plain[["method", "task", "case"]].values == compact[["method", "task", "case"]].values).all()
    assert (plain.loc[plain.method != "base model", "locality"] < 1).any()  # the edits move something
    torch.testing.assert_close(torch.tensor(compact[columns].values), torch.tensor(plain[columns].values),
                               rtol=1e-4, atol=1e-5, equal_nan=True)


def test_a_weight_written_below_the_cut_empties_the_cache(setup, tokenizer):
    """Rows cached before an in-place write below the lowest edited block are not served after it,
    also when the write is undone (the version counter moved twice)."""
    model, engine, _ = setup
    batch = model_inputs(batch_of(tokenizer))
    mask = batch["attention_mask"].bool()  # padding positions are not defined through the engine
    engine(**batch)
    below = engine._below[-1][3]  # a parameter of the highest block below the cut
    original = below.detach().clone()
    with torch.no_grad():
        below.add_(0.5)
    torch.testing.assert_close(engine(**batch).logits[mask], model(**batch).logits[mask], **TOL)
    with torch.no_grad():
        below.copy_(original)
    torch.testing.assert_close(engine(**batch).logits[mask], model(**batch).logits[mask], **TOL)


def test_an_edit_or_hook_below_the_cut_is_an_error_naming_it(setup, tokenizer):
    model, engine, _ = setup
    batch = model_inputs(batch_of(tokenizer))
    name = engine._below[-1][0]
    replaced = {name: model.get_parameter(name).detach() + 1.0}
    with pytest.raises(RuntimeError, match=f"{name}.*was replaced"):
        torch.func.functional_call(engine, replaced, args=(), kwargs=batch)
    module = next(m for n, m in engine._below_modules if n.endswith(".mlp"))
    handle = module.register_forward_hook(lambda *args: None)
    try:
        with pytest.raises(RuntimeError, match=r"forward hook on .*\.mlp .*would never run"):
            engine(**batch)
    finally:
        handle.remove()
    engine(**batch)  # and without them it runs
