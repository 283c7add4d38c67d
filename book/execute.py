"""Execute the book's chapters side by side into jupyter-book's execution cache (``make book``).

    python book/execute.py [--out .] [--jobs 2]

``jupyter-book build`` executes one notebook at a time, and most chapters run on one thread (the
embedded model's matrices are small, chapter 3), so on a 2-core machine half of it idles.  This
script runs the table of contents' notebooks ``--jobs`` at a time through jupyter-cache, into the
cache that ``jupyter-book build --path-output OUT`` reads (``OUT/_build/.jupyter_cache``); the
build then finds every chapter there and only renders.  Chapters that need the same base model or
editor do not build it twice: the first takes the cache entry's lock
(:func:`instructedit_lite.atomic.building`), the other waits and loads it.  A chapter already in
the cache with the same code is skipped; one that fails stays out of the cache, so that
``jupyter-book build`` executes it again and stops on its error.  The chapters start in the order
of their last run times (longest first), or of :data:`FIRST` the first time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.executors.basic import ExecutionWorkerLocalMProc, ProcessData

ROOT = Path(__file__).resolve().parent.parent
#: Start order without earlier run times: the chapters that build what others need (the
#: embedded editors, chapter 4), and the long independent one (the real model, chapter 7), first.
FIRST = ["04_multitask_training", "07_real_model", "05_evaluation", "06_gradient_analysis",
         "09_beyond_one_edit", "10_instruction_search", "01_datasets", "03_mend_hypernetwork"]
TIMEOUT = 1500  # seconds per notebook, as in _config.yml


def toc_notebooks() -> list[Path]:
    """The ``.ipynb`` chapters of ``_toc.yml``, in book order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [ch["file"] for part in toc.get("parts", []) for ch in part.get("chapters", [])]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def last_seconds(cache_path: Path) -> dict[str, float]:
    """Execution seconds of each notebook's latest cached run (by file stem), if any."""
    db = cache_path / "global.db"
    if not db.exists():
        return {}
    out = {}
    for uri, data in sqlite3.connect(db).execute("select uri, data from nbcache order by created"):
        seconds = json.loads(data or "{}").get("execution_seconds")
        if seconds is not None:
            out[Path(uri).stem] = float(seconds)
    return out


def _run(data: ProcessData) -> tuple[int, str, float]:
    start = time.perf_counter()
    status, uri = ExecutionWorkerLocalMProc()(data)
    return status, uri, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="jupyter-book's --path-output (default: the repository)")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at a time (default 2)")
    args = parser.parse_args()
    cache_path = (ROOT / args.out / "_build" / ".jupyter_cache").resolve()
    cache = get_cache(str(cache_path))
    seconds = last_seconds(cache_path)
    todo = []
    for path in toc_notebooks():
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
            continue  # this code ran before: nothing to do
        except KeyError:
            todo.append(cache.add_nb_to_project(str(path)))
    if not todo:
        print("execute: every chapter is in the cache")
        return 0
    rank = {stem: i for i, stem in enumerate(FIRST)}
    todo.sort(key=lambda r: (-seconds.get(Path(r.uri).stem, 0.0), rank.get(Path(r.uri).stem, len(FIRST))))
    print(f"execute: {len(todo)} chapter(s), {args.jobs} at a time: " + ", ".join(Path(r.uri).stem for r in todo),
          flush=True)
    # One core's share each: a kernel's BLAS threads and the editor-training processes of
    # train_editors, which would otherwise each take every core and spin-wait on each other (a
    # first cold try with the defaults ran chapter 7 beside chapter 4's training and timed out).
    share = str(max(1, (os.cpu_count() or 1) // args.jobs))
    os.environ.update(OMP_NUM_THREADS=share, MKL_NUM_THREADS=share, INSTRUCTEDIT_WORKERS=share)
    jobs = [ProcessData(r.pk, r.uri, cache, TIMEOUT, False) for r in todo]
    start = time.perf_counter()
    failed = []
    # fork, as jupyter-cache's own parallel executor: this process never imports torch, and each
    # notebook runs in a kernel process of its own
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for status, uri, spent in pool.imap_unordered(_run, jobs, chunksize=1):
            state = "ok" if status == 0 else "FAILED (jupyter-book will run it again and show the error)"
            print(f"execute: {Path(uri).stem} {state} in {spent:.0f} s", flush=True)
            if status:
                failed.append(uri)
    print(f"execute: {time.perf_counter() - start:.0f} s in all", flush=True)
    return 0  # jupyter-book build is the judge: it re-executes a failed chapter and fails on it


if __name__ == "__main__":
    raise SystemExit(main())
