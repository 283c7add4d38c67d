"""Batches of (prompt, target) and teacher-forced scoring, on a tiny model with a tiny tokenizer."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from instructedit_lite.base_model import train_tokenizer
from instructedit_lite.text import IGNORE, prompt_target_batch, teacher_forced

LINES = ["The capital of France is Paris.", "The capital of Peru is Lima.", "Bob works as a baker."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(LINES, vocab_size=300)


def test_labels_cover_exactly_the_target(tokenizer):
    batch = prompt_target_batch(tokenizer, ["The capital of France is", "Bob works as a"], ["Paris", "baker"])
    for row in range(2):
        labelled = batch["labels"][row] != IGNORE
        target_ids = batch["input_ids"][row][labelled].tolist()
        assert tokenizer.decode(target_ids) == [" Paris", " baker"][row]
        # right padding: real tokens first, and labels only where attention is on
        assert batch["attention_mask"][row][labelled].all()
    assert batch["attention_mask"][1].tolist() == sorted(batch["attention_mask"][1].tolist(), reverse=True)


def test_mismatched_lengths_and_empty_target_raise(tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        prompt_target_batch(tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="over the limit"):
        prompt_target_batch(tokenizer, ["The capital of France is"], ["Paris"], max_length=3)


def test_teacher_forced_scores_a_model_that_copies(tokenizer):
    """A model whose logits put all mass on the true next token scores 1; a shifted one scores 0."""
    prompts, targets = ["The capital of France is", "Bob works as a"], ["Paris", "baker"]

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift, self.p = shift, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            nxt = torch.roll(input_ids, -1, dims=1) + self.shift
            logits = torch.nn.functional.one_hot(nxt % len(tokenizer), len(tokenizer)).float()
            return type("Out", (), {"logits": logits})

    good = teacher_forced(Oracle(0), tokenizer, prompts, targets)
    bad = teacher_forced(Oracle(1), tokenizer, prompts, targets)
    assert good.token_accuracy == [1.0, 1.0] and good.exact_match == [True, True]
    assert bad.token_accuracy == [0.0, 0.0] and bad.exact_match == [False, False]


def test_batching_does_not_change_scores(tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    prompts = ["The capital of France is", "Bob works as a", "The capital of Peru is"]
    targets = ["Paris", "baker", "Lima"]
    one = teacher_forced(model, tokenizer, prompts, targets, batch_size=1)
    all_ = teacher_forced(model, tokenizer, prompts, targets, batch_size=3)
    assert one == all_


def test_target_logprob_prefers_the_likely_target(tokenizer):
    from instructedit_lite.text import target_logprob

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    batch = prompt_target_batch(tokenizer, ["The capital of France is"], ["Paris"])
    for _ in range(30):  # teach it one fact
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward(); opt.step(); opt.zero_grad()
    good, bad = target_logprob(model.eval(), tokenizer, ["The capital of France is"] * 2, ["Paris", "Lima"])
    assert good > -0.1 > bad
