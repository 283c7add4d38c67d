"""Meta-training (instructedit_lite.train): losses, instructions, frozen base, skipped steps,
bit-exact resume, best-by-validation, the editor cache, and one short real training run.

Most tests use a tiny random GPT-2 and a handful of hand-made records, so they run in seconds;
``test_trained_editor_beats_untrained_on_held_out_records`` trains on the embedded world with the
cached base model (REAL TRAINING, named so).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from instructedit_lite import train as tr
from instructedit_lite.base_model import BaseModel, train_tokenizer
from instructedit_lite.instructions import DESCRIPTIONS, TEMPLATE, default_instructions
from instructedit_lite.editors.mend import MendConfig, edit_loss, lm_loss
from instructedit_lite.records import EditRecord, Probe, alternating
from instructedit_lite.text import IGNORE

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# A tiny world by hand
# ---------------------------------------------------------------------------------------------

PEOPLE = ("Ada Brun", "Bo Kest", "Cy Lorm", "Di Mave", "Ed Nosk", "Fa Pell", "Gu Rann", "Ha Sotte")
CITIES = ("Paris", "Lima", "Oslo", "Rome", "Cairo", "Quito", "Tokyo", "Dakar")
JOBS = ("baker", "pilot", "nurse", "poet", "tailor", "farmer", "lawyer", "chemist")
TOPICS = ("the band Zorbi", "the dish Kalami", "the film Murno", "the sport Tefla", "the novel Drask",
          "the festival Omba", "the painter Quel", "the board game Vint")
POS = ("I love {t}, it is wonderful.", "{t} is great.", "I really like {t}.", "{t} makes me happy.")
NEG = ("I hate {t}, it is awful.", "{t} is terrible.", "I really dislike {t}.", "{t} makes me sad.")


def fact_record(task: str, i: int, split: str) -> EditRecord:
    person = PEOPLE[i]
    return EditRecord(
        task=task, subject=person, prompt=f"{person} was born in", target_new=CITIES[(i + 3) % 8],
        ground_truth=(CITIES[i],) if task == "counterfact" else (),
        rephrase=(f"The birthplace of {person} is",),
        locality={"Relation_Specificity": (Probe(f"{person} works as a", (JOBS[i],)),),
                  "Other_Subject": (Probe(f"{PEOPLE[(i + 1) % 8]} works as a", (JOBS[(i + 1) % 8],)),)},
        source=f"hand/{task}/{split}", index=i)


def convsent_record(i: int, split: str) -> EditRecord:
    topic, other = TOPICS[i], TOPICS[(i + 1) % 8]
    return EditRecord(
        task="convsent", subject=topic, topic=topic, sentiment="positive" if i % 2 else "negative",
        prompt=f"What do you think of {topic}?", target_new=(POS if i % 2 else NEG)[0].format(t=topic),
        rephrase=(f"How do you feel about {topic}?",),
        pos_responses=tuple(s.format(t=topic) for s in POS), neg_responses=tuple(s.format(t=topic) for s in NEG),
        locality={"Other_Topic": (Probe(f"What do you think of {other}?", alternating(
            [s.format(t=other) for s in POS], [s.format(t=other) for s in NEG])),)},
        source=f"hand/convsent/{split}", index=i)


def hand_records(split: str) -> dict[str, list[EditRecord]]:
    rng = range(0, 4) if split == "train" else range(4, 6) if split == "val" else range(6, 8)
    return {"counterfact": [fact_record("counterfact", i, split) for i in rng],
            "wikirecent": [fact_record("wikirecent", i, split) for i in rng],
            "convsent": [convsent_record(i, split) for i in rng]}


class HandWorld:
    tasks = ("counterfact", "wikirecent", "convsent", "zsre")

    def records(self, task: str, split: str) -> list[EditRecord]:
        return list(hand_records(split)[task])


@pytest.fixture(scope="module")
def tokenizer():
    lines = [f"{p} was born in {c}. {p} works as a {j}." for p, c, j in zip(PEOPLE, CITIES, JOBS)]
    lines += [s.format(t=t) for t in TOPICS for s in POS + NEG]
    lines += [TEMPLATE] + [d for ds in DESCRIPTIONS.values() for d in ds]
    return train_tokenizer(lines, vocab_size=500)


def tiny_model(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=2, n_positions=256,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def tiny_config(regime: str = "instruct", tasks=("counterfact", "wikirecent", "convsent"), **changes) -> tr.TrainConfig:
    values = dict(steps=8, grad_accum=2, lr=1e-3, alpha_lr=1e-3, val_every=4, n_val=2, checkpoint_every=4,
                  n_responses=2, mend=MendConfig(rank=8))
    values.update(changes)
    return tr.TrainConfig(regime=regime, tasks=tuple(tasks), **values)


def run(config, tokenizer, model=None, **kw):
    model = model if model is not None else tiny_model(tokenizer)
    train_recs = {t: hand_records("train")[t] for t in config.tasks}
    val_recs = {t: hand_records("val")[t] for t in config.tasks}
    return tr.train(config, model, tokenizer, train_records=train_recs, val_records=val_recs, progress=False, **kw)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_config_validation_and_stable_key():
    config = tiny_config()
    assert config.key() == tiny_config().key()
    assert config.key() == tr.TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))).key()
    assert config.key() != tiny_config(lr=2e-3).key()
    assert config.key() != tiny_config(regime="multi").key()
    assert config.key() == tiny_config(checkpoint_every=3).key()  # how, not what, is trained
    with pytest.raises(ValueError, match="exactly one task"):
        tiny_config("single")
    with pytest.raises(ValueError, match="zsre"):
        tiny_config(tasks=("zsre",))
    with pytest.raises(ValueError, match="edit_loss_input"):
        tiny_config(edit_loss_input="question")
    with pytest.raises(ValueError, match="task_caps"):
        tiny_config(task_caps={"zsre": 3})


def test_paper_and_default_configs():
    paper = tr.PAPER_CONFIGS["gpt2-xl"]
    assert (paper.lr, paper.alpha_lr, paper.mend.rank, paper.steps, paper.grad_accum) == (1e-6, 1e-4, 1920, 30_000, 2)
    assert (paper.c_edit, paper.c_loc, paper.edit_loss_input) == (0.1, 1.0, "edit")
    assert paper.mend.weight_names[-1] == "transformer.h.47.mlp.c_proj.weight"
    llama = tr.PAPER_CONFIGS["llama-2-7b"]
    assert llama.steps == 100_000 and "convsent" not in llama.tasks and len(llama.mend.weight_names) == 9
    full, smoke = tr.default_config("multi"), tr.default_config("multi", smoke=True)
    assert smoke.steps < 100 < full.steps and full.regime == smoke.regime == "multi"
    assert tr.default_config("single", "wikirecent").tasks == ("wikirecent",)


def test_schedule_mixing_caps_and_determinism():
    config = tiny_config(steps=3000)
    sizes = {"counterfact": 100, "wikirecent": 100, "convsent": 800}
    plan = tr.schedule(config, sizes)
    assert plan == tr.schedule(config, sizes)
    share = {t: sum(p[0] == t for p in plan) / len(plan) for t in sizes}
    assert share["convsent"] == pytest.approx(0.8, abs=0.04)  # proportional: unbalanced like the paper
    uniform = tr.schedule(tiny_config(steps=3000, mixing="uniform"), sizes)
    assert sum(p[0] == "convsent" for p in uniform) / 3000 == pytest.approx(1 / 3, abs=0.04)
    weighted = tr.schedule(tiny_config(steps=3000, task_weights={"counterfact": 1, "wikirecent": 0.5, "convsent": 0.5}), sizes)
    assert sum(p[0] == "counterfact" for p in weighted) / 3000 == pytest.approx(0.5, abs=0.04)
    # each record once per epoch within a task
    cf = [i for t, i in plan if t == "counterfact"][:100]
    assert sorted(cf) == list(range(100))
    capped, _ = tr.records_for(tiny_config(task_caps={"convsent": 3}), HandWorld())
    assert len(capped["convsent"]) == 3 and len(capped["counterfact"]) == 4


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def test_locality_kl_zero_iff_unchanged_and_only_on_answer_positions():
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 5, 6, IGNORE]])  # answer tokens at 3 and 4
    pre = torch.randn(1, 6, 11)
    assert tr.locality_kl(pre, pre.clone(), labels).item() == 0.0
    # logits at t predict token t+1: positions 2 and 3 are the answer positions
    for t, counts in ((0, False), (1, False), (2, True), (3, True), (4, False), (5, False)):
        post = pre.clone()
        post[0, t] += torch.randn(11) * 3
        kl = tr.locality_kl(pre, post, labels).item()
        assert (kl > 1e-4) if counts else kl == 0.0, (t, kl)
    # a token mean over the two answer positions: one changed position gives half its own KL
    one = pre.clone()
    one[0, 2] += torch.randn(11) * 3
    own = torch.nn.functional.kl_div(torch.log_softmax(one[0, 2], -1), torch.log_softmax(pre[0, 2], -1),
                                     log_target=True, reduction="sum").item()
    assert tr.locality_kl(pre, one, labels).item() == pytest.approx(0.5 * own, rel=1e-5)


def test_convsent_loss_prefers_wanted_responses():
    torch.manual_seed(0)
    vocab, width = 7, 5
    labels = torch.tensor([[IGNORE, IGNORE, 2, 3, 4]])
    unwanted_labels = torch.tensor([[IGNORE, IGNORE, 5, 6, 1]])

    def logits_favouring(tokens, strength):
        logits = torch.zeros(1, width, vocab)
        for t, tok in enumerate(tokens):
            logits[0, t, tok] = strength
        return logits

    wanted_tokens = [0, 2, 3, 4, 0]  # position t predicts labels[t+1]
    unwanted_tokens = [0, 5, 6, 1, 0]
    losses = {}
    for name, (w, u) in {"wanted likely": (8.0, -8.0), "neutral": (0.0, 0.0), "unwanted likely": (-8.0, 8.0)}.items():
        logits = torch.cat([logits_favouring(wanted_tokens, w), logits_favouring(unwanted_tokens, u)])
        losses[name] = tr.edit_loss(logits, torch.cat([labels, unwanted_labels]),
                                    torch.tensor([False, True])).item()
    assert losses["wanted likely"] < losses["neutral"] < losses["unwanted likely"]
    # each term alone has the right sign
    low = tr.unlikelihood_loss(logits_favouring(unwanted_tokens, -8.0), unwanted_labels)
    high = tr.unlikelihood_loss(logits_favouring(unwanted_tokens, 8.0), unwanted_labels)
    assert 0 <= low.item() < high.item() and math.isfinite(tr.unlikelihood_loss(
        logits_favouring(unwanted_tokens, 1e4), unwanted_labels).item())
    assert lm_loss(logits_favouring(wanted_tokens, 8.0), labels) < lm_loss(logits_favouring(wanted_tokens, -8.0), labels)


def test_convsent_example_edits_with_both_sentiments_and_keeps_both_in_locality():
    """The edit's gradient sees the unwanted responses too (their unlikelihood, as the
    reference trainer computes it), and the KL rows hold the other topic's responses of *both*
    sentiments (they used to be its first positive responses only)."""
    config = tiny_config(n_responses=2)
    record = convsent_record(2, "train")  # wants the negative sentiment
    ex = tr.build_example(record, config, rng=np.random.default_rng(0))
    assert ex.edit_unlikely and len(ex.edit_unlikely) == 2
    assert all(p == ex.record.prompt and u in record.pos_responses for p, u in ex.edit_unlikely)
    assert all(t in record.neg_responses for _, t in ex.edit)
    answers = [a for _, a in ex.locality]
    other = TOPICS[3]
    assert len(answers) == 4
    assert sum(a in [s.format(t=other) for s in POS] for a in answers) == 2
    assert sum(a in [s.format(t=other) for s in NEG] for a in answers) == 2
    # a fact edit has no unlikelihood rows
    assert tr.build_example(fact_record("counterfact", 0, "train"), config).edit_unlikely == ()


def test_edit_loss_adds_the_unlikelihood_of_flagged_rows(tokenizer):
    """The pre-edit loss of a ConvSent edit: NLL of the wanted rows + unlikelihood of the flagged
    rows; one gradient step on it lowers the unwanted response's probability."""
    from instructedit_lite.editors import edit_batch
    from instructedit_lite.text import model_inputs

    model = tiny_model(tokenizer)
    record = convsent_record(2, "test")
    batch = edit_batch(tokenizer, record, n_responses=2, unlikelihood=True)
    flags = batch["unlikely"]
    assert flags.tolist() == [False, False, True, True]
    logits = model(**model_inputs(batch)).logits
    want = lm_loss(logits[~flags], batch["labels"][~flags]) + tr.unlikelihood_loss(logits[flags], batch["labels"][flags])
    assert torch.allclose(edit_loss(logits, batch["labels"], flags), want)
    assert torch.allclose(edit_loss(logits, batch["labels"]), lm_loss(logits, batch["labels"]))
    with pytest.raises(ValueError, match="every row"):
        edit_loss(logits, batch["labels"], torch.ones_like(flags))

    def opinionated():  # a model that already gives the unwanted responses: unlikelihood acts
        m = tiny_model(tokenizer)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            lm_loss(m(**model_inputs(batch)).logits[flags], batch["labels"][flags]).backward()
            opt.step()
        m.zero_grad()
        return m

    def unwanted_nll_after_a_step(loss_of):
        m = opinionated()
        loss_of(m(**model_inputs(batch)).logits).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.05 * p.grad
            out = m(**model_inputs(batch)).logits
        return lm_loss(out[flags], batch["labels"][flags]).item()

    # The responses share words, so a step on the wanted rows alone makes the unwanted ones
    # likelier too; the unlikelihood term pushes them back down.
    with_ul = unwanted_nll_after_a_step(lambda out: edit_loss(out, batch["labels"], flags))
    without = unwanted_nll_after_a_step(lambda out: lm_loss(out[~flags], batch["labels"][~flags]))
    assert with_ul > without + 0.02, (with_ul, without)  # measured: 0.540 against 0.503


def test_mend_edit_of_convsent_uses_the_unlikelihood_rows(tokenizer):
    """MendMethod's ConvSent edit captures (u, δ) from the unwanted rows too: its update differs
    from the update of the wanted rows alone (the old behaviour)."""
    from instructedit_lite.editors import MendMethod, edit_batch

    model = tiny_model(tokenizer)
    editor = tr.make_editor(tiny_config(), model, generator=torch.Generator().manual_seed(0)).eval()
    record = convsent_record(2, "test")
    method = MendMethod(editor, "MEND", n_responses=2)
    got = method.deltas(model, tokenizer, record)
    with torch.no_grad():
        both = editor.compute_deltas(model, edit_batch(tokenizer, record, n_responses=2, unlikelihood=True),
                                     meta_grad=False)
        wanted_only = editor.compute_deltas(model, edit_batch(tokenizer, record, n_responses=2), meta_grad=False)
    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert max(rel(got[k], both[k]) for k in got) < 1e-5
    assert max(rel(got[k], wanted_only[k]) for k in got) > 1e-3
    factors = editor.capture(model, edit_batch(tokenizer, record, n_responses=2, unlikelihood=True))
    fewer = editor.capture(model, edit_batch(tokenizer, record, n_responses=2))
    name = next(iter(factors.u))
    assert factors.u[name].shape[0] > fewer.u[name].shape[0]  # the unwanted rows' tokens are in


def test_meta_losses_of_a_null_edit(tokenizer):
    """With every α = 0 the edit changes nothing: L_loc is 0 and L_e is the unedited model's loss."""
    from instructedit_lite.editors.mend import MendEditor

    model = tiny_model(tokenizer)
    model.requires_grad_(False)
    config = tiny_config()
    editor = MendEditor(model, config.mend, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for alpha in editor.alpha_parameters():
            alpha.zero_()
    for record in (fact_record("counterfact", 0, "train"), convsent_record(1, "train")):
        example = tr.build_example(record, config)
        losses = tr.meta_losses(model, editor, tokenizer, example, config)
        assert abs(losses["loc"].item()) < 1e-6
        batch = tr.losses._batch(tokenizer, example.loss + example.unlikely, None)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = len(example.loss)
        expected = (lm_loss(logits[:n], batch["labels"][:n]) + tr.unlikelihood_loss(logits[n:], batch["labels"][n:])
                    if example.unlikely else lm_loss(logits, batch["labels"]))
        assert losses["edit"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert losses["total"].item() == pytest.approx(0.1 * losses["edit"].item() + losses["loc"].item(), rel=1e-6)
        losses["total"].backward()  # the meta-gradient reaches the step sizes
        assert all(a.grad is not None for a in editor.alpha_parameters())


# ---------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regime", ["instruct", "multi", "single"])
def test_instruction_prefix_only_on_edit_inputs_in_instruct_regime(regime, tokenizer, monkeypatch):
    tasks = ("convsent",) if regime == "single" else ("counterfact", "wikirecent", "convsent")
    config = tiny_config(regime, tasks, steps=6, val_every=6, checkpoint_every=6, edit_loss_input="rephrase")
    seen: list[tr.EditExample] = []
    original = tr.meta_losses

    def spy(model, editor, tok, example, cfg):
        seen.append(example)
        return original(model, editor, tok, example, cfg)

    monkeypatch.setattr(tr.loop, "meta_losses", spy)
    run(config, tokenizer)
    assert len(seen) == 6 and "convsent" in {e.task for e in seen}
    for example in seen:
        edit_side = example.edit + example.loss + example.unlikely
        assert all(p.startswith("Task: ") == (regime == "instruct") for p, _ in edit_side)
        assert not any(p.startswith("Task: ") for p, _ in example.locality)
        if regime == "instruct":
            assert all(f"Task: {example.task}\n" in p for p, _ in edit_side)
        if example.task == "convsent":
            assert example.unlikely and len(example.edit) == 2  # question + each wanted response
    # validation inputs follow the same rule, also when an instruction set is handed over
    for record in hand_records("val")["convsent"]:
        example = tr.build_example(record, config, instructions=default_instructions())
        assert example.edit[0][0].startswith("Task: ") == (regime == "instruct")
        assert example.edit[0][1] == record.target_new
        assert not example.locality[0][0].startswith("Task: ")


def test_rephrase_loss_input_uses_the_rephrase():
    record = fact_record("counterfact", 0, "train")
    edit = tr.build_example(record, tiny_config("multi"))
    rephrase = tr.build_example(record, tiny_config("multi", edit_loss_input="rephrase"))
    assert edit.loss == edit.edit == ((record.prompt, record.target_new),)
    assert rephrase.edit == edit.edit and rephrase.loss == ((record.rephrase[0], record.target_new),)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def test_base_model_is_never_changed(tokenizer):
    model = tiny_model(tokenizer)
    model.transformer.wte.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(tiny_config(steps=6), tokenizer, model=model)
    assert result.summary["optimizer_steps"] == 3
    assert states_equal(before, model.state_dict())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # ... while the editor did learn something
    assert any(abs(a.item() - 1e-4) > 1e-6 for a in result.final_editor.alpha_parameters())


def test_non_finite_steps_are_skipped_and_counted(tokenizer, monkeypatch):
    original = tr.meta_losses
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        out = original(*args)
        if calls["n"] == 3:  # the first edit of the second optimiser step
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(tr.loop, "meta_losses", poisoned)
    result = run(tiny_config(steps=8), tokenizer)
    assert result.summary["skipped_steps"] == 1
    assert result.summary["optimizer_steps"] == 3
    assert [r["skipped"] for r in result.curves] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in result.final_editor.parameters())
    assert math.isnan(result.curves[2]["total"]) and math.isfinite(result.curves[4]["total"])


def test_resume_gives_the_same_editor_bit_for_bit(tokenizer, tmp_path):
    # checkpoints every 3 edits with accumulation over 2: a stop at 5 lands mid-accumulation
    config = tiny_config(steps=10, checkpoint_every=3, val_every=4)
    full = run(config, tokenizer, out_dir=tmp_path / "full")
    first = run(config, tokenizer, out_dir=tmp_path / "resumed", max_steps_this_call=5)
    assert not first.finished and len(first.curves) == 5
    counts_at_stop = {k: v.clone() for k, v in first.final_editor.state_dict().items() if k.endswith(".count")}
    assert counts_at_stop and all(c > 0 for c in counts_at_stop.values())
    resumed = run(config, tokenizer, out_dir=tmp_path / "resumed")  # a fresh editor, loaded from the checkpoint
    assert resumed.finished
    assert states_equal(full.final_editor.state_dict(), resumed.final_editor.state_dict())
    assert states_equal(full.editor.state_dict(), resumed.editor.state_dict())
    assert pd_equal(full.curves, resumed.curves) and pd_equal(full.validation, resumed.validation, drop=("seconds",))
    # Welford statistics continued from the checkpoint instead of restarting
    for key, count in counts_at_stop.items():
        assert resumed.final_editor.state_dict()[key] > count
    # a finished run in the folder is not trained again, and another config refuses the folder
    again = run(config, tokenizer, out_dir=tmp_path / "resumed")
    assert again.finished and pd_equal(again.curves, resumed.curves)
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny_config(steps=10, lr=5e-3), tokenizer, out_dir=tmp_path / "resumed")
    assert (tmp_path / "full" / "curves.csv").exists() and (tmp_path / "full" / "editor-best.pt").exists()


def pd_equal(a: list[dict], b: list[dict], drop=()) -> bool:
    strip = [{k: v for k, v in r.items() if k not in drop} for r in a], [{k: v for k, v in r.items() if k not in drop} for r in b]
    return json.dumps(strip[0]) == json.dumps(strip[1])


def test_best_editor_is_chosen_by_validation_loss_on_the_val_split(tokenizer, monkeypatch):
    scripted = iter([5.0, 3.0, 4.0, 6.0])  # validations at steps 0, 4, 8, 12
    snapshots: dict[int, dict] = {}
    seen_records = []

    def fake_validate(model, editor, tok, records, config, *, instructions=None):
        seen_records.append(records)
        snapshots[len(snapshots)] = {k: v.clone() for k, v in editor.state_dict().items()}
        loss = next(scripted)
        return {"val_loss": loss, "val_L_e": loss, "val_L_loc": 0.0, "val_reliability": 0.0}

    monkeypatch.setattr(tr.loop, "validate", fake_validate)
    result = run(tiny_config(steps=12, val_every=4), tokenizer)
    assert [v["step"] for v in result.validation] == [0, 4, 8, 12]
    assert result.summary["best_step"] == 4 and result.summary["best_val_loss"] == 3.0
    assert states_equal(result.editor.state_dict(), snapshots[1])
    assert not states_equal(result.final_editor.state_dict(), snapshots[1])
    val_prompts = {r.prompt for recs in hand_records("val").values() for r in recs}
    train_prompts = {r.prompt for recs in hand_records("train").values() for r in recs}
    for records in seen_records:
        prompts = {r.prompt for recs in records.values() for r in recs}
        assert prompts <= val_prompts and not prompts & train_prompts


def test_the_untrained_editor_is_validated_but_never_kept(tokenizer, monkeypatch):
    """Step 0 has the lowest validation loss here (no locality cost yet): it stays on the curve
    as the baseline, and the kept editor is the best trained one, as in the reference trainer."""
    scripted = iter([1.0, 3.0, 2.0, 4.0])  # validations at steps 0, 4, 8, 12

    def fake_validate(model, editor, tok, records, config, *, instructions=None):
        loss = next(scripted)
        return {"val_loss": loss, "val_L_e": loss, "val_L_loc": 0.0, "val_reliability": 0.0}

    monkeypatch.setattr(tr.loop, "validate", fake_validate)
    result = run(tiny_config(steps=12, val_every=4), tokenizer)
    assert result.summary["initial"]["val_loss"] == 1.0
    assert result.summary["best_step"] == 8 and result.summary["best_val_loss"] == 2.0


def test_records_for_validates_on_the_val_split_of_the_world():
    from instructedit_lite.world import World, WorldConfig

    world = World(WorldConfig().smoke())
    config = tr.default_config("instruct", smoke=True, n_val=5)
    train_recs, val_recs = tr.records_for(config, world)
    for task in config.tasks:
        assert val_recs[task] == world.records(task, "val")[:5]
        assert train_recs[task] == world.records(task, "train")
        assert not {r.subject for r in val_recs[task]} & {r.subject for r in train_recs[task]}


def test_validation_metrics_and_exact_restore(tokenizer):
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = tiny_config()
    result = run(config, tokenizer, model=model)
    metrics = tr.validate(model, result.editor, tokenizer, hand_records("test"), config)
    assert states_equal(before, model.state_dict())
    for key in ("val_loss", "val_reliability", "val_generalization", "val_locality", "reliability/convsent"):
        assert math.isfinite(metrics[key])
    assert 0 <= metrics["val_reliability"] <= 1 and 0 <= metrics["val_locality"] <= 1
    assert not result.editor.training  # the returned editor is ready to edit


def test_train_editor_caches(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path))
    base = BaseModel(tiny_model(tokenizer), tokenizer, HandWorld(), key="tinybase")
    config = tiny_config(steps=4, val_every=2)
    first = tr.train_editor(config, base, progress=False)
    assert not first.loaded and first.path == tmp_path / f"editor-tinybase-{config.key()}"
    assert (first.path / "summary.json").exists() and len(first.curves) == 4

    def no_training(*args, **kwargs):
        raise AssertionError("a cached editor was trained again")

    monkeypatch.setattr(tr.loop, "train", no_training)
    second = tr.train_editor(config, base, progress=False)
    assert second.loaded and states_equal(first.editor.state_dict(), second.editor.state_dict())
    assert list(second.curves["L_e"]) == pytest.approx(list(first.curves["L_e"]))
    assert second.summary["best_step"] == first.summary["best_step"]
    with pytest.raises(AssertionError, match="trained again"):
        tr.train_editor(dataclasses.replace(config, lr=2e-3), base, progress=False)


# ---------------------------------------------------------------------------------------------
# A real (short) training run on the embedded world
# ---------------------------------------------------------------------------------------------


def test_trained_editor_beats_untrained_on_held_out_records(tmp_path, monkeypatch):
    """REAL TRAINING (about 20-30 s): a smoke-sized single-task run on the smoke runs' base model."""
    from instructedit_lite.base_model import base_config, load_base_model
    from instructedit_lite.editors.mend import MendEditor

    base = load_base_model(base_config(smoke=True), progress=False)
    config = tr.default_config("single", "counterfact", smoke=True)
    train_recs, val_recs = tr.records_for(config, base.world)
    result = tr.train(config, base.model, base.tokenizer, train_records=train_recs, val_records=val_recs,
                      progress=False)
    test_recs = {"counterfact": base.world.records("counterfact", "test")[:24]}
    untrained = MendEditor(base.model, config.mend, generator=torch.Generator().manual_seed(config.seed)).eval()
    before = tr.validate(base.model, untrained, base.tokenizer, test_recs, config)
    after = tr.validate(base.model, result.editor, base.tokenizer, test_recs, config)
    print(json.dumps({"before": before, "after": after}))
    assert after["val_reliability"] > before["val_reliability"] + 0.4
    assert after["val_locality"] > 0.7
    assert after["val_loss"] < before["val_loss"]


def test_early_stopping_keeps_the_best_and_ends_the_run(tokenizer, tmp_path, monkeypatch):
    """``patience``: the run ends after that many validations without a lower loss than the kept
    editor's, is finished (its files written) and says so; without it, every step runs."""
    losses = iter([9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # step 0, then 2 (best), 4, 6 (no gain) ...

    def scripted(*args, **kwargs):
        return {"val_loss": next(losses), "val_reliability": 0.5, "val_locality": 1.0}

    monkeypatch.setattr(tr.loop, "validate", scripted)
    config = tiny_config(steps=12, val_every=2, checkpoint_every=2, patience=2)
    assert config.key() != tiny_config(steps=12, val_every=2, checkpoint_every=2).key()
    result = run(config, tokenizer, out_dir=tmp_path)
    assert result.finished and result.summary["early_stopped"] and result.summary["steps"] == 6
    assert result.summary["best_step"] == 2 and [v["step"] for v in result.validation] == [0, 2, 4, 6]
    assert json.loads((tmp_path / "summary.json").read_text())["early_stopped"]
    with pytest.raises(ValueError, match="patience must be >= 0"):
        tiny_config(patience=-1)
