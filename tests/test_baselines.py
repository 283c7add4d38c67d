"""The baseline editors (FT-L, FT-M, GRACE, CaliNet) on the tiny random-init world of ``tiny.py``.

A random model knows nothing, so "the edit works" means: the target's log-prob / teacher-forced
accuracy on the edit prompt rises after the edit compared with before.  The fixture scales the tiny
model's (tied) token embeddings by 20: at GPT-2's init scale (std 0.02, n_embd 32) every logit is
within about ±0.6, so no edit could move a log-prob by more than about one nat and "raises the
target strongly" would be untestable; with std 0.4 the logits have a trained model's range.
"""

from dataclasses import replace

import pytest
import torch
from tiny import hand_records, snapshot, tiny_model, tiny_tokenizer

from instructedit_lite.editors.baselines import (BASELINES, FTL, FTM, GRACE, CaliNet, Codebook, FTLConfig, FTMConfig,
                                         last_prompt_position_nll, make_baseline, target_nll)
from instructedit_lite.editors import check_restored, edit_batch
from instructedit_lite.generation import kv_cache_argument
from instructedit_lite.editors.mend import lm_loss
from instructedit_lite.text import target_logprob, teacher_forced

# Settings that make each method move the tiny model visibly (FT-L's reference box is tiny).
STRONG = {"FT-L": {"eps": 0.05, "lr": 1e-2}, "FT-M": {"eps": 0.05, "lr": 1e-2}, "GRACE": {"eps_init": 0.1, "n_iter": 40},
          "CaliNet": {}}


@pytest.fixture(scope="module")
def world():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # tied with transformer.wte (see the module docstring)
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()
    return tok, model, hand_records()


def logits_of(model, tok, text):
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def grad_flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


# --- restore ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("task", ["counterfact", "convsent"])
def test_edit_is_visible_inside_and_exactly_undone_after(world, name, task):
    tok, model, records = world
    record = records[task][1]
    before, flags = snapshot(model), grad_flags(model)
    text = record.prompt + " " + record.target_new
    base = logits_of(model, tok, text)
    editor = make_baseline(name, **STRONG[name])
    assert editor.name == name
    with editor.edited(model, tok, record) as info:
        assert not torch.equal(logits_of(model, tok, text), base)  # the edit is carried inside
        assert info.seconds > 0
    check_restored(model, before)
    assert no_hooks(model)
    assert grad_flags(model) == flags
    assert torch.equal(logits_of(model, tok, text), base)


@pytest.mark.parametrize("name", BASELINES)
def test_restored_when_the_block_raises(world, name):
    tok, model, records = world
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with make_baseline(name, **STRONG[name]).edited(model, tok, records["zsre"][0]):
            raise RuntimeError("boom")
    check_restored(model, before)
    assert no_hooks(model)


# --- FT-L -------------------------------------------------------------------------------------


def test_ftl_stays_in_the_eps_box_and_touches_one_matrix_and_bias(world):
    tok, model, records = world
    eps = 1e-3
    editor = FTL(eps=eps, lr=1e-2, layer=1)
    deltas = editor.deltas(model, tok, records["counterfact"][0])
    assert set(deltas) == {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"}
    for name, delta in deltas.items():
        assert delta.shape == model.get_parameter(name).shape
        assert delta.abs().max() <= eps * (1 + 1e-4)
        assert delta.abs().max() >= 0.9 * eps  # lr 1e-2 pushes some elements to the wall
    before = snapshot(model)
    with editor.edited(model, tok, records["counterfact"][0]):
        for name, p in model.named_parameters():
            change = (p.detach() - before[name]).abs().max()
            assert change <= eps * (1 + 1e-4) if name in deltas else change == 0


def two_labelled_rows():
    """Random logits and labels of two rows with targets of 2 and 3 tokens, and the log-probabilities."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, -100, -100, 5, 6, 7]])
    return logits, labels, torch.log_softmax(logits, -1)


def test_ftl_loss_scores_every_target_token_at_the_last_prompt_position():
    logits, labels, logp = two_labelled_rows()
    # By hand: row 0's last prompt position is 1, row 1's is 2; per-row mean, then mean.
    expected = (-(logp[0, 1, 3] + logp[0, 1, 4]) / 2 - (logp[1, 2, 5] + logp[1, 2, 6] + logp[1, 2, 7]) / 3) / 2
    loss = last_prompt_position_nll(logits, labels)
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, lm_loss(logits, labels))  # not teacher forcing
    # Logits anywhere but the last prompt positions do not matter (they would for teacher forcing).
    other = logits.clone()
    other[0, 2:] = torch.randn(4, 11)
    other[1, 3:] = torch.randn(3, 11)
    assert torch.allclose(last_prompt_position_nll(other, labels), loss)
    assert not torch.allclose(lm_loss(other, labels), lm_loss(logits, labels))


def test_ftl_pushes_later_target_tokens_into_the_first_prediction(world):
    tok, model, records = world
    record = replace(records["counterfact"][2], target_new="Paris")  # 4 tokens in the tiny vocabulary
    batch = edit_batch(tok, record)
    last = int((batch["labels"][0] != -100).nonzero()[0]) - 1
    later = batch["labels"][0, last + 2:]  # target tokens 2..4

    def later_logp():  # log-prob of tokens 2..4 as the NEXT token after the prompt
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.log_softmax(logits[0, last], -1)[later].mean().item()

    base = later_logp()
    with FTL(eps=None, lr=1e-2, steps=25).edited(model, tok, record):
        ftl = later_logp()
    with FTM(eps=None, lr=1e-2, steps=25, layer=0).edited(model, tok, record):
        ftm = later_logp()
    assert ftl > base + 5  # FT-L's loss wants them right after the prompt ...
    assert ftl > ftm + 2   # ... teacher forcing wants them later, not here


# --- FT-M -------------------------------------------------------------------------------------


def test_ftm_has_ftl_configuration():
    """EasyEdit's FT-M is FT-L's hparams (layer 0, 25 steps, lr 5e-4, box 5e-4) with ``target_new``."""
    assert FTMConfig().to_dict() == FTLConfig().to_dict()
    assert FTM().config.layer == 0 and FTM().config.eps == 5e-4


def test_ftm_loss_is_teacher_forced_and_averaged_per_row():
    logits, labels, logp = two_labelled_rows()
    # Teacher forced: position t predicts label t+1; row means (2 and 3 tokens), then the mean of rows.
    expected = (-(logp[0, 1, 3] + logp[0, 2, 4]) / 2 - (logp[1, 2, 5] + logp[1, 3, 6] + logp[1, 4, 7]) / 3) / 2
    assert torch.allclose(target_nll(logits, labels), expected)
    assert not torch.allclose(lm_loss(logits, labels), expected)  # a token-pooled mean weighs row 1 more
    assert torch.equal(FTM().loss(logits, labels), target_nll(logits, labels))


def test_ftm_stops_on_the_loss_alone(world):
    """The reference stops once the loss is below 1e-2; it does not also ask for every argmax."""
    tok, model, records = world
    record = records["counterfact"][3]
    _, details = FTM(stop_loss=100.0).fit(model, tok, record)
    assert details["steps"] == 0
    assert not teacher_forced(model, tok, [record.prompt], [record.target_new]).exact_match[0]
    assert FTM(steps=3).fit(model, tok, record)[1]["steps"] == 3


def test_ftm_raises_the_target_strongly(world):
    tok, model, records = world
    record = records["counterfact"][3]
    before = target_logprob(model, tok, [record.prompt], [record.target_new])[0]
    with FTM(eps=None, lr=5e-3, steps=20, layer=-1).edited(model, tok, record) as info:
        after = target_logprob(model, tok, [record.prompt], [record.target_new])[0]
    assert after > before + 6  # −12.5 → −2.7 here
    assert info.details["steps"] <= 20
    with FTM(lr=2e-2, eps=None, layer=-1, steps=20).edited(model, tok, record):  # fits the tiny model fully
        assert teacher_forced(model, tok, [record.prompt], [record.target_new]).exact_match[0]


def test_ftm_eps_constraint_is_respected(world):
    tok, model, records = world
    deltas = FTM(eps=2e-3, lr=1e-2).deltas(model, tok, records["zsre"][1])
    assert max(d.abs().max().item() for d in deltas.values()) <= 2e-3 * (1 + 1e-4)


# --- GRACE ------------------------------------------------------------------------------------


def module_inputs(model, tok, module, text):
    """The input of ``module`` at every position of ``text``: (T, d_in)."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(i[0][0]))
    try:
        logits_of(model, tok, text)
    finally:
        handle.remove()
    return seen[0]


def test_grace_wraps_the_activation_input_at_the_reference_depth():
    """EasyEdit wraps GPT2-XL's ``transformer.h[35].mlp.c_fc`` (of 48): the same relative depth
    on any depth, and the activation's input of the architecture profile (LLaMA: gate_proj)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def gpt2(n):
        return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=n, n_head=2, n_positions=8))

    assert GRACE().module_name(gpt2(48)) == "transformer.h.35.mlp.c_fc"
    assert GRACE().module_name(gpt2(4)) == "transformer.h.2.mlp.c_fc"  # the embedded model's depth
    assert GRACE().module_name(gpt2(1)) == "transformer.h.0.mlp.c_fc"
    assert GRACE(layer=-1).module_name(gpt2(4)) == "transformer.h.3.mlp.c_fc"
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=32,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8))
    assert GRACE().module_name(llama) == "model.layers.23.mlp.gate_proj"


def test_grace_new_value_starts_cold_and_seeded(world):
    tok, model, records = world
    record, other = records["counterfact"][0], records["counterfact"][1]
    output = GRACE().key(model, tok, record)[1]
    values = []
    for seed, rec in ((0, record), (0, record), (1, record), (0, other)):
        grace = GRACE(n_iter=0, seed=seed)
        grace.add_edit(model, tok, rec)
        values.append(grace.codebook.values[0])
    assert values[0].shape == output.shape == (128,)  # c_fc's output: 4 × n_embd
    assert ((values[0] >= 0) & (values[0] < 1)).all() and values[0].std() > 0.2  # uniform [0, 1)
    assert torch.equal(values[0], values[1])  # reruns agree
    assert not torch.equal(values[0], values[2]) and not torch.equal(values[0], values[3])
    warm = GRACE(n_iter=0, init="warm")
    warm.add_edit(model, tok, record)
    assert torch.equal(warm.codebook.values[0], output)


def test_grace_runs_n_iter_steps_unless_a_stop_loss_is_given(world):
    tok, model, records = world
    record = replace(records["counterfact"][0], target_new="great")
    assert GRACE(n_iter=7, stop_loss=None).add_edit(model, tok, record)["steps"] == 7  # reference: never early
    early = GRACE(n_iter=7, stop_loss=1e3)  # stops once the target is the argmax (loss < 1e3 always)
    steps = early.add_edit(model, tok, record)["steps"]
    with early.hooked(model):
        assert 0 < steps < 7 and teacher_forced(model, tok, [record.prompt], [record.target_new]).exact_match[0]


def test_grace_leaves_other_prompts_bit_identical_and_produces_the_target(world):
    tok, model, records = world
    # One-token target: in a random model, one replaced vector cannot spell a multi-token word.
    record, other = replace(records["counterfact"][0], target_new="great"), records["counterfact"][1]
    unrelated = [other.prompt + " " + other.target_new, "Cy Lorm works as a nurse."]
    base = [logits_of(model, tok, t) for t in unrelated]
    before = teacher_forced(model, tok, [record.prompt], [record.target_new]).exact_match[0]
    editor = GRACE()
    key = editor.key(model, tok, record)[0]
    module = editor.module(model)
    nearest = min((module_inputs(model, tok, module, t) - key).norm(dim=-1).min().item() for t in unrelated)
    editor = GRACE(eps_init=nearest / 2, n_iter=50)
    with editor.edited(model, tok, record) as info:
        assert info.details["triggered"] and info.details["action"] == "add"
        assert teacher_forced(model, tok, [record.prompt], [record.target_new]).exact_match[0]
        for text, logits in zip(unrelated, base):
            assert torch.equal(logits_of(model, tok, text), logits)
            assert (editor.codebook.last_entry == -1).all()
        # The edit prompt triggers at its last token only (replace_last).
        logits_of(model, tok, record.prompt)
        n_prompt = len(tok(record.prompt, add_special_tokens=False)["input_ids"])
        assert editor.codebook.last_entry[0].tolist() == [-1] * (n_prompt - 1) + [0]
    assert not before
    assert len(editor.codebook) == 0  # fresh codebook per test case


def test_grace_hook_replaces_only_where_the_input_is_within_a_radius():
    book = Codebook()
    book.keys, book.values, book.eps, book.labels = ([torch.zeros(3), torch.full((3,), 9.0)],
                                                     [torch.full((2,), 7.0), torch.full((2,), -1.0)],
                                                     [0.5, 0.5], ["x", "y"])
    x = torch.tensor([[[5.0, 0, 0], [0.1, 0, 0], [5.0, 5, 5], [9.0, 9, 9.2]],
                      [[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]]])
    out = torch.arange(16.0).reshape(2, 4, 2)
    new = book.hook(None, (x,), out)
    assert (new[0, 1] == 7).all() and (new[0, 3] == -1).all()  # each position: its own key's value
    assert torch.equal(new[0, [0, 2]], out[0, [0, 2]])  # not "from the first trigger on"
    assert torch.equal(new[1], out[1])  # never within ε: untouched
    assert book.last_entry.tolist() == [[-1, 0, -1, 1], [-1, -1, -1, -1]]
    assert book.hook(None, (x[1:],), out[1:]) is None  # nothing triggers: output left alone


def test_grace_generation_is_the_same_with_and_without_the_kv_cache(world):
    """Fluency is scored on ``model.generate`` (KV cache on): it must carry the edit that is scored."""
    tok, model, records = world
    record = replace(records["counterfact"][2], target_new="Paris")
    prompt = tok(record.prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tok(record.prompt + " Paris and then", add_special_tokens=False)["input_ids"]])

    def generate(use_cache):
        p = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False, pad_token_id=0, use_cache=use_cache)
        return out[0, len(prompt):].tolist()

    base = generate(True)
    with GRACE(eps_init=0.1, n_iter=50).edited(model, tok, record), torch.no_grad():
        cached, full = generate(True), generate(False)
        # Token by token through the cache gives the logits of one full-sequence forward.
        whole = model(input_ids=ids).logits
        step = model(input_ids=ids[:, :len(prompt)], use_cache=True)
        logits, past = [step.logits], step.past_key_values
        for t in range(len(prompt), ids.shape[1]):
            step = model(input_ids=ids[:, t:t + 1], use_cache=True, **{kv_cache_argument(model): past})
            logits.append(step.logits)
            past = step.past_key_values
    torch.testing.assert_close(torch.cat(logits, 1), whole, atol=1e-4, rtol=1e-4)
    assert cached == full
    assert cached != base and cached[0] == tok(" Paris", add_special_tokens=False)["input_ids"][0]


def test_grace_expand_split_and_add_rules(world):
    tok, model, records = world
    # One-token targets (see above); a and b want different ones.
    a = replace(records["counterfact"][0], target_new="great")
    b = replace(records["counterfact"][1], target_new="love")
    probe = GRACE()
    d = (probe.key(model, tok, a)[0] - probe.key(model, tok, b)[0]).norm().item()
    assert d > 0.01

    # Same label, overlapping balls -> expand: one entry whose radius now covers b's key.
    grace = GRACE(eps_init=0.75 * d, n_iter=25)
    assert grace.add_edit(model, tok, a)["action"] == "add"
    details = grace.add_edit(model, tok, replace(b, target_new=a.target_new))
    assert details["action"] == "expand" and len(grace.codebook) == 1
    assert grace.codebook.eps[0] == pytest.approx(d, rel=1e-3) and grace.codebook.eps[0] >= d
    assert details["triggered"]

    # Conflicting label -> split: two entries, both radii d/2; each prompt gets its own target.
    grace.reset()
    grace.add_edit(model, tok, a)
    details = grace.add_edit(model, tok, b)
    assert details["action"] == "split" and len(grace.codebook) == 2
    assert grace.codebook.eps == pytest.approx([d / 2, d / 2], rel=1e-5)
    assert grace.codebook.labels == [a.target_new, b.target_new]
    with grace.hooked(model):
        hits = teacher_forced(model, tok, [a.prompt, b.prompt], [a.target_new, b.target_new]).exact_match
    assert hits == [True, True]
    assert no_hooks(model)

    # Far apart (no overlap) -> add; the same key with a new label -> overwrite, with a new value.
    far = GRACE(eps_init=0.1 * d, n_iter=5)
    far.add_edit(model, tok, a)
    assert far.add_edit(model, tok, b)["action"] == "add"
    assert far.codebook.eps == [0.1 * d, 0.1 * d]
    trained = far.codebook.values[0]
    assert far.add_edit(model, tok, replace(a, target_new="hate"))["action"] == "overwrite"
    assert len(far.codebook) == 2 and far.codebook.labels[0] == "hate"
    assert not torch.equal(far.codebook.values[0], trained)


def test_grace_entry_firing_on_an_earlier_token_does_not_shadow_the_edit(world):
    tok, model, records = world
    record = replace(records["counterfact"][1], target_new="love")
    grace = GRACE(eps_init=1e-3, n_iter=30)
    first_token_input = module_inputs(model, tok, grace.module(model), record.prompt)[0]
    book = grace.codebook  # an entry that fires on the prompt's FIRST token
    book.keys, book.values, book.eps, book.labels = [first_token_input], [torch.zeros(128)], [1e-3], ["x"]
    details = grace.add_edit(model, tok, record)
    assert details["action"] == "add" and details["triggered"] and details["steps"] == 30
    with grace.hooked(model):
        assert teacher_forced(model, tok, [record.prompt], [record.target_new]).exact_match[0]
        n_prompt = len(tok(record.prompt, add_special_tokens=False)["input_ids"])
        assert book.last_entry[0, 0] == 0 and book.last_entry[0, n_prompt - 1] == 1


# --- CaliNet ----------------------------------------------------------------------------------


def test_calinet_untrained_memory_is_an_identity(world):
    tok, model, records = world
    record = records["convsent"][0]
    text = record.prompt + " " + record.target_new
    base = logits_of(model, tok, text)
    calinet = CaliNet(steps=0)
    keys, values = calinet.memory(model.config.hidden_size, "cpu")
    assert keys.shape == (64, 32) and values.shape == (32, 64) and not values.any() and keys.any()
    with calinet.edited(model, tok, record) as info:
        assert info.details["steps"] == 0
        assert torch.equal(logits_of(model, tok, text), base)
        assert model.transformer.h[-1].mlp._forward_hooks  # the memory is really there


def test_calinet_raises_the_target(world):
    tok, model, records = world
    record = records["zsre"][2]
    before = target_logprob(model, tok, [record.prompt], [record.target_new])[0]
    with CaliNet().edited(model, tok, record):
        after = target_logprob(model, tok, [record.prompt], [record.target_new])[0]
    assert after > before + 3 and after > -0.5


# --- determinism and configuration ------------------------------------------------------------


@pytest.mark.parametrize("cls", [FTL, FTM])
def test_weight_editors_are_deterministic(world, cls):
    tok, model, records = world
    one = cls(lr=1e-2).deltas(model, tok, records["convsent"][2])
    two = cls(lr=1e-2).deltas(model, tok, records["convsent"][2])
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert any(v.abs().max() > 0 for v in one.values())


@pytest.mark.parametrize("name", ["GRACE", "CaliNet"])
def test_hook_editors_are_deterministic(world, name):
    tok, model, records = world
    record = records["counterfact"][2]
    text = record.prompt + " " + record.target_new
    results = []
    for _ in range(2):
        with make_baseline(name, **STRONG[name]).edited(model, tok, record):
            results.append(logits_of(model, tok, text))
    assert torch.equal(results[0], results[1])
    with make_baseline("CaliNet", seed=1).edited(model, tok, record):
        assert name == "GRACE" or not torch.equal(logits_of(model, tok, text), results[0])


@pytest.mark.parametrize("make, match", [
    (lambda: FTL(steps=-1), "FTLConfig.steps"),
    (lambda: FTL(lr=0), "FTLConfig.lr"),
    (lambda: FTM(eps=-1.0), "FTMConfig.eps"),
    (lambda: FTL(layer="0"), "FTLConfig.layer"),
    (lambda: FTL(module="transformer.h.0.mlp.c_proj"), "FTLConfig.module"),
    (lambda: FTL(bogus=1), "unknown option"),
    (lambda: GRACE(eps_init=0), "GRACEConfig.eps_init"),
    (lambda: GRACE(n_iter=-2), "GRACEConfig.n_iter"),
    (lambda: GRACE(init="hot"), "GRACEConfig.init"),
    (lambda: GRACE(depth=1.0), "GRACEConfig.depth"),
    (lambda: GRACE(layer="2"), "GRACEConfig.layer"),
    (lambda: CaliNet(n_slots=0), "CaliNetConfig.n_slots"),
    (lambda: CaliNet(activation="tanh"), "CaliNetConfig.activation"),
    (lambda: make_baseline("ROME"), "unknown method"),
])
def test_bad_config_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("editor, match", [
    (FTL(layer=3), r"FTL.layer=3: the model has 3 blocks"),
    (FTM(layer=-4), r"FTM.layer=-4"),
    (FTL(module="transformer.h.{layer}.mlp.nope"), "no module 'transformer.h.0.mlp.nope'"),
    (GRACE(module="transformer.h.{layer}.mlp"), "GRACE.module"),  # not a Linear/Conv1D
    (CaliNet(module="transformer.x.{layer}.mlp"), "CaliNet.module"),
])
def test_unknown_modules_and_layers_are_named(world, editor, match):
    tok, model, records = world
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        with editor.edited(model, tok, records["counterfact"][0]):
            pass
    check_restored(model, before)
    assert no_hooks(model)


@pytest.mark.parametrize("name", ["FT-L", "FT-M", "GRACE", "CaliNet"])
def test_edits_work_when_the_caller_is_under_no_grad(world, name):
    """Evaluation scores under torch.no_grad; an edit that optimises must still get gradients."""
    tok, model, records = world
    record = records["counterfact"][1]
    text = record.prompt + " " + record.target_new
    base = logits_of(model, tok, text)
    with torch.no_grad(), make_baseline(name, **STRONG[name]).edited(model, tok, record):
        edited = logits_of(model, tok, text)
    assert not torch.equal(base, edited)
