"""The published files in the data folder (``$INSTRUCTEDIT_DATA``), by name (book chapter 1).

Messages and records name a file by its path relative to the data folder
(``knowedit/wiki_recent_recent_train.json``), never by a folder of one machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..records import EditRecord
from .formats import load_convsent, load_counterfact_mend, load_knowedit, load_zsre_mend
from .instruction_file import load_instruction_file

#: Environment variable naming the folder that holds the real files.
ENV_VAR = "INSTRUCTEDIT_DATA"
#: The official instruction file, relative to the data folder.
INSTRUCTION_FILE = "instructedit_instructions.json"

Loader = Callable[..., list[EditRecord]]

#: name -> (path relative to the data folder, loader, task the records get).
REAL_FILES: dict[str, tuple[str, Loader, str]] = {
    "wiki_counterfact": ("knowedit/wiki_counterfact_train_cf.json", load_knowedit, "counterfact"),
    "wiki_recent": ("knowedit/wiki_recent_recent_train.json", load_knowedit, "wikirecent"),
    "zsre_knowedit": ("knowedit/ZsRE-test-all.json", load_knowedit, "zsre"),
    "zsre_mend_portability": ("zsre/zsre_mend_eval_portability.json", load_zsre_mend, "zsre"),
    "zsre_mend_train": ("zsre/zsre_mend_train-1k.json", load_zsre_mend, "zsre"),
    "convsent_test": ("convsent/blender_test.json", load_convsent, "convsent"),
    "convsent_val": ("convsent/blender_val.json", load_convsent, "convsent"),
    "counterfact_mend_train": ("counterfact_mend/counterfact-train.json", load_counterfact_mend, "counterfact"),
    "counterfact_mend_val": ("counterfact_mend/counterfact-val.json", load_counterfact_mend, "counterfact"),
    "counterfact_mend_edit": ("counterfact_mend/counterfact-edit.json", load_counterfact_mend, "counterfact"),
}


def data_dir(path: str | Path | None = None) -> Path | None:
    """The folder of real files: ``path``, else ``$INSTRUCTEDIT_DATA``, else ``None``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else None


def _real_root(root: str | Path | None) -> Path:
    folder = data_dir(root)
    if folder is None:
        raise FileNotFoundError(f"no data folder: pass root= or set {ENV_VAR} "
                                f"(`instructedit-lite fetch-data DIR` downloads what has a public home)")
    return folder


def available_real_files(root: str | Path | None = None) -> list[str]:
    """Names in ``REAL_FILES`` whose file exists in the data folder (``[]`` without one)."""
    folder = data_dir(root)
    if folder is None:
        return []
    return [name for name, (rel, _, _) in REAL_FILES.items() if (folder / rel).is_file()]


def load_real(name: str, root: str | Path | None = None, limit: int | None = None, *,
              on_error: str = "skip") -> list[EditRecord]:
    """Load one of ``REAL_FILES`` from the data folder.

    Defaults to ``on_error="skip"``: the published files hold a few unusable items, reported as
    one :class:`~instructedit_lite.loaders.SkippedDataWarning` per field (or gathered into a table
    with :func:`~instructedit_lite.loaders.collect_skipped`); pass ``"raise"`` to stop at the
    first one instead.
    """
    if name not in REAL_FILES:
        raise ValueError(f"unknown real file {name!r}; known: {sorted(REAL_FILES)}")
    rel, loader, task = REAL_FILES[name]
    folder = _real_root(root)
    if not (folder / rel).is_file():
        raise FileNotFoundError(f"{name}: no file {rel} in the data folder {folder}")
    return loader(folder / rel, task=task, limit=limit, on_error=on_error, source=rel)


def load_real_instructions(root: str | Path | None = None) -> dict[str, Any]:
    """:func:`load_instruction_file` on the data folder's official instruction file."""
    folder = _real_root(root)
    if not (folder / INSTRUCTION_FILE).is_file():
        raise FileNotFoundError(f"no file {INSTRUCTION_FILE} in the data folder {folder}")
    return load_instruction_file(folder / INSTRUCTION_FILE, source=INSTRUCTION_FILE)
