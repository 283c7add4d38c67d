"""The book's experiments (instructedit_lite.experiments): configurations, the method set, and the
three views of one evaluation table, on synthetic per-case tables whose answers are known."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest

from instructedit_lite import experiments as ex
from instructedit_lite.editors import EditInfo, Editor, PerTaskMethod
from instructedit_lite.train import TRAINABLE_TASKS
from tiny import hand_records


def test_editor_configs_cover_the_book():
    configs = ex.editor_configs()
    assert configs["InstructEdit"].instructed and not configs["MEND (multi-task)"].instructed
    assert configs["KE"].method == "ke" and configs["KE"].tasks == TRAINABLE_TASKS
    for task in TRAINABLE_TASKS:
        assert configs[f"MEND (single-task: {task})"].tasks == (task,)
    # InstructEdit and multi-task MEND differ only in the instructions
    a, b = configs["InstructEdit"].to_dict(), configs["MEND (multi-task)"].to_dict()
    assert {k for k in a if a[k] != b[k]} == {"regime"}
    assert ex.editor_configs(smoke=True)["InstructEdit"].steps < configs["InstructEdit"].steps


def test_scaling_and_balance_configs():
    scaling = ex.scaling_configs()
    assert [c.tasks for c in scaling.values()][:2] == [("wikirecent",), ("wikirecent", "counterfact")]
    assert scaling[3].key() == ex.editor_configs()["InstructEdit"].key()  # reused, not retrained
    assert len({c.steps for c in scaling.values()}) == 1
    balance = ex.balance_configs()
    assert list(balance) == [ex.UNBALANCED, ex.BALANCED]
    # the paper's proportions: ConvSent 14,390 of 16,415 records, and 1,427 of 3,452 balanced
    share = {n: c.task_weights["convsent"] / sum(c.task_weights.values()) for n, c in balance.items()}
    assert share[ex.UNBALANCED] == pytest.approx(14390 / 16415) and share[ex.UNBALANCED] > 0.87
    assert share[ex.BALANCED] == pytest.approx(1427 / 3452)
    # the same fact budget: only the task weights and the number of edits differ, and the
    # unbalanced editor's extra edits are ConvSent ones
    a, b = (c.to_dict() for c in balance.values())
    assert {k for k in a if a[k] != b[k]} == {"task_weights", "steps"}
    assert balance[ex.BALANCED].steps == ex.editor_configs()["InstructEdit"].steps
    assert balance[ex.UNBALANCED].steps == round(balance[ex.BALANCED].steps * 16415 / 3452)
    for steps in (None, ex.BALANCE_STEPS, 37):
        facts = [ex.fact_edits(c) for c in ex.balance_configs(steps=steps).values()]
        assert facts[0] == pytest.approx(facts[1], abs=0.5)
    assert ex.fact_edits(balance[ex.BALANCED]) == pytest.approx(2000 * 2025 / 3452)
    with pytest.raises(ValueError, match="no task weights"):
        ex.fact_edits(ex.editor_configs()["InstructEdit"])
    # chapter 6's shorter default: fewer edits for the scaling editors and the balanced one
    short = ex.scaling_configs(steps=ex.ANALYSIS_STEPS).values()
    assert {c.steps for c in short} == {ex.ANALYSIS_STEPS}
    assert ex.ANALYSIS_STEPS < ex.editor_configs()["InstructEdit"].steps
    assert ex.BALANCE_STEPS < ex.editor_configs()["InstructEdit"].steps
    assert ex.balance_configs(steps=ex.BALANCE_STEPS)[ex.BALANCED].steps == ex.BALANCE_STEPS
    assert ex.scaling_configs(steps=ex.ANALYSIS_STEPS)[3].key() != scaling[3].key()
    assert ex.balance_configs(smoke=True, steps=None)[ex.BALANCED].steps < ex.ANALYSIS_STEPS


class Named(Editor):
    def __init__(self, name):
        self.name = name
        self.calls = []

    @contextlib.contextmanager
    def edited(self, model, tokenizer, record):
        self.calls.append(record.task)
        yield EditInfo()


def test_per_task_method_dispatches_by_task():
    by_task = {t: Named(t) for t in ("counterfact", "convsent")}
    method = PerTaskMethod(by_task)
    recs = hand_records()
    with method.edited(None, None, recs["convsent"][0]):
        pass
    assert by_task["convsent"].calls == ["convsent"] and by_task["counterfact"].calls == []
    with pytest.raises(ValueError, match="no editor for task 'zsre'"):
        method.prepare(recs["zsre"][0])


def synthetic_cases(n: int = 20, seed: int = 0) -> pd.DataFrame:
    """InstructEdit edits everything at 0.9, multi-task MEND at 0.7, the unseen instruction at 0.88."""
    rng = np.random.default_rng(seed)
    level = {"InstructEdit": 0.9, "MEND (multi-task)": 0.7, ex.UNSEEN: 0.88, "base model": 0.2, "KE": 0.6,
             "FT-L": 0.2, "FT-M": 0.95, "CaliNet": 0.95, "GRACE": 0.95, ex.SINGLE: 0.8}
    rows = []
    for method, value in level.items():
        for task in ("counterfact", "wikirecent", "convsent", "zsre"):
            if method == ex.SINGLE and task == "zsre":
                continue
            for case in range(n):
                rows.append({"method": method, "task": task, "case": case,
                             "reliability": float(np.clip(value + rng.normal(0, 0.01), 0, 1)),
                             "generalization": value - 0.1, "locality": 1.0 - value / 10, "portability": 0.3,
                             "reliability_em": float(value > 0.5), "fluency": 4.0, "edit_seconds": 0.01})
    return pd.DataFrame(rows)


def test_multitask_table_has_per_task_rows_and_the_average():
    table = ex.multitask_table(synthetic_cases())
    assert list(table.loc["InstructEdit"].index) == ["counterfact", "wikirecent", "convsent", "average"]
    assert table.loc[("InstructEdit", "average"), "reliability"] == pytest.approx(0.9, abs=0.01)
    assert "zsre" not in table.index.get_level_values("task")
    assert table.index.get_level_values("method")[0] == "base model"  # table order of COMPARED


def test_holdout_and_unseen_tables():
    cases = synthetic_cases()
    hold = ex.holdout_table(cases)
    assert ex.SINGLE not in hold.index and hold.loc["MEND (multi-task)", "reliability"] == pytest.approx(0.7, abs=0.01)
    unseen = ex.unseen_table(cases)
    assert set(unseen.index.get_level_values("method")) == {"InstructEdit", ex.UNSEEN}
    head = ex.headline(cases)
    assert head["instructedit_minus_multitask_mend"] == pytest.approx(0.2, abs=0.01)
    assert head["unseen_minus_seen_reliability"]["zsre"] == pytest.approx(-0.02, abs=0.01)
    assert head["instructedit_minus_best_baseline"] == pytest.approx(-0.05, abs=0.01)


def test_markdown_table():
    text = ex._markdown(pd.DataFrame({"a": [0.12345, float("nan")]}, index=pd.Index(["x", "y"], name="m")))
    assert text.splitlines()[0] == "| m | a |" and "| x | 0.123 |" in text and "| y | – |" in text


def test_paper_weights_name_a_task_without_a_paper_size():
    """A registered training task without the paper's size cannot silently get a weight."""
    from instructedit_lite import tasks

    tasks.register_task(tasks.Task("mquake", kind="fact", role="train", color="#882255"))
    try:
        with pytest.raises(ValueError, match="'mquake' has no paper_train"):
            ex.paper_weights()
    finally:
        tasks.unregister_task("mquake")
    with pytest.raises(ValueError, match="paper_balanced must be a positive count"):
        tasks.Task("x", paper_train=10, paper_balanced=0)


def test_evaluation_records_can_keep_fewer_convsent_responses():
    by_task = hand_records(n=3)

    class Source:
        tasks = tuple(by_task)

        def records(self, task, split):
            assert split == "test"
            return by_task[task]

    full = ex.evaluation_records(Source(), 2)
    assert {t: len(r) for t, r in full.items()} == dict.fromkeys(by_task, 2)
    assert full["convsent"][0] is by_task["convsent"][0]  # untouched without ``responses``
    few = ex.evaluation_records(Source(), 2, responses=1)
    for before, after in zip(full["convsent"], few["convsent"]):
        assert len(before.pos_responses) > 1 and len(before.locality_probes[0].answers) > 1
        assert after.pos_responses == before.pos_responses[:1] and after.neg_responses == before.neg_responses[:1]
        assert [p.answers for p in after.locality_probes] == [p.answers[:1] for p in before.locality_probes]
        assert (after.prompt, after.target_new, after.rephrase, after.sentiment, after.index) == (
            before.prompt, before.target_new, before.rephrase, before.sentiment, before.index)
    assert all(a is b for t in ("counterfact", "wikirecent", "zsre") for a, b in zip(few[t], full[t]))
