"""A real-model chapter without its model: say what is missing and skip the rest.

Chapters 7-10 run on SmolLM2-135M-Instruct and the published task files. A reader who has
neither still builds the whole book: the chapter calls :func:`require_real_model` in one hidden
cell. With the model and the data it only returns ``True``, and the chapter's code reads as if no
guard were there. Without them it

1. shows what is missing (the install hint or the missing files, :func:`~instructedit_lite.models.missing`);
2. glues ``"n/a"`` for every value that the skipped prose cites: the names of the
   ``{glue:text}`` roles in the notebook's Markdown up to the end of the guarded part (those
   that start with ``prefix``, where a section's names share one), so that the page still
   builds with ``-W`` (and the names other pages cite from it, :func:`cited_elsewhere`);
3. skips every later code cell (an IPython input transformer turns them into empty cells), up to
   the end of the notebook or to the first code cell whose first line is ``until``: a chapter whose
   SmolLM2 part is one section resumes there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import models

#: A glue role in Markdown: ``{glue:text}`name```, ``{glue}`name```, ``{glue:md}`name``` ...
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`]+)`")
#: Where other pages of the book live, relative to its root (the folder of ``_toc.yml``): their
#: ``{glue:text}`/notebooks/<chapter>.ipynb::name``` roles cite a chapter's values too.
PAGES = ("*.md", "book/**/*.md", "notebooks/*.ipynb")
#: What marks the guard's own cell in the notebook's source.
CALL = "require_real_model("
#: The value a skipped section's prose shows.
PLACEHOLDER = "n/a"
#: The words that open the note shown in a skipped chapter (tests look for them in the outputs).
NOTE = "This part needs the real model and the real data, and something is missing"


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def skipped_names(notebook: str | Path, until: str | None = None, prefix: str = "") -> list[str]:
    """The glued names that the Markdown of ``notebook`` cites up to the end of the guarded part,
    in reading order: all of them, or those that start with ``prefix``.

    The guarded part runs from the code cell that calls :func:`require_real_model` to the first
    later code cell whose first line is ``until`` (the end of the notebook without one). A
    section's values share a prefix (``real_``): its prose, and a sentence above it that looks
    ahead, cite them, while the values that the chapter's earlier sections glued stand."""
    path = Path(notebook)
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot read the notebook's cells ({err})") from err
    starts = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and CALL in _source(c)]
    if not starts:
        raise ValueError(f"{path}: no code cell calls {CALL}...)")
    names: dict[str, None] = {}
    for i, cell in enumerate(cells):
        source = _source(cell)
        if (i > starts[0] and cell.get("cell_type") == "code" and until is not None
                and source.split("\n", 1)[0].strip() == until):
            break
        if cell.get("cell_type") == "markdown":
            names.update(dict.fromkeys(n for n in GLUE_ROLE.findall(source) if n.startswith(prefix)))
    names.update(dict.fromkeys(n for n in cited_elsewhere(path) if n.startswith(prefix)))
    return list(names)


def cited_elsewhere(notebook: str | Path) -> list[str]:
    """The names of ``notebook`` that other pages of the book cite (``{glue:text}`/notebooks/
    <name>.ipynb::value```), found from the book's root (the nearest folder above with
    ``_toc.yml``); none outside a book."""
    path = Path(notebook).resolve()
    root = next((d for d in path.parents if (d / "_toc.yml").is_file()), None)
    if root is None:
        return []
    role = re.compile(r"\{glue(?::\w+)?\}`/?(?:[\w./-]*/)?" + re.escape(path.name) + r"::([^`:]+)")
    names: dict[str, None] = {}
    for pattern in PAGES:
        for page in sorted(root.glob(pattern)):
            if page.resolve() != path:
                names.update(dict.fromkeys(role.findall(page.read_text(encoding="utf-8"))))
    return list(names)


class CellSkipper:
    """An IPython input transformer: every cell runs as an empty one until a cell whose first line
    is ``until``; that cell runs as written and the transformer removes itself."""

    def __init__(self, shell, until: str | None = None):
        self.shell, self.until = shell, until

    def __call__(self, lines: list[str]) -> list[str]:
        if self.until is not None and lines and lines[0].strip() == self.until:
            self.remove()
            return lines
        return []

    def install(self) -> CellSkipper:
        self.shell.input_transformers_cleanup.append(self)
        return self

    def remove(self) -> None:
        if self in self.shell.input_transformers_cleanup:
            self.shell.input_transformers_cleanup.remove(self)


def require_real_model(notebook: str | Path, *, until: str | None = None, prefix: str = "",
                       model: str = "smollm2", data: str | Path | None = None) -> bool:
    """``True`` when the real model and the data are there; otherwise show what is missing, glue
    ``"n/a"`` for the guarded part's values, skip its code cells (see the module) and return ``False``.

    ``notebook`` is the chapter's file, relative to the folder it runs in (jupyter-book and
    papermill both run a chapter in its own folder)."""
    missing = models.missing(data, model=model)
    if not missing:
        return True
    from IPython import get_ipython
    from IPython.display import Markdown, display
    from myst_nb import glue

    for name in skipped_names(notebook, until, prefix):
        glue(name, PLACEHOLDER, display=False)
    part = "the rest of this chapter is skipped" if until is None else "this section is skipped"
    display(Markdown(f"**{NOTE}: {part}.**"
                     "\n\n" + "\n\n".join(f"```\n{m}\n```" for m in missing)))
    shell = get_ipython()
    if shell is not None:
        CellSkipper(shell, until).install()
    return False
