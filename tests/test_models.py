"""One model value for every model, on a tiny random LLaMA and the fixture data: training through the
engine gives the editor training without it gives; the editor cache; recall's greedy decoding and
teacher forcing; configurations of both scales; keys; the baselines' placement."""

from __future__ import annotations

import json

import pytest
import torch
from test_real_data import folder  # noqa: F401  (the fixture data folder in the published layout)
from tiny import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from instructedit_lite import methods, models
from instructedit_lite import train as tr
from instructedit_lite.base_model import BaseModel
from instructedit_lite.editors.baselines import GRACE_STEPS, PLACEMENTS, REFERENCE_BLOCKS, baseline_options
from instructedit_lite.editors.mend import MendConfig
from instructedit_lite.experiments import build_methods, evaluation_models, evaluation_records, main_evaluation
from instructedit_lite.figure4 import balance_configs, scaling_configs
from instructedit_lite.generation import greedy_tokens
from instructedit_lite.real_data import RealData
from instructedit_lite.records import EditRecord

#: SmolLM2's edited weights: the MLP matrices of blocks 27-29.
SMOLLM2_WEIGHTS = [f"model.layers.{i}.mlp.{m}_proj.weight" for i in (27, 28, 29) for m in ("gate", "up", "down")]


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


def tiny_real(folder, tokenizer, seed: int = 0) -> BaseModel:
    """A real-scale model value around a tiny LLaMA and the fixture data."""
    return BaseModel(tiny_llama(tokenizer, seed), tokenizer, RealData(folder), key="tiny", scale="real")


def tiny_config(regime: str, steps: int = 4, base=None) -> tr.TrainConfig:
    """A few edits of a fact task and ConvSent, the top two of four blocks edited (two cached below)."""
    weights = [f"model.layers.{i}.mlp.{m}_proj.weight" for i in (2, 3) for m in ("gate", "up", "down")]
    return tr.default_config(regime, ("counterfact", "convsent"), size="smoke", model="smollm2", steps=steps,
                             val_every=2, n_val=1, checkpoint_every=2, mend=MendConfig(rank=4, weight_names=weights))


@pytest.mark.parametrize("regime", ["instruct", "multi"])
def test_training_through_the_engine_equals_training_without(folder, tokenizer, regime):  # noqa: F811
    real = tiny_real(folder, tokenizer)
    config = tiny_config(regime)
    assert config.mend.weight_names == real.weight_names(2)
    plain = tr.train_editor(config, real, cache=False, progress=False, use_engine=False)
    fast = tr.train_editor(config, real, cache=False, progress=False)  # the real scale's default
    assert fast.summary["engine"] and "engine" not in plain.summary
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
    real = tiny_real(folder, tokenizer)
    config = tiny_config("instruct", steps=2)
    first = tr.train_editor(config, real, progress=False)
    assert not first.loaded and (tr.editor_dir(config, real) / "summary.json").is_file()
    again = tr.train_editor(config, real, progress=False)
    assert again.loaded and again.summary["prefix_rows"] == first.summary["prefix_rows"]
    for a, b in zip(first.editor.state_dict().values(), again.editor.state_dict().values()):
        torch.testing.assert_close(a, b)


def greedy(model, tokenizer, prompts, n):
    return tokenizer.batch_decode(greedy_tokens(model, tokenizer, prompts, n), skip_special_tokens=True)


def test_greedy_matches_generate(tokenizer):
    model = tiny_llama(tokenizer, seed=1)
    prompts = ["Ada Brun was born in", "What do you think of the band Zorbi?", "Bo"]
    got = greedy(model, tokenizer, prompts, 5)  # rows of different lengths in one right-padded batch
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0)
        assert text == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_recall_scores_what_the_model_says(tokenizer):
    model = tiny_llama(tokenizer, seed=2)
    prompts = ["Ada Brun was born in", "Cy Lorm works as a"]
    said = greedy(model, tokenizer, prompts, 3)
    wrong = [w for w in ("Lima", "pilot", "Oslo") if w.lower() not in said[0].lower()][0]
    records = [  # the model's own greedy words as the truth: known; another word: not known
        EditRecord(task="counterfact", subject="Ada Brun", prompt=prompts[0], target_new="x",
                   ground_truth=(said[0].strip(),), source="t", index=0),
        EditRecord(task="counterfact", subject="Ada Brun", prompt=prompts[0], target_new="x",
                   ground_truth=(wrong,), source="t", index=1),
        EditRecord(task="wikirecent", subject="Cy Lorm", prompt=prompts[1], target_new=said[1].strip(),
                   source="t", index=2),  # Recent: the truth is the new fact itself
    ]
    out = models.recall(model, tokenizer, records, batch_size=2)
    assert list(out.truth) == [said[0].strip(), wrong, said[1].strip()]
    assert out.tf_exact.tolist() == [True, False, True]
    assert out.greedy.tolist() == [True, False, True]
    assert out.tf_accuracy[0] == 1.0 and out.tf_accuracy[1] < 1.0


def test_configurations_of_both_scales_and_keys(folder, tmp_path):  # noqa: F811
    config = tr.default_config("instruct", model="smollm2")
    assert config.mend.weight_names == SMOLLM2_WEIGHTS and config.mixing == "uniform"
    assert config.tasks == tr.TRAINABLE_TASKS
    full, smoke = (tr.default_config("instruct", model="smollm2", size=s).steps for s in ("full", "smoke"))
    assert full > config.steps > smoke and config.steps < tr.default_config("instruct").steps
    assert tr.default_config("single", "convsent", model="smollm2").tasks == ("convsent",)
    # the embedded single-task editor makes half the edits, the real one as many as the others
    assert tr.default_config("single", "convsent").steps == tr.default_config().steps // 2
    assert tr.default_config("single", "convsent", model="smollm2").steps == config.steps
    assert tr.default_config("multi", model="smollm2", method="ke").alpha_lr > config.alpha_lr
    assert tr.default_config("multi", method="ke").alpha_lr == tr.default_config().alpha_lr
    with pytest.raises(ValueError, match="needs its one task"):
        tr.default_config("single", model="smollm2")
    with pytest.raises(ValueError, match="size must be one of"):
        tr.default_config(model="smollm2", size="huge")
    with pytest.raises(ValueError, match="model must be"):
        tr.default_config(model="gpt-5")
    key = models.data_key(RealData(folder))
    assert key == models.data_key(RealData(folder)) and key != models.data_key(RealData(folder, seed=1))
    path = folder / "convsent/blender_test.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:-1]))
    assert models.data_key(RealData(folder)) != key  # another file, another key
    lacking = models.missing(tmp_path / "nowhere")
    assert any("lacks" in m and "fetch-data" in m for m in lacking)


def test_a_loaded_model_gives_the_configurations_its_name_gives(folder, tokenizer):  # noqa: F811
    """A configuration asked for with the loaded model value is the one asked for by its name, so the
    editors a chapter trains on SmolLM2 are the ones ``reproduce --model smollm2`` loads."""
    real = tiny_real(folder, tokenizer)
    by_value = tr.default_config("instruct", model=real)
    assert by_value.mend.weight_names == real.weight_names() == [
        f"model.layers.{i}.mlp.{m}_proj.weight" for i in (1, 2, 3) for m in ("gate", "up", "down")]
    by_name = tr.default_config("instruct", model="smollm2")
    assert by_value.to_dict() | {"mend": None} == by_name.to_dict() | {"mend": None}


def test_every_registered_editor_exists_on_both_scales():
    """Each declared editor on SmolLM2: same name, regime, tasks and method as on the embedded
    model; SmolLM2's edited weights and sizes."""
    declared, real = methods.editor_configs(0), methods.editor_configs(0, model="smollm2")
    assert list(real) == list(declared) and {"InstructEdit", "KE", "MEND (multi-task)"} <= set(real)
    for name, c in real.items():
        d = declared[name]
        assert (c.regime, c.tasks, c.method) == (d.regime, d.tasks, d.method), name
        assert c.mend.weight_names == SMOLLM2_WEIGHTS
        assert c.steps == tr.default_config("instruct", model="smollm2").steps
    assert (methods.editor_configs(1, size="smoke", model="smollm2")["KE"]
            == tr.default_config("multi", size="smoke", seed=1, method="ke", model="smollm2"))


def test_baselines_at_the_reference_placement_or_inside_the_edited_blocks(folder, tokenizer):  # noqa: F811
    real = tiny_real(folder, tokenizer)
    same = baseline_options(real, SMOLLM2_WEIGHTS, placement="same-block")
    assert same == {"FT-L": {"layer": 27}, "FT-M": {"layer": 27}, "GRACE": {"layer": 27, "n_iter": GRACE_STEPS},
                    "CaliNet": {"layer": 29}}
    for placement in PLACEMENTS:
        smoke = baseline_options(real, smoke=True, placement=placement)
        assert all(o.get("steps", o.get("n_iter")) == 2 for o in smoke.values())
    assert baseline_options(real, placement="same-block")["FT-L"]["layer"] == 1
    # EasyEdit's LLaMA placement, clipped to the tiny model's last block (3): FT-L/FT-M without the box,
    # GRACE on the MLP output matrix
    reference = baseline_options(real)
    assert reference["FT-L"] == {"layer": 3, "eps": None} == reference["FT-M"]
    assert reference["GRACE"] == {"layer": 3, "module": real.profile.mlp_out_module(), "n_iter": GRACE_STEPS}
    assert reference["CaliNet"] == {"layer": 3}
    assert REFERENCE_BLOCKS == {"FT-L": 21, "FT-M": 21, "GRACE": 27}
    assert baseline_options(None) == {}  # the embedded scale: each baseline's own default
    with pytest.raises(ValueError, match="not inside a block"):
        baseline_options(real, ["lm_head.weight"])
    with pytest.raises(ValueError, match="placement must be one of"):
        baseline_options(real, placement="nearby")


def test_each_method_is_evaluated_on_an_engine_cut_at_its_own_block(folder, tokenizer):  # noqa: F811
    """A baseline placed below the meta-trained editors' blocks gets its own engine; methods that
    change no weight join the default engine; on the embedded scale the model itself serves all."""
    real = tiny_real(folder, tokenizer)
    built = build_methods({}, base=real, smoke=True)  # the reference placement: the last block (3) here
    models_ = evaluation_models(built, real.for_editing())
    cuts = {name: evaluator.model.lowest for evaluator, group in models_ for name in group}
    assert cuts["FT-L"] == cuts["FT-M"] == cuts["GRACE"] == cuts["CaliNet"] == 3
    assert cuts["base model"] == real.for_editing().model.lowest == 1  # the default edited weights: blocks 1-3
    assert all(evaluator.model.full_model is real.model for evaluator, _ in models_)
    records = evaluation_records(real.world, 1, tasks=("counterfact",))
    cases = main_evaluation(built, real, records, fluency_cases=0, progress=False, wild_tokens=4)
    assert set(cases.method) == set(built)


def test_scaling_and_balance_editors_carry_the_real_settings():
    real = tr.default_config("instruct", model="smollm2")
    scaling = scaling_configs(seed=0, model="smollm2")
    assert [c.tasks for c in scaling.values()] == [("wikirecent",), ("wikirecent", "counterfact"), real.tasks]
    assert scaling[3].key() == real.key()  # chapter 7's InstructEdit, from its cache
    balance = balance_configs(seed=0, model="smollm2")
    assert {c.steps for c in (*scaling.values(), balance["balanced (ConvSent 1,427)"])} == {real.steps}
    assert balance["unbalanced (paper's data)"].steps > real.steps  # the same fact edits
    assert all(c.mend.weight_names == SMOLLM2_WEIGHTS for c in balance.values())
    assert scaling_configs(size="smoke", model="smollm2")[1].steps == tr.default_config(size="smoke",
                                                                                       model="smollm2").steps
