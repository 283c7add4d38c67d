"""The metrics (instructedit_lite.metrics) on hand-made logits whose right answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from instructedit_lite import metrics
from instructedit_lite.text import IGNORE

V = 5


def logits_predicting(rows: list[list[int]], confidence: float = 10.0) -> torch.Tensor:
    """Logits whose argmax at position t is rows[i][t]."""
    out = torch.zeros(len(rows), len(rows[0]), V)
    for i, row in enumerate(rows):
        for t, token in enumerate(row):
            out[i, t, token] = confidence
    return out


# labels: the answer is at positions 2 and 3, predicted by logits at positions 1 and 2
LABELS = torch.tensor([[IGNORE, IGNORE, 3, 4], [IGNORE, IGNORE, 1, 2]])


def test_token_accuracy_gives_partial_credit():
    logits = logits_predicting([[0, 3, 4, 0], [0, 1, 0, 0]])  # row 0 both right, row 1 one of two
    assert metrics.token_accuracy(logits, LABELS).tolist() == [1.0, 0.5]
    assert metrics.exact_match(logits, LABELS).tolist() == [1.0, 0.0]


def test_token_accuracy_uses_the_causal_shift():
    # predicting the label at its own position (no shift) must score zero
    logits = logits_predicting([[0, 0, 3, 4], [0, 0, 1, 2]])
    assert metrics.token_accuracy(logits, LABELS).tolist() == [0.0, 0.0]


def test_rows_without_answer_are_an_error():
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE]])
    with pytest.raises(ValueError, match="rows \\[0\\]"):
        metrics.token_accuracy(torch.zeros(1, 4, V), labels)


def test_agreement_counts_unchanged_argmax_only_on_answer_positions():
    pre = logits_predicting([[0, 3, 4, 0], [0, 1, 2, 0]])
    post = logits_predicting([[4, 3, 0, 2], [1, 1, 2, 3]])  # row 0: position 2 changed; row 1: none on answers
    assert metrics.agreement(pre, post, LABELS).tolist() == [0.5, 1.0]


def test_mean_logprob_of_uniform_logits():
    value = metrics.mean_logprob(torch.zeros(2, 4, V), LABELS)
    assert torch.allclose(value, torch.full((2,), -math.log(V)))


def test_edit_success_is_a_sigmoid_of_the_gap():
    assert metrics.edit_success(torch.tensor([-1.0, -1.0]), torch.tensor([-1.0])) == pytest.approx(0.5)
    assert metrics.edit_success(torch.tensor([-1.0, -2.0]), torch.tensor([-2.5])) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert metrics.edit_success(torch.tensor([-3.0]), torch.tensor([-1.0])) < 0.5


def test_drawdown_is_the_kl_on_answer_positions():
    pre = torch.zeros(1, 4, 2)
    post = torch.zeros(1, 4, 2)
    post[0, 1] = torch.tensor([math.log(0.9), math.log(0.1)])  # answer position 1 changes
    post[0, 0] = torch.tensor([5.0, -5.0])  # not an answer position: ignored
    labels = torch.tensor([[IGNORE, IGNORE, 1, IGNORE]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert metrics.drawdown(pre, post, labels).item() == pytest.approx(expected, rel=1e-5)
    assert metrics.drawdown(pre, pre, labels).item() == 0.0


def test_ngram_entropy_by_hand():
    # bigrams of "a b a b": (a,b) twice, (b,a) once
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy(["a", "b", "a", "b"], 2) == pytest.approx(h)
    assert metrics.ngram_entropy(["a"], 2) == 0.0


def test_fluency_formula_and_that_repetition_scores_low():
    text = "the cat sat on the mat and then the dog ran to the park"
    tokens = metrics.words(text)
    expected = (2 / 3 * metrics.ngram_entropy(tokens, 2) + 4 / 3 * metrics.ngram_entropy(tokens, 3)) / 2
    assert metrics.fluency(text) == pytest.approx(expected)
    assert metrics.fluency("the the the the the the the the the the the the") < 0.5 * metrics.fluency(text)
    assert metrics.fluency([text, text]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        metrics.fluency([])


def test_words_splits_punctuation():
    assert metrics.words("Paris, France.") == ["paris", ",", "france", "."]
