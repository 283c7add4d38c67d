"""The tokenizer, pretraining (seeded, cached, atomic), the recall threshold, and the HF loader."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from instructedit_lite import base_model as bm
from instructedit_lite import models
from instructedit_lite.atomic import atomic_save_dir


@pytest.fixture(scope="module")
def base():
    """The smoke runs' base model: the book's world, tokenizer and architecture, pretrained briefly
    (69-76 s on one core, measured).  The book's own model is checked where it is built, by chapter 1's
    asserts."""
    return bm.load_base_model(bm.base_config(smoke=True), progress=False)


def tiny_config(**changes) -> bm.BaseModelConfig:
    return dataclasses.replace(bm.BaseModelConfig(), n_embd=32, n_layer=2, n_head=2, steps=4, warmup=2,
                               batch_size=4, seq_len=32, **changes)


def test_tokenizer_is_a_fast_gpt2_style_tokenizer(base):
    tok = base.tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == tok.pad_token == bm.EOS
    assert len(tok) <= base.config.vocab_size
    text = "Task: counterfact\nDescription: x\nInput: The capital of Peru is Lima."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    # frequent words of the world are single tokens with their leading space, as in GPT-2
    assert len(tok(" capital", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" Zqxjvw", add_special_tokens=False)["input_ids"]) > 1


def test_model_has_gpt2_xl_module_names(base):
    names = dict(base.model.named_parameters())
    last = base.config.n_layer - 1
    for suffix in ("mlp.c_fc.weight", "mlp.c_proj.weight"):
        assert f"transformer.h.{last}.{suffix}" in names


def test_base_model_learns_part_of_its_world_in_a_short_pretraining(base):
    # 200 steps: about one fact in eight (the book's 1,300 steps: about 98%, chapter 1)
    assert base.config.steps == bm.SMOKE_STEPS and len(base.info["losses"]) == bm.SMOKE_STEPS
    assert base.info["losses"][-1] < base.info["losses"][0] / 3
    assert 0.05 < base.info["recall_trained"] < 0.5 and base.info["facts_known"] >= 50
    # recomputed now, not only read from the cache record
    recall = bm.fact_recall(base.model, base.tokenizer, base.world, "trained")
    assert recall["exact"].mean() == pytest.approx(base.info["recall_trained"], abs=1e-9)
    assert bm.facts_known(recall) == base.info["facts_known"]


def test_smoke_base_model_shares_the_books_world_tokenizer_and_architecture():
    book, smoke = bm.base_config(3), bm.base_config(3, smoke=True)
    assert book == bm.BaseModelConfig(world=bm.WorldConfig(seed=3)) and smoke.key() != book.key()
    assert dataclasses.replace(smoke, steps=book.steps, warmup=book.warmup, threads=book.threads) == book
    assert smoke.threads == 1  # the same smoke model on any machine


def test_pretraining_is_seeded():
    a, _, log_a = bm.pretrain(tiny_config(), progress=False)
    b, _, log_b = bm.pretrain(tiny_config(), progress=False)
    c, _, _ = bm.pretrain(tiny_config(seed=1), progress=False)
    assert log_a["losses"] == log_b["losses"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_cache_is_keyed_by_config_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(bm.CACHE_ENV, str(tmp_path))
    first = bm.load_base_model(tiny_config(), progress=False)
    assert first.path.parent == tmp_path and first.path.name.endswith(tiny_config().key())
    calls = []
    monkeypatch.setattr(bm, "pretrain", lambda *a, **k: calls.append(1))
    again = bm.load_base_model(tiny_config(), progress=False)
    assert calls == []  # loaded, not retrained
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), again.model.parameters()))
    assert tiny_config().key() != tiny_config(seed=1).key()


def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(bm.CACHE_ENV, str(tmp_path))

    def broken_write(folder):
        (folder / "half-written").write_text("x")
        raise KeyboardInterrupt

    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        atomic_save_dir(target, broken_write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_loader_finds_the_default_edited_layers(tmp_path, arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = bm.train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 5, vocab_size=300)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=5, n_head=2, n_positions=32))
        expected = [f"transformer.h.{i}.mlp.{m}.weight" for i in (2, 3, 4) for m in ("c_fc", "c_proj")]
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2))
        expected = [f"model.layers.{i}.mlp.{m}.weight" for i in (1, 2, 3) for m in ("gate_proj", "up_proj", "down_proj")]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base = models.load_hf_model(str(tmp_path))
    loaded, tokenizer, names = base.as_tuple()
    assert sorted(names) == sorted(expected)
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert isinstance(base, bm.BaseModel) and base.key.startswith("hf-") and base.profile.name == arch
    assert models.load_hf_model(str(tmp_path)).key == base.key  # the cache key is stable
    import pickle

    rebuilt = models.from_spec(pickle.loads(pickle.dumps(base.spec)))  # what a training worker does
    assert rebuilt.key == base.key and rebuilt.profile is base.profile


def test_hf_loader_offline_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="load_model"):
        models.load_hf_model("gpt2-xl-not-downloaded-here")
