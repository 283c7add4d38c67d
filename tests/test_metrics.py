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


# --- the reference's conventions, as options ------------------------------------------
def test_pooled_logprob_weighs_tokens_not_rows():
    labels = torch.tensor([[IGNORE, 1, 1, 1], [IGNORE, IGNORE, IGNORE, 2]])  # 3 answer tokens, then 1
    logits = torch.zeros(2, 4, V)
    logits[1, 2, 2] = 5.0  # row 1's single token is likely
    per_row = metrics.mean_logprob(logits, labels)
    pooled = metrics.pooled_logprob(logits, labels)
    assert pooled.shape == (1,)
    assert pooled.item() == pytest.approx((3 * per_row[0] + per_row[1]).item() / 4, rel=1e-6)
    assert pooled.item() != pytest.approx(per_row.mean().item())


def test_edit_success_topic_factor_follows_the_reference():
    # EasyEdit evaluate_utils.es: z_sent = σ(ℓ⁺_post − ℓ⁻_post), z_topic = min(1, exp(ℓ⁺_post − ℓ⁺_pre))
    wanted_post, unwanted_post = torch.tensor([-2.0, -3.0]), torch.tensor([-4.0])
    z_sent = 1 / (1 + math.exp(-(-2.5 + 4.0)))
    assert metrics.edit_success(wanted_post, unwanted_post) == pytest.approx(z_sent)  # default unchanged
    worse_than_before = torch.tensor([-1.0, -2.0])  # the edit made the wanted responses 1 nat less likely
    assert metrics.topic_factor(wanted_post, worse_than_before) == pytest.approx(math.exp(-1.0))
    assert metrics.edit_success(wanted_post, unwanted_post, worse_than_before) == pytest.approx(z_sent * math.exp(-1.0))
    better_than_before = torch.tensor([-5.0])
    assert metrics.topic_factor(wanted_post, better_than_before) == 1.0  # capped at 1
    assert metrics.edit_success(wanted_post, unwanted_post, better_than_before) == pytest.approx(z_sent)


def test_edit_success_with_pooled_logprobs_matches_the_reference_formula():
    torch.manual_seed(0)
    labels = torch.tensor([[IGNORE, 1, 2, 3], [IGNORE, IGNORE, 4, 0], [IGNORE, 2, 2, IGNORE]])
    pre, post = torch.randn(3, 4, V), torch.randn(3, 4, V)
    wanted = torch.tensor([True, True, False])  # rows 0 and 1 are wanted responses, row 2 unwanted
    # the reference, written out: token log-probs, then masked means over all tokens of a kind
    mask = labels[:, 1:] != IGNORE
    targets = labels[:, 1:].clamp(min=0)

    def token_logp(logits):
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    pos, neg = mask & wanted[:, None], mask & ~wanted[:, None]
    pos_pre = token_logp(pre)[pos].mean()
    pos_post, neg_post = token_logp(post)[pos].mean(), token_logp(post)[neg].mean()
    expected = torch.sigmoid(pos_post - neg_post).item() * min(1.0, math.exp((pos_post - pos_pre).item()))
    ours = metrics.edit_success(metrics.pooled_logprob(post[wanted], labels[wanted]),
                                metrics.pooled_logprob(post[~wanted], labels[~wanted]),
                                metrics.pooled_logprob(pre[wanted], labels[wanted]))
    assert ours == pytest.approx(expected, rel=1e-5)


def test_generalization_conventions():
    assert metrics.generalization([0.5, 1.0], reliability=0.2) == 0.75
    assert metrics.generalization([0.5, 1.0], reliability=0.2, convention="paper") == 0.75
    assert math.isnan(metrics.generalization([], reliability=0.2))  # the honest default: nothing to score
    assert metrics.generalization([], reliability=0.2, convention="paper") == 0.2  # the reference's fallback
    with pytest.raises(ValueError, match="convention"):
        metrics.generalization([], reliability=0.2, convention="fallback")


def test_probe_mean_pooled_and_per_kind():
    scores = [("Reasoning", 1.0), ("Reasoning", 1.0), ("Reasoning", 1.0), ("Subject_Aliasing", 0.0)]
    assert metrics.probe_mean(scores) == 0.75  # every probe alike
    assert metrics.probe_mean(scores, how="per_kind") == 0.5  # KnowEdit: each kind once
    assert math.isnan(metrics.probe_mean([], how="per_kind"))
    with pytest.raises(ValueError, match="how"):
        metrics.probe_mean(scores, how="mean")


def test_fluency_easyedit_keeps_case_and_normalises_like_generate_fast():
    text = "The cat sat. the cat sat. The Cat"
    assert metrics.words(text, lower=False)[:3] == ["The", "cat", "sat"]
    assert metrics.fluency_easyedit(text) == pytest.approx(metrics.fluency(text, lower=False))
    assert metrics.fluency_easyedit(text) > metrics.fluency(text)  # "The"/"the" are different words there
    # NFKD folds the ligature "ﬁ" into "fi" (two spellings become one word); the end-of-text marker goes
    raw = "a ﬁne day, a fine day\n\nis here<|endoftext|>"
    assert metrics.fluency_easyedit(raw) == pytest.approx(metrics.fluency("a fine day, a fine day is here", lower=False))
    assert metrics.fluency_easyedit(raw) != pytest.approx(metrics.fluency(raw, lower=False))
    assert metrics.fluency_easyedit([text, text]) == pytest.approx(metrics.fluency_easyedit(text))
