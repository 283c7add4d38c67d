"""The real-model glue on a tiny random LLaMA and the fixture data: training through the engine gives the
editor training without it gives; recall's greedy decoding and teacher forcing; configurations; keys."""

from __future__ import annotations

import json

import pytest
import torch
from test_real_data import folder  # noqa: F401  (the fixture data folder in the published layout)
from tiny import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from instructedit_lite import real_model as rm
from instructedit_lite import train as tr
from instructedit_lite.mend import MendConfig
from instructedit_lite.real_data import RealData
from instructedit_lite.records import EditRecord


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    return tok


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_config(regime: str, steps: int = 4) -> tr.TrainConfig:
    """A few edits of a fact task and ConvSent, the top two of four blocks edited (two cached below)."""
    return rm.real_config(regime, ("counterfact", "convsent"), size="smoke", steps=steps, val_every=2, n_val=1,
                          checkpoint_every=2,
                          mend=MendConfig(rank=4, weight_names=rm.edited_weights(n_layers=4, n_last=2)))


@pytest.mark.parametrize("regime", ["instruct", "multi"])
def test_training_through_the_engine_equals_training_without(folder, tokenizer, regime):  # noqa: F811
    real = rm.RealModel(tiny_llama(tokenizer), tokenizer, RealData(folder), key="tiny")
    config = tiny_config(regime)
    plain = rm.train_real_editor(config, real, cache=False, progress=False, use_engine=False)
    fast = rm.train_real_editor(config, real, cache=False, progress=False)
    assert fast.summary["engine"] and not plain.summary["engine"]
    assert fast.summary["prefix_rows"] > 0 and fast.summary["prefix_bytes"] > 0
    # every edit's losses, and every validation's metrics, within float32 tolerance
    for column in ("L_e", "L_loc", "total", "grad_norm"):
        torch.testing.assert_close(torch.tensor(fast.curves[column].to_numpy()),
                                   torch.tensor(plain.curves[column].to_numpy()), rtol=1e-3, atol=1e-5,
                                   equal_nan=True, msg=column)
    assert list(fast.curves.task) == list(plain.curves.task)
    numeric = [c for c in plain.validation.columns if c != "seconds"]
    torch.testing.assert_close(torch.tensor(fast.validation[numeric].to_numpy(dtype=float)),
                               torch.tensor(plain.validation[numeric].to_numpy(dtype=float)), rtol=1e-3, atol=1e-5,
                               equal_nan=True)
    # the trained editors themselves, and they did train
    untrained = tr.make_editor(config, real.model, generator=torch.Generator().manual_seed(config.seed))
    moved = 0.0
    for (name, a), b, c in zip(plain.editor.state_dict().items(), fast.editor.state_dict().values(),
                               untrained.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)
        moved += float((a.float() - c.float()).abs().sum())
    assert moved > 0


def test_cached_editor_is_loaded(folder, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    real = rm.RealModel(tiny_llama(tokenizer), tokenizer, RealData(folder), key="tiny")
    config = tiny_config("instruct", steps=2)
    first = rm.train_real_editor(config, real, progress=False)
    assert not first.loaded and (rm.editor_dir(config, real) / "summary.json").is_file()
    again = rm.train_real_editor(config, real, progress=False)
    assert again.loaded and again.summary["prefix_rows"] == first.summary["prefix_rows"]
    for a, b in zip(first.editor.state_dict().values(), again.editor.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_greedy_matches_generate(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    prompts = ["Ada Brun was born in", "What do you think of the band Zorbi?", "Bo"]
    got = rm.greedy(model, tokenizer, prompts, 5, batch_size=2)  # rows of different lengths, two batches
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)
        assert text == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_recall_scores_what_the_model_says(tokenizer):
    model = tiny_llama(tokenizer, seed=2)
    prompts = ["Ada Brun was born in", "Cy Lorm works as a"]
    said = rm.greedy(model, tokenizer, prompts, 3)
    wrong = [w for w in ("Lima", "pilot", "Oslo") if w.lower() not in said[0].lower()][0]
    records = [  # the model's own greedy words as the truth: known; another word: not known
        EditRecord(task="counterfact", subject="Ada Brun", prompt=prompts[0], target_new="x",
                   ground_truth=(said[0].strip(),), source="t", index=0),
        EditRecord(task="counterfact", subject="Ada Brun", prompt=prompts[0], target_new="x",
                   ground_truth=(wrong,), source="t", index=1),
        EditRecord(task="wikirecent", subject="Cy Lorm", prompt=prompts[1], target_new=said[1].strip(),
                   source="t", index=2),  # Recent: the truth is the new fact itself
    ]
    out = rm.recall(model, tokenizer, records)
    assert list(out.truth) == [said[0].strip(), wrong, said[1].strip()]
    assert out.tf_exact.tolist() == [True, False, True]
    assert out.greedy.tolist() == [True, False, True]
    assert out.tf_accuracy[0] == 1.0 and out.tf_accuracy[1] < 1.0


def test_real_config_and_keys(folder, tmp_path):  # noqa: F811
    config = rm.real_config("instruct")
    assert config.mend.weight_names == [f"model.layers.{i}.mlp.{m}_proj.weight" for i in (27, 28, 29)
                                        for m in ("gate", "up", "down")]
    assert config.tasks == tr.TRAINABLE_TASKS
    assert rm.real_config("instruct", size="full").steps > config.steps > rm.real_config("instruct", size="smoke").steps
    assert rm.real_config("single", "convsent").tasks == ("convsent",)
    with pytest.raises(ValueError, match="needs its one task"):
        rm.real_config("single")
    with pytest.raises(ValueError, match="size must be one of"):
        rm.real_config(size="huge")
    key = rm.data_key(RealData(folder))
    assert key == rm.data_key(RealData(folder)) and key != rm.data_key(RealData(folder, seed=1))
    path = folder / "convsent/blender_test.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    assert rm.data_key(RealData(folder)) != key  # another file, another key
    lacking = rm.missing(tmp_path / "nowhere")
    assert any("lacks" in m and "fetch-data" in m for m in lacking)


def test_every_registered_editor_has_its_real_model_twin():
    """real_editor_configs carries each declared editor over: same name, regime, tasks and method;
    SmolLM2's edited weights and sizes."""
    from instructedit_lite.methods import editor_configs
    from instructedit_lite.real_editors import real_editor_configs

    declared, real = editor_configs(0), real_editor_configs(0)
    assert list(real) == list(declared) and {"InstructEdit", "KE", "MEND (multi-task)"} <= set(real)
    for name, c in real.items():
        d = declared[name]
        assert (c.regime, c.tasks, c.method) == (d.regime, d.tasks, d.method), name
        assert c.mend.weight_names == rm.edited_weights() and c.steps == rm.real_config("instruct").steps
    assert real_editor_configs(1, "smoke")["KE"] == rm.real_config("multi", size="smoke", seed=1, method="ke")
