"""Every chapter runs top to bottom with papermill in smoke mode; a failing assert fails the test.

The notebooks check their own numbers with assert cells (tagged ``remove-input``); this file runs
them and also checks the conventions the book relies on.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import nbformat
import papermill
import pytest

from instructedit_lite import guard

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TIMEOUT_S = 600  # per cell


def run_notebook(path: Path, out: Path, **parameters) -> nbformat.NotebookNode:
    """Execute ``path`` with ``parameters`` injected; raises ``PapermillExecutionError`` on failure."""
    return papermill.execute_notebook(
        str(path), str(out), parameters=parameters, cwd=str(path.parent), kernel_name="python3",
        execution_timeout=TIMEOUT_S, progress_bar=False, log_output=False)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    names = {t.id for node in ast.parse(first.source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert "smoke" in names
    for node in ast.parse(first.source).body:  # literal values only, so papermill can override them
        if isinstance(node, ast.Assign):
            ast.literal_eval(node.value)
    # `make book SEED=1`: the cell after the parameters lets INSTRUCTEDIT_SEED override the seed
    assert "seed" in names and 'os.environ.get("INSTRUCTEDIT_SEED", seed)' in code[1].source
    assert "remove-cell" in code[1].metadata.get("tags", [])
    for cell in code:  # the page is about 90 characters wide
        wide = [line for line in cell.source.splitlines() if len(line) > 110]
        assert not wide, f"code line wider than the page:\n{wide[0]}"
    asserts = [c for c in code if c.source.lstrip().startswith("assert") or "\nassert " in c.source]
    assert asserts, "a chapter checks its numbers with assert cells"
    for cell in asserts:
        assert "remove-input" in cell.metadata.get("tags", []), f"assert cell not tagged remove-input:\n{cell.source[:200]}"
    assert all(not c.get("outputs") for c in code), "commit notebooks without outputs"


def exercise_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The code cell after each "**Exercise N.**" paragraph."""
    cells, pending = [], False
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            pending = pending or "**Exercise" in cell.source
        elif pending:
            cells.append(cell)
            pending = False
    return cells


def output_text(cell: nbformat.NotebookNode) -> str:
    """What a reader sees of a cell's outputs, as text."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(str(out.get("data", {}).get("text/plain", "")))
        if out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_has_takeaways_and_exercises(path):
    nb = nbformat.read(path, as_version=4)
    headings = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()]
    assert "## Key takeaways" in headings and "## Exercises" in headings
    assert len(exercise_cells(nb)) >= 2, "at least two exercises, each with its cell"


def test_exercise_cells_are_found_and_checked():
    """The exercise check is not vacuous: it finds the cell after the paragraph and reads NaN."""
    nb = nbformat.v4.new_notebook()
    answer = nbformat.v4.new_code_cell("gain")
    answer.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "{'difference': nan}"},
                                             execution_count=1)]
    nb.cells = [nbformat.v4.new_markdown_cell("**Exercise 1.** Is the gain real?"), answer,
                nbformat.v4.new_code_cell("not an exercise")]
    assert exercise_cells(nb) == [answer]
    assert re.search(NAN, output_text(answer))


NAN = r"(?<![\w.])(nan|NaN|<NA>)(?![\w.])"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    executed = run_notebook(path, tmp_path / path.name, smoke=True)
    # every exercise cell shows the reader a result, and a finite one (a chapter whose model or
    # data are missing says so and skips its cells: instructedit_lite.guard)
    skipped = any(guard.NOTE in json.dumps(c.get("outputs", [])) for c in executed.cells)
    for cell in exercise_cells(executed):
        if skipped and not cell.get("outputs"):
            continue
        text = output_text(cell)
        assert text.strip(), f"exercise cell prints nothing:\n{cell.source[:200]}"
        assert not re.search(NAN, text), f"exercise cell prints NaN:\n{cell.source[:200]}\n{text[:400]}"
    # the guard's cell (input hidden) shows nothing when the model and the data are there
    for cell in executed.cells:
        if cell.cell_type == "code" and guard.CALL in cell.source and not skipped:
            assert not cell.get("outputs"), f"the guard's cell shows {output_text(cell)!r}"
    check_glue(path, executed)


#: A glue role of this notebook's own values (a role naming another page, ``page::name``, is not).
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)`")
#: The chapters that need SmolLM2 and the published files (they call the guard).
REAL_CHAPTERS = [p for p in NOTEBOOKS if guard.CALL in p.read_text(encoding="utf-8")]


def check_glue(path: Path, executed: nbformat.NotebookNode) -> None:
    """Every value the chapter's prose (and another page citing it) names was glued, and once: a
    missing or twice-glued name is a warning, and `jupyter-book build -W` fails on it."""
    names = [o.get("metadata", {}).get("scrapbook", {}).get("name") for c in executed.cells
             for o in c.get("outputs", [])]
    names = [n for n in names if n]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    cited = {n for c in executed.cells if c.cell_type == "markdown" for n in GLUE_ROLE.findall(c.source)}
    missing = (cited | set(guard.cited_elsewhere(path))) - set(names)
    assert not missing, f"cited but never glued: {sorted(missing)}"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", REAL_CHAPTERS, ids=lambda p: p.stem)
def test_a_real_chapter_without_its_data_says_so_and_still_builds(path, tmp_path, monkeypatch):
    """A reader without the published files: the chapter shows what is missing, skips its real-model
    code (instructedit_lite.guard) and glues every value its prose cites, so the page builds."""
    monkeypatch.setenv("INSTRUCTEDIT_DATA", str(tmp_path / "no-data"))
    executed = run_notebook(path, tmp_path / path.name, smoke=True)
    assert any(guard.NOTE in json.dumps(c.get("outputs", [])) for c in executed.cells)
    check_glue(path, executed)


@pytest.mark.notebooks
def test_a_failing_assert_fails_the_run(tmp_path):
    """The harness is not vacuous: a notebook whose assert cell fails makes papermill raise."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("smoke = False\nvalue = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("assert value == 2, 'the glued number is wrong'",
                                          metadata={"tags": ["remove-input"]})]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "failing.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(papermill.PapermillExecutionError, match="the glued number is wrong"):
        run_notebook(path, tmp_path / "out.ipynb", smoke=True)
    run_notebook(path, tmp_path / "out2.ipynb", smoke=True, value=2)  # and passes when it holds


def _executed(values: dict, failed_assert: bool) -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: glue outputs, and an assert cell with or without an error."""
    nb = nbformat.v4.new_notebook()
    glue = nbformat.v4.new_code_cell("glue(...)")
    glue.outputs = [nbformat.v4.new_output(
        "display_data", data={"application/papermill.record/text/plain": repr(v)},
        metadata={"scrapbook": {"name": k, "mime_prefix": "application/papermill.record/"}})
        for k, v in values.items()]
    check = nbformat.v4.new_code_cell("assert x > 1", metadata={"tags": ["remove-input"]})
    if failed_assert:
        check.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="", traceback=[])]
    nb.cells = [glue, check]
    nb.metadata["papermill"] = {"end_time": "2026-01-01T00:00:00"}  # finished
    return nb


def test_seed_spread_collects_glued_numbers_and_failed_asserts(tmp_path):
    """book/spread.py: per-seed values, min/max/spread of numbers, verdict strings kept as text."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("spread", ROOT / "book" / "spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    for seed, (recall, verdict, failed) in {0: ("97.9%", "partly", False), 1: ("96.1%", "reproduces", True)}.items():
        (tmp_path / f"seed{seed}").mkdir()
        nbformat.write(_executed({"recall": recall, "n": 1300 + seed, "verdict": verdict}, failed),
                       tmp_path / f"seed{seed}" / "01_x.ipynb")
    unfinished = _executed({"recall": "50.0%"}, False)
    unfinished.metadata["papermill"]["end_time"] = None  # still running: left out
    (tmp_path / "seed2").mkdir()
    nbformat.write(unfinished, tmp_path / "seed2" / "01_x.ipynb")
    result = spread.collect([0, 1, 2], ["01_x"], tmp_path, "cmd")
    assert result["measured"] == {"0": ["01_x"], "1": ["01_x"]}
    by_name = {q["name"]: q for q in result["quantities"]}
    assert by_name["recall"]["values"] == {"0": 97.9, "1": 96.1}
    assert abs(by_name["recall"]["spread"] - 1.8) < 1e-9 and by_name["n"]["spread"] == 1
    assert by_name["verdict"]["values"] == {"0": "partly", "1": "reproduces"} and "spread" not in by_name["verdict"]
    assert list(result["failed_asserts"]["01_x"]) == [1]  # seed 1's assert cell failed, seed 0's held


def test_seed_spread_groups_and_chapter_7s_editors(tmp_path):
    """book/spread.py: the real-model chapters are a group of their own with their own file, and
    chapter 7's table of editors is kept for every seed that wrote one."""
    import importlib.util
    import pandas as pd
    spec = importlib.util.spec_from_file_location("spread", ROOT / "book" / "spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    embedded, real = spread.GROUPS["embedded"], spread.GROUPS["real"]
    assert not set(embedded[0]) & set(real[0]) and embedded[1] != real[1]
    assert sorted(embedded[0] + real[0]) == sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for seed, step in ((0, 120), (1, 40)):
        (tmp_path / f"seed{seed}").mkdir()
        pd.DataFrame({"editor": ["KE"], "best step": [step], "learned": [seed == 0], "seed": [seed]}).to_csv(
            tmp_path / f"seed{seed}" / spread.EDITORS_FILE, index=False)
    result = spread.collect([0, 1, 2], [spread.EDITORS_CHAPTER], tmp_path, "cmd")
    assert [(r["seed"], r["best step"], r["learned"]) for r in result["editors"]] == [(0, 120, True), (1, 40, False)]
    assert result["pooled_claims"] is None  # chapter 5 is not in this run


def test_history_records_the_glued_values_of_an_execution_cache(tmp_path, monkeypatch):
    """book/history.py: glued values read from a jupyter-cache folder, only the recorded names kept."""
    import importlib.util
    import json
    import sqlite3
    import sys
    spec = importlib.util.spec_from_file_location("history", ROOT / "book" / "history.py")
    history = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(history)
    cache = tmp_path / "cache"
    (cache / "executed" / "k1").mkdir(parents=True)
    nbformat.write(_executed({"ie_val_reliability": "0.74", "ie_best_step": 120, "other": 1}, False),
                   cache / "executed" / "k1" / "base.ipynb")
    db = sqlite3.connect(cache / "global.db")
    db.execute("create table nbcache (hashkey text, uri text)")
    db.execute("insert into nbcache values ('k1', '/book/notebooks/07_real_model.ipynb')")
    db.commit()
    db.close()
    assert history.glued_values(cache)["07_real_model"]["ie_val_reliability"] == "0.74"
    out = tmp_path / "seed1.json"
    monkeypatch.setattr(sys, "argv", ["history.py", "record", str(cache), str(out), "--commit", "abc", "--about", "t"])
    history.main()
    record = json.loads(out.read_text())
    assert record["values"]["07_real_model"] == {"ie_val_reliability": "0.74", "ie_best_step": 120}
    assert record["values"]["05_evaluation"] == {} and not out.with_suffix(".tmp").exists()


def test_seed_spread_pools_chapter_5s_cases_over_seeds(tmp_path):
    """book/spread.py: claims 1-3 tested on every seed's cases together, the seed as the cluster."""
    import importlib.util

    from test_claims import synthetic_cases

    spec = importlib.util.spec_from_file_location("spread", ROOT / "book" / "spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    assert spread.pooled_claims([0, 1], tmp_path) is None  # no seed wrote its cases
    for seed in (0, 1, 2):
        (tmp_path / f"seed{seed}").mkdir()
        synthetic_cases(0.3, n=10, seed=seed).to_csv(tmp_path / f"seed{seed}" / spread.CASES_FILE, index=False)
    pooled = spread.pooled_claims([0, 1, 2], tmp_path)
    assert pooled["seeds"] == [0, 1, 2]
    rows = {r["claim"]: r for r in pooled["rows"]}
    assert rows["1: multi-task editing (Table 3)"]["clusters"] == 3  # three seeds, not 30 cases
    assert rows["1: multi-task editing (Table 3)"]["outcome"] == "reproduces"
