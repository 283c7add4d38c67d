"""Evaluation (instructedit_lite.evaluate): one edit per case on the original model, exact undo,
the right rows scored with the right prompts, tidy tables written to disk."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

from instructedit_lite import evaluate as ev
from instructedit_lite.editors import EditInfo, Editor, MendMethod, Unedited, WeightEditor
from instructedit_lite.instructions import default_instructions
from instructedit_lite.mend import MendConfig, MendEditor
from tiny import hand_records, snapshot, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def records():
    return hand_records(n=2)


class TargetBias(Editor):
    """A hook on the LM head that adds a large bias to the tokens of the edit's first target row:
    the edit succeeds on every prompt (poor locality)."""

    name = "bias"

    def __init__(self, strength: float = 50.0):
        self.strength = strength
        self.seen: list[str] = []

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        self.seen.append(record.prompt)
        ids = tokenizer(" " + record.target_new, add_special_tokens=False)["input_ids"]
        bias = torch.zeros(model.config.vocab_size)
        bias[ids] = self.strength
        handle = model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
        try:
            yield EditInfo(0.0, {"n_ids": len(ids)})
        finally:
            handle.remove()


class Leaky(WeightEditor):
    """A broken editor: changes the weights and does not undo it."""

    name = "leaky"

    def deltas(self, model, tokenizer, record):
        return {}

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        with torch.no_grad():
            model.lm_head.weight.add_(0.01)
        yield EditInfo()


def test_unedited_model_scores_are_the_pre_edit_scores(model, tok, records):
    before = snapshot(model)
    cases = ev.evaluate_methods([Unedited()], model, tok, records, progress=False)
    assert len(cases) == 8
    assert (cases.locality == 1.0).all() and (cases.drawdown.abs() < 1e-6).all()
    assert cases[cases.task == "convsent"].portability.isna().all()
    assert cases[cases.task != "convsent"][["reliability", "generalization", "portability"]].notna().all().all()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_strong_edit_succeeds_and_costs_locality(model, tok, records):
    # one-token targets, so that a bias on the target's token makes it the argmax everywhere
    recs = {"counterfact": [dataclasses.replace(r, target_new="great") for r in records["counterfact"]]}
    cases = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, recs, progress=False)
    facts = cases.set_index("method")
    assert (facts.loc["bias", "reliability_em"] == 1.0).all()
    assert (facts.loc["bias", "reliability"].values > facts.loc["base model", "reliability"].values).all()
    assert (facts.loc["bias", "locality"] < 1.0).any()
    assert (facts.loc["bias", "drawdown"] > 0).all()


def test_convsent_success_follows_the_wanted_sentiment(model, tok, records):
    rec = records["convsent"][0]
    case = ev.evaluate_case(TargetBias(), model, tok, rec)
    base = ev.evaluate_case(Unedited(), model, tok, rec)
    # the bias favours the tokens of target_new, one of the wanted responses
    assert case["reliability"] > base["reliability"]
    assert case["reliability"] > 0.5 and case["reliability_em"] == 1.0
    assert math.isnan(case["portability"])


def test_a_leaked_edit_is_caught(tok, records):
    model = tiny_model(tok, seed=1)
    with pytest.raises(RuntimeError, match="not restored"):
        ev.evaluate_methods([Leaky()], model, tok, records, progress=False)


def test_instructed_method_sees_the_instruction_and_locality_rows_do_not(model, tok, records):
    method = TargetBias()
    method.instructions = default_instructions()
    rec = records["counterfact"][0]
    ev.evaluate_case(method, model, tok, rec)
    assert method.seen[-1].startswith("Task: counterfact") and method.seen[-1].endswith(rec.prompt)
    assert all(not p.startswith("Task:") for p, _ in ev.locality_rows(rec))
    method.unseen = True
    ev.evaluate_case(method, model, tok, rec)
    assert default_instructions().unseen("counterfact") in method.seen[-1]


def test_mend_method_edits_and_restores(model, tok, records):
    editor = MendEditor(model, MendConfig(rank=8, alpha_init=1.0), generator=torch.Generator().manual_seed(0))
    before = snapshot(model)
    cases = ev.evaluate_methods([MendMethod(editor, "MEND")], model, tok, records, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert (cases.edit_seconds > 0).all()
    assert (cases.locality < 1.0).any()  # a step of size 1 on the raw gradient does change the model


def test_fluency_only_for_the_first_cases(model, tok, records):
    cases = ev.evaluate_methods([Unedited()], model, tok, records, fluency_cases=1, fluency_tokens=8, progress=False)
    per_task = cases.groupby("task").fluency.apply(lambda s: int(s.notna().sum()))
    assert (per_task == 1).all()
    assert cases.generated.notna().sum() == 4


def test_duplicate_method_names_are_an_error(model, tok, records):
    with pytest.raises(ValueError, match="distinct"):
        ev.evaluate_methods([Unedited(), Unedited()], model, tok, records, progress=False)


def test_tables_and_files(model, tok, records, tmp_path):
    cases = ev.evaluate_methods([Unedited(), TargetBias()], model, tok, records, progress=False)
    summary = ev.summarize(cases)
    assert summary.loc[("bias", "counterfact"), "n"] == 2
    assert summary.loc[("bias", "counterfact"), "reliability"] == pytest.approx(
        cases[(cases.method == "bias") & (cases.task == "counterfact")].reliability.mean())
    average = ev.average_over_tasks(summary)
    assert average.loc["bias", "locality"] == pytest.approx(summary.loc["bias"].locality.mean())
    paths = ev.write_results(cases, tmp_path, "run")
    assert len(pd.read_csv(paths["cases"])) == len(cases)
    data = json.loads(paths["summary"].read_text())
    assert data["bias"]["convsent"]["portability"] is None  # NaN becomes null, not invalid JSON
    assert data["bias"]["counterfact"]["reliability"] == pytest.approx(summary.loc[("bias", "counterfact"), "reliability"])


def test_paired_difference_and_its_interval():
    rows = []
    for task in ("a", "b"):
        for case in range(40):
            rows.append({"method": "x", "task": task, "case": case, "reliability": 1.0 if case % 2 else 0.5})
            rows.append({"method": "y", "task": task, "case": case, "reliability": 0.5})
    cases = pd.DataFrame(rows)
    result = ev.paired_difference(cases, "x", "y", tasks=["a", "b"])
    assert result["difference"] == pytest.approx(0.25)
    assert result["low"] < 0.25 < result["high"] and result["high"] - result["low"] < 0.2
    same = ev.paired_difference(cases, "y", "y")
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="same a cases"):
        ev.paired_difference(cases[~((cases.method == "y") & (cases.case == 0))], "x", "y")
