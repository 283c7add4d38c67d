"""The ``instructedit-lite`` command line: argument parsing and dispatch (nothing is trained here)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from test_real_data import folder  # noqa: F401  (the fixture data folder in the published layout)

from instructedit_lite import base_model, bench, cli, models
from instructedit_lite import evaluate as ev
from instructedit_lite import train as tr


def fake_base():
    return SimpleNamespace(info={"recall_trained": 0.97, "recall_held_out": 0.86, "losses": [1.0], "config": {}},
                           path=Path("/nowhere/base-model-x"), key="x", source=None, world=None, model=None,
                           tokenizer=None, scale="embedded")


def test_pretrain_prints_recall_as_json(monkeypatch):
    calls = []
    monkeypatch.setattr(base_model, "load_base_model", lambda *a, **kw: calls.append((a, kw)) or fake_base())
    out = io.StringIO()
    assert cli.main(["pretrain", "--quiet"], stream=out) == 0
    data = json.loads(out.getvalue())
    assert data["recall_trained"] == 0.97 and data["recall_held_out"] == 0.86
    assert "losses" not in data and calls == [((base_model.BaseModelConfig(),), {"progress": False, "retrain": False})]
    assert cli.main(["pretrain", "--smoke", "--quiet"], stream=io.StringIO()) == 0
    assert calls[-1][0] == (base_model.base_config(smoke=True),)
    assert calls[-1][0][0].steps == base_model.SMOKE_STEPS < base_model.BaseModelConfig().steps


def test_train_parses_and_dispatches_to_the_cache(monkeypatch):
    seen = {}

    def fake_train_editor(config, base, *, cache, progress):
        seen.update(config=config, cache=cache, progress=progress)
        summary = {"steps": config.steps, "train_seconds": 1.5, "skipped_steps": 0, "best_step": 4,
                   "initial": {"val_loss": 2.0, "val_reliability": 0.1, "val_locality": 1.0},
                   "best": {"step": 4, "val_loss": 1.0, "val_reliability": 0.9, "reliability/counterfact": 0.9}}
        return SimpleNamespace(summary=summary, path=Path("/cache/editor-x-y"))

    monkeypatch.setattr(models, "load_model", lambda *a, **kw: fake_base())
    monkeypatch.setattr(tr, "train_editor", fake_train_editor)
    out = io.StringIO()
    argv = ["train", "--regime", "single", "--tasks", "wikirecent", "--smoke", "--steps", "7", "--seed", "3",
            "--no-cache", "--quiet"]
    assert cli.main(argv, stream=out) == 0
    config = seen["config"]
    assert (config.regime, config.tasks, config.steps, config.seed) == ("single", ("wikirecent",), 7, 3)
    assert config.val_every == tr.default_config("single", "wikirecent", smoke=True).val_every
    assert seen["cache"] is False and seen["progress"] is False
    data = json.loads(out.getvalue())
    assert data["best"]["val_reliability"] == 0.9 and data["tasks"] == ["wikirecent"]


def test_train_with_out_folder_calls_train(monkeypatch, tmp_path):
    seen = {}

    def fake_train(config, model, tokenizer, *, train_records, val_records, out_dir, progress):
        seen.update(config=config, out_dir=out_dir)
        summary = {"steps": 2, "train_seconds": 0.1, "skipped_steps": 0, "best_step": 0,
                   "initial": {"val_loss": 1.0, "val_reliability": 0.0, "val_locality": 1.0}, "best": {"val_loss": 1.0}}
        return SimpleNamespace(summary=summary)

    monkeypatch.setattr(models, "load_model", lambda *a, **kw: fake_base())
    monkeypatch.setattr(tr, "records_for", lambda config, source: ({}, {}))
    monkeypatch.setattr(tr, "train", fake_train)
    out = io.StringIO()
    assert cli.main(["train", "--tasks", "counterfact,convsent", "--out", str(tmp_path), "--quiet"], stream=out) == 0
    assert seen["out_dir"] == tmp_path and seen["config"].regime == "instruct"
    assert seen["config"].tasks == ("counterfact", "convsent")
    assert seen["config"].steps == tr.default_config("instruct").steps


def test_bad_arguments(capsys, monkeypatch):
    # a bad configuration is reported before any model is loaded (loading may mean pretraining)
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        cli.main(["train", "--regime", "sometimes"])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])
    capsys.readouterr()
    # a configuration error is one line and exit status 2, not a traceback
    assert cli.main(["train", "--regime", "single", "--quiet"]) == 2
    assert "needs its one task" in capsys.readouterr().err
    assert cli.main(["train", "--regime", "single", "--tasks", "counterfact,convsent", "--quiet"]) == 2
    assert "exactly one task" in capsys.readouterr().err


def test_bench_prints_and_writes_json(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "load_model", lambda name, **kw: SimpleNamespace(scale="embedded", name=name))
    monkeypatch.setattr(bench, "edit_cost", lambda base, **kw: {"edit_s": 0.02, "fwd_bwd_s": 0.01, "ratio": 2.0,
                                                                "model": base.name, **kw})
    out, target = io.StringIO(), tmp_path / "sub" / "cost.json"
    assert cli.main(["bench", "--out", str(target), "--repeats", "3"], stream=out) == 0
    written = json.loads(target.read_text())
    assert written["ratio"] == 2.0 and written["repeats"] == 3 and written["model"] == "embedded"
    assert "edit / forward+backward = 2.00" in out.getvalue()
    # the module entry point takes the same arguments
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert bench.main(["--out", str(tmp_path / "b.json"), "--repeats", "2"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["repeats"] == 2


# ---------------------------------------------------------------------------------------------
# evaluate and reproduce
# ---------------------------------------------------------------------------------------------


def tiny_base():
    from tiny import hand_records, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    records = hand_records(n=3)
    source = SimpleNamespace(records=lambda task, split: list(records[task]), tasks=tuple(records))
    return base_model.BaseModel(tiny_model(tok), tok, source, key="tiny")


def test_evaluate_a_baseline_writes_summary_and_cases(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: tiny_base())
    out = io.StringIO()
    target = tmp_path / "ftm.json"
    argv = ["evaluate", "--method", "FT-M", "--task", "counterfact", "--n", "2", "--fluency-cases", "0",
            "--out", str(target), "--quiet"]
    assert cli.main(argv, stream=out) == 0
    printed = json.loads(out.getvalue())
    assert set(printed["FT-M"]) == {"counterfact"}
    assert printed["FT-M"]["counterfact"]["n"] == 2
    assert 0.0 <= printed["FT-M"]["counterfact"]["reliability"] <= 1.0
    written = json.loads(target.read_text())
    assert written["FT-M"]["counterfact"]["reliability"] == printed["FT-M"]["counterfact"]["reliability"]
    assert (tmp_path / "ftm-cases.csv").exists()


def test_evaluate_an_in_context_method_from_the_registry(monkeypatch):
    """IKE is a registered method like the others: built from the base model's training edits and
    scored with its context on the locality probes too (no weight changes: the plain probes agree)."""
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: tiny_base())
    out = io.StringIO()
    argv = ["evaluate", "--method", "IKE + instruction", "--task", "counterfact", "--n", "2", "--quiet"]
    assert cli.main(argv, stream=out) == 0
    scores = json.loads(out.getvalue())["IKE + instruction"]["counterfact"]
    assert scores["n"] == 2 and 0.0 <= scores["locality"] <= 1.0


def test_evaluate_rejects_a_bad_count(monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: tiny_base())
    assert cli.main(["evaluate", "--method", "base model", "--task", "zsre", "--n", "0", "--quiet"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--method", "nonsense", "--task", "zsre"])


def test_reproduce_smoke_end_to_end(tmp_path):
    """REAL RUN: the smoke editors (trained or loaded from the cache) and every method on 2 cases per
    task; checks the files and the structure of results.json."""
    out = io.StringIO()
    assert cli.main(["reproduce", "--smoke", "--n", "2", "--out", str(tmp_path), "--quiet"], stream=out) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) >= {"settings", "multitask", "holdout", "unseen_instructions", "headline", "timings"}
    assert set(results["multitask"]["InstructEdit"]) == {"counterfact", "wikirecent", "convsent", "average"}
    assert set(results["holdout"]) >= {"InstructEdit", "MEND (multi-task)", "KE", "FT-L", "GRACE"}
    assert results["settings"]["cases_per_task"] == 2 and results["settings"]["smoke"] is True
    markdown = (tmp_path / "results.md").read_text()
    assert "## Hold-out editing" in markdown and "| InstructEdit |" in markdown
    assert len((tmp_path / "cases.csv").read_text().splitlines()) > 1
    assert "headline" in json.loads(out.getvalue())
    # generation success beside the teacher-forced scores, in every file; ConvSent has none
    assert results["settings"]["fluency"] == "easyedit" and results["settings"]["generation_success"] is True
    for task in ("counterfact", "wikirecent", "average"):
        row = results["multitask"]["InstructEdit"][task]
        assert 0.0 <= row["gen_reliability"] <= 1.0 and 0.0 <= row["gen_locality"] <= 1.0
    assert results["multitask"]["InstructEdit"]["convsent"]["gen_reliability"] is None
    assert 0.0 <= results["multitask"]["InstructEdit"]["convsent"]["token_accuracy"] <= 1.0
    assert 0.0 <= results["holdout"]["InstructEdit"]["gen_reliability"] <= 1.0
    assert "## Teacher-forced against generation success" in markdown and "gen_reliability" in markdown
    cases = pd.read_csv(tmp_path / "cases.csv")
    assert {"gen_reliability", "gen_generalization", "gen_portability", "gen_locality", "token_accuracy"} <= set(cases)
    facts = cases[cases.task != "convsent"]
    assert (facts.gen_reliability >= facts.reliability_em - 1e-9).mean() > 0.95  # exact match ⇒ said (ties aside)
    # and WILD, the field's current protocol, as a third view
    assert results["settings"]["wild_tokens"] == 50 and "wild_reliability" in markdown
    assert set(ev.WILD_METRICS) | {"wild_answer"} <= set(cases)
    assert cases[cases.task == "convsent"].wild_reliability.isna().all()
    for task in ("counterfact", "wikirecent", "average"):
        assert 0.0 <= results["multitask"]["InstructEdit"][task]["wild_reliability"] <= 1.0


def test_reproduce_passes_the_model_and_the_fluency_cases_on(monkeypatch, tmp_path, folder):  # noqa: F811
    """``--model`` and ``--seed`` reach the one loader, ``--fluency-cases`` the one reproduce; unset,
    the model's scale keeps its own default (None: experiments.EVALUATION)."""
    from instructedit_lite import experiments

    seen, loaded = [], []
    fake = {"headline": {}, "claims": {}, "timings": {}}
    monkeypatch.setattr(experiments, "reproduce", lambda out, **kw: seen.append(kw) or fake)
    monkeypatch.setattr(models, "load_model", lambda name, **kw: loaded.append((name, kw["seed"])) or name)
    monkeypatch.setattr(models.smollm2, "smollm2_available", lambda: True)
    data = folder
    stream = io.StringIO()
    assert cli.main(["reproduce", "--out", str(tmp_path), "--fluency-cases", "3", "--quiet"], stream=stream) == 0
    assert cli.main(["reproduce", "--model", "smollm2", "--data", str(data), "--out", str(tmp_path), "--seed", "2",
                     "--quiet"], stream=stream) == 0
    assert cli.main(["reproduce", "--model", "smollm2", "--data", str(data), "--out", str(tmp_path),
                     "--fluency-cases", "2", "--quiet"], stream=stream) == 0
    assert [kw["fluency_cases"] for kw in seen] == [3, None, 2]
    assert [kw["base"] for kw in seen] == ["embedded", "smollm2", "smollm2"]
    assert loaded == [("embedded", 0), ("smollm2", 2), ("smollm2", 0)]
    assert experiments.EVALUATION["real"]["fluency_cases"] == 0  # fluency is not in Table 3
    # without the published files: one line naming what is missing, no traceback
    assert cli.main(["reproduce", "--model", "smollm2", "--data", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path), "--quiet"], stream=stream) == 2


def test_help_texts_state_the_declared_smoke_sizes():
    # the parser stays free of heavy imports, so its help spells the sizes out: they must match
    from instructedit_lite import experiments

    sub = next(a for a in cli.build_parser()._actions if a.choices and "reproduce" in a.choices).choices
    smoke_help = next(a.help for a in sub["pretrain"]._actions if "--smoke" in a.option_strings)
    assert f"({base_model.SMOKE_STEPS}) steps" in smoke_help
    n_help = next(a.help for a in sub["reproduce"]._actions if "--n" in a.option_strings)
    sizes = experiments.EVALUATION
    assert f"embedded {sizes['embedded']['n_cases']}, smoke {sizes['embedded']['n_cases_smoke']};" in n_help
    assert f"a real model {sizes['real']['n_cases']}, smoke {sizes['real']['n_cases_smoke']})" in n_help
