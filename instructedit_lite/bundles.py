"""The verification's bundles: written, read and checked against what the code declares today.

A bundle is ``results/<model>/verification.json`` (provenance, plan, configuration hashes, claims,
editors, wall time) beside ``cases.csv`` (gzipped above 5 MB), written by
:func:`~instructedit_lite.verify.verify`.  :func:`declared_hashes` says what the code declares
today for a plan: each editor's configuration key by seed, and one hash of the evaluation's
declaration; :func:`check` (``instructedit-lite verify --check``, run by ``make test``) compares
the two and names what changed and the command that refreshes it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .atomic import atomic_write, atomic_write_text
from .claims import CLAIMS
from .experiments import editor_configs
from .generation import WILD_MAX_TOKENS
from .models import MODELS
from .tables import METRICS
from .train import TRAIN_VERSION

__all__ = ["VERIFY_VERSION", "RESULTS", "declared_hashes", "write_bundle", "load_bundle", "check", "main_check"]

#: Bumped whenever a change here changes what a verification run produces.
VERIFY_VERSION = 1
#: Where the bundles live (one folder per model).
RESULTS = Path("results")
#: A bundle's per-case table is gzipped above this size.
GZIP_ABOVE = 5_000_000
#: Columns that depend on the machine's load, not on the case (left out of comparisons).
TIMING_COLUMNS = ("edit_seconds",)


def _hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _editor_keys(model: Any, plan: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    return {str(seed): {name: c.key() for name, c in editor_configs(seed, size=plan["size"], model=model).items()}
            for seed in plan["seeds"]}


def _evaluation_declaration(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Everything besides the editors that changes the rows or the verdicts."""
    return {"verify_version": VERIFY_VERSION, "train_version": TRAIN_VERSION, "metrics": list(METRICS),
            "wild_tokens": WILD_MAX_TOKENS, "records": plan["records"], "baseline_records": plan["baseline_records"],
            "claims": [(c.key, c.test, c.target) for c in CLAIMS]}


def declared_hashes(model: Any, plan: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration hashes the code declares today for ``plan``: each editor's configuration
    key by seed, and one hash of the evaluation's declaration (metrics, WILD cap, records, claims)."""
    return {"editors": _editor_keys(model, plan), "evaluation": _hash(_evaluation_declaration(plan))}


def _folder(model: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)


def write_bundle(folder: Path, bundle: Mapping[str, Any], cases: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = cases.drop(columns=[c for c in TIMING_COLUMNS if c in cases]).to_csv(index=False)
    data = text.encode()
    if len(data) > GZIP_ABOVE:
        atomic_write(folder / "cases.csv.gz", lambda f: f.write(gzip.compress(data, mtime=0)))
        (folder / "cases.csv").unlink(missing_ok=True)
    else:
        atomic_write_text(folder / "cases.csv", text)
        (folder / "cases.csv.gz").unlink(missing_ok=True)
    atomic_write_text(folder / "verification.json", json.dumps(bundle, indent=1, default=str) + "\n")


def load_bundle(model: str = "embedded", results: str | os.PathLike = RESULTS) -> tuple[dict, pd.DataFrame] | None:
    """``(bundle, cases)`` of ``results/<model>``, or None when no verification has been recorded."""
    folder = Path(results) / _folder(model)
    path = folder / "verification.json"
    if not path.exists():
        return None
    bundle = json.loads(path.read_text())
    table = folder / "cases.csv"
    if table.exists():
        cases = pd.read_csv(table)
    else:
        cases = pd.read_csv(io.BytesIO(gzip.decompress((folder / "cases.csv.gz").read_bytes())))
    return bundle, cases


def check(results: str | os.PathLike = RESULTS) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: a problem for every bundle whose recorded hashes differ from what the
    code declares today (naming the changed part and the command that refreshes it); a note for
    every declared model without a bundle."""
    problems, notes = [], []
    results = Path(results)
    for name in MODELS:
        path = results / _folder(name) / "verification.json"
        if not path.exists():
            notes.append(f"{name}: no verification recorded ({path}); run `instructedit-lite verify --model {name}`")
            continue
        bundle = json.loads(path.read_text())
        refresh = f"refresh with `{bundle.get('command') or 'instructedit-lite verify --model ' + name}`"
        today = declared_hashes(name, bundle["plan"])
        if today["evaluation"] != bundle["hashes"]["evaluation"]:
            problems.append(f"{path}: the evaluation's declaration changed (metrics, WILD cap, records, claims or "
                            f"the verification code's version); {refresh}")
        for seed, recorded in bundle["hashes"]["editors"].items():
            now = today["editors"].get(seed, {})
            for editor in sorted(set(recorded) | set(now)):
                if recorded.get(editor) != now.get(editor):
                    problems.append(f"{path}: the configuration of editor {editor!r} (seed {seed}) changed "
                                    f"({recorded.get(editor)} -> {now.get(editor)}); {refresh}")
    return problems, notes


def main_check(results: str | os.PathLike = RESULTS, stream=None) -> int:
    """``verify --check``: 0 when every recorded bundle is current, 1 (and why) otherwise."""
    stream = stream or sys.stdout
    problems, notes = check(results)
    for line in notes:
        print(f"note: {line}", file=stream)
    for line in problems:
        print(f"stale: {line}", file=stream)
    if not problems:
        print(f"verify --check: every recorded bundle under {results} is current", file=stream)
    return 1 if problems else 0
