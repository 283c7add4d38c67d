"""The verification run: a run killed at any moment resumes to the rows an uninterrupted run ends with;
the journal drops a half-written line; ``verify --check`` passes on current bundles (the committed
ones included) and names what changed when a declaration moves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from instructedit_lite import bundles, verify
from instructedit_lite.train import config as train_config

ROOT = Path(__file__).resolve().parents[1]


def _command(out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "instructedit_lite.cli", "verify", "--model", "embedded", "--size", "smoke",
            "--seeds", "0", "--records", "2", "--baseline-records", "0", "--processes", "1", "--chunk", "1",
            "--quiet", "--out", str(out), "--work", str(work)]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path):
    """REAL RUNS (smoke editors, two records per task, the meta-trained methods): kill -9 after a
    few cases, resume, compare with a run that was never interrupted."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    journal = tmp_path / "work-a" / "cases-seed0.jsonl"
    run = subprocess.Popen(_command(tmp_path / "a", tmp_path / "work-a"), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while _lines(journal) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    killed_at = _lines(journal)
    assert 3 <= killed_at and not (tmp_path / "a" / "embedded" / "verification.json").exists()
    subprocess.run(_command(tmp_path / "a", tmp_path / "work-a"), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run(_command(tmp_path / "b", tmp_path / "work-b"), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    resumed = pd.read_csv(tmp_path / "a" / "embedded" / "cases.csv")
    straight = pd.read_csv(tmp_path / "b" / "embedded" / "cases.csv")
    pd.testing.assert_frame_equal(resumed, straight)
    assert _lines(journal) == len(resumed)  # nothing evaluated twice
    a = json.loads((tmp_path / "a" / "embedded" / "verification.json").read_text())
    b = json.loads((tmp_path / "b" / "embedded" / "verification.json").read_text())
    assert a["claims"] == b["claims"] and a["hashes"] == b["hashes"]
    assert set(a["claims"]["multitask"]) >= {"verdict", "estimate", "low", "high", "n", "mde"}
    # no baselines asked for (they run on the first seed only, on their own records)
    assert "GRACE" not in a["records_per_task"] and a["with_baselines"] is None
    assert a["records_per_task"]["KE"]["zsre"] == 2 and "zsre" not in a["records_per_task"]["MEND (single-task)"]
    assert bundles.check(tmp_path / "a") == ([], [bundles.check(tmp_path / "a")[1][0]])


def test_the_journal_drops_a_half_written_line(tmp_path):
    path = tmp_path / "cases.jsonl"
    journal = verify.CaseJournal(path)
    journal.append([{"method": "KE", "task": "zsre", "case": 3, "reliability": 1.0}])
    with open(path, "a") as f:
        f.write('{"method": "KE", "task": "zsre", "ca')  # killed mid-write
    again = verify.CaseJournal(path)
    assert again.done() == {("KE", "zsre", 3)} and path.read_text().count("\n") == 1
    again.append([{"method": "KE", "task": "zsre", "case": 4, "reliability": 0.0}])
    assert verify.CaseJournal(path).done() == {("KE", "zsre", 3), ("KE", "zsre", 4)}


def _bundle(tmp_path: Path, plan: dict) -> Path:
    folder = tmp_path / "embedded"
    folder.mkdir(parents=True)
    bundle = {"model": "embedded", "plan": plan, "command": "instructedit-lite verify --model embedded",
              "hashes": bundles.declared_hashes("embedded", plan)}
    (folder / "verification.json").write_text(json.dumps(bundle))
    return folder


def test_check_names_a_changed_editor_configuration_and_the_command(tmp_path, monkeypatch):
    plan = verify.plan_for("embedded", "embedded")
    _bundle(tmp_path, plan)
    assert bundles.check(tmp_path)[0] == []
    monkeypatch.setitem(train_config.SETTINGS["embedded"], "lr", 3e-4)  # a changed declaration
    problems, _ = bundles.check(tmp_path)
    assert problems and all("refresh with `instructedit-lite verify --model embedded`" in p for p in problems)
    assert any("editor 'InstructEdit' (seed 0) changed" in p for p in problems)
    assert bundles.main_check(tmp_path, stream=open(os.devnull, "w")) == 1


def test_check_names_a_changed_evaluation(tmp_path, monkeypatch):
    _bundle(tmp_path, verify.plan_for("embedded", "embedded"))
    monkeypatch.setattr(bundles, "VERIFY_VERSION", bundles.VERIFY_VERSION + 1)
    problems, _ = bundles.check(tmp_path)
    assert len(problems) == 1 and "evaluation's declaration changed" in problems[0]


def test_the_committed_bundles_are_current():
    """``verify --check`` on the repository's results: a recorded verification that the code no
    longer matches fails here, naming the command that refreshes it."""
    problems, _ = bundles.check(ROOT / "results")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("scale", ["embedded", "real"])
def test_the_plan_meets_the_power_the_claims_need(scale):
    plan = verify.PLAN[scale]
    assert plan["records"] >= 150 and plan["baseline_records"] >= 50 and len(plan["seeds"]) >= 3
    steps, val_every, n_val, patience = train_config.SIZES[scale]["verify"]
    assert n_val >= 50 and patience >= 1 and steps > val_every
