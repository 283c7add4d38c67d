"""A real-model chapter without its model: the guard shows what is missing, glues "n/a" for the
skipped prose and skips the guarded cells, and resumes where a section ends."""

from __future__ import annotations

import json

import nbformat
import papermill
import pytest

from instructedit_lite import guard


def notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src[3:]) if src.startswith("md:") else nbformat.v4.new_code_cell(src)
                for src in cells]
    nbformat.write(nb, str(path))
    return path


CHAPTER = [
    "md:Before: {glue:text}`early`; the next section says {glue:text}`real_intro`.",
    "from myst_nb import glue\nglue('early', 1, display=False)",
    "from instructedit_lite.guard import require_real_model\n"
    "ready = require_real_model('chapter.ipynb', until='# end of the section', prefix='real_')",
    "md:The model has {glue:text}`real_blocks` blocks; earlier {glue:text}`early`.",
    "raise RuntimeError('a skipped cell ran')",
    "md:And {glue:}`real_speed` and {glue:text}`real_speed`.",
    "glue('real_blocks', 30, display=False)\nglue('real_speed', 2, display=False)",
    "# end of the section\nprint('resumed', ready)",
    "md:After: {glue:text}`real_after`.",
    "glue('real_after', 3, display=False)",
]


def test_the_skipped_names_are_those_of_the_guarded_part(tmp_path):
    path = notebook(tmp_path / "chapter.ipynb", CHAPTER)
    assert guard.skipped_names(path, "# end of the section", "real_") == ["real_intro", "real_blocks", "real_speed"]
    # without a prefix the earlier section's name counts too; without an end, the whole rest
    assert guard.skipped_names(path, "# end of the section") == ["early", "real_intro", "real_blocks", "real_speed"]
    assert guard.cited_elsewhere(path) == []  # not in a book: no other pages
    assert guard.skipped_names(path, None, "real_") == ["real_intro", "real_blocks", "real_speed", "real_after"]


def test_a_notebook_without_the_guard_is_a_clear_error(tmp_path):
    path = notebook(tmp_path / "plain.ipynb", ["print(1)"])
    with pytest.raises(ValueError, match=r"plain\.ipynb: no code cell calls require_real_model"):
        guard.skipped_names(path)
    with pytest.raises(ValueError, match=r"missing\.ipynb: cannot read"):
        guard.skipped_names(tmp_path / "missing.ipynb")


def test_with_the_model_and_the_data_the_guard_does_nothing(monkeypatch):
    monkeypatch.setattr(guard.models, "missing", lambda *a, **k: [])
    assert guard.require_real_model("no-such-notebook.ipynb") is True  # the file is not even read


class Shell:
    def __init__(self):
        self.input_transformers_cleanup = []


def test_the_cell_skipper_empties_cells_until_the_marker_and_removes_itself():
    shell = Shell()
    skipper = guard.CellSkipper(shell, "# end").install()
    assert skipper(["x = 1\n", "y = 2\n"]) == []
    assert skipper(["# end\n", "z = 3\n"]) == ["# end\n", "z = 3\n"]
    assert shell.input_transformers_cleanup == []
    forever = guard.CellSkipper(shell).install()  # no marker: the rest of the notebook
    assert forever(["# end\n"]) == [] and shell.input_transformers_cleanup == [forever]


@pytest.mark.notebooks
def test_without_the_data_the_section_is_skipped_and_the_chapter_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("INSTRUCTEDIT_DATA", str(tmp_path / "no-data"))
    path = notebook(tmp_path / "chapter.ipynb", CHAPTER)
    out = papermill.execute_notebook(str(path), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                                     kernel_name="python3", progress_bar=False, log_output=False)
    glued = {o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/plain"]
             for c in out.cells for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}
    skipped = {name: "'n/a'" for name in ("real_intro", "real_blocks", "real_speed")}
    assert glued == {"early": "1", **skipped, "real_after": "3"}
    shown = json.dumps(out.cells[2].outputs)
    assert guard.NOTE in shown and "no-data" in shown  # what is missing, by path
    assert out.cells[4].outputs == []  # skipped: it would have raised
    assert "resumed False" in out.cells[7].outputs[0]["text"]


def test_values_other_pages_cite_are_skipped_names_too(tmp_path):
    (tmp_path / "_toc.yml").write_text("root: intro\n")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "summary.md").write_text(
        "Blocks: {glue:text}`/notebooks/chapter.ipynb::real_cited:s`; "
        "another chapter's {glue:text}`/notebooks/other.ipynb::real_other`.")
    (tmp_path / "notebooks").mkdir()
    path = notebook(tmp_path / "notebooks" / "chapter.ipynb", CHAPTER)
    assert guard.cited_elsewhere(path) == ["real_cited"]
    assert guard.skipped_names(path, "# end of the section", "real_")[-1] == "real_cited"
