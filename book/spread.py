"""Run the chapters for several seeds and record the spread of their glued numbers (book: Reproducibility).

    python book/spread.py run --seeds 0 1 2        # papermill, one seed after the other
    python book/spread.py collect --seeds 0 1 2    # read the executed notebooks, write the JSON
    python book/spread.py both --group real        # chapters 7-10 (SmolLM2), their own JSON

The chapters come in two groups, each with its file: ``embedded`` (chapters 1-6, the embedded
world: ``book/_static/seed_spread.json``) and ``real`` (chapters 7-10, SmolLM2 on the published
data: ``book/_static/seed_spread_real.json``); ``make spread`` runs both.

A seed changes the world, the pretrained base model, the editors and the evaluation, a harsher
perturbation than another CPU. Assert cells are tagged ``raises-exception`` for these runs, so a
failing claim is recorded (``failed_asserts``) instead of stopping the other chapters.

Chapter 5 also writes its table of evaluated cases for each seed (its ``cases_out`` parameter);
``collect`` pools them and tests claims 1-3 over seeds and cases
(:func:`instructedit_lite.claims.experiment_claims` with the seed as the cluster, the unit of
replication), into ``pooled_claims``.  Chapter 7 writes its table of trained SmolLM2 editors (its
``editors_out`` parameter: best step, validation reliability before and after, learned or not);
``collect`` keeps every seed's rows, into ``editors``.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from instructedit_lite.atomic import atomic_write_text

#: The chapter whose evaluated cases are pooled over seeds, and the file name of each seed's table.
CASES_CHAPTER, CASES_FILE = "05_evaluation", "05_cases.csv"
#: The chapter whose trained editors are recorded for each seed, and the file name of its table.
EDITORS_CHAPTER, EDITORS_FILE = "07_real_model", "07_editors.csv"
#: Chapter → the parameter that makes it write its table for this script.
TABLE_PARAMETERS = {CASES_CHAPTER: ("cases_out", CASES_FILE), EDITORS_CHAPTER: ("editors_out", EDITORS_FILE)}

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {  # group → (chapters, the JSON it writes)
    "embedded": (["01_datasets", "02_instructions", "03_mend_hypernetwork", "04_multitask_training",
                  "05_evaluation", "06_gradient_analysis"], ROOT / "book" / "_static" / "seed_spread.json"),
    "real": (["07_real_model", "08_real_experiments", "09_beyond_one_edit", "10_instruction_search"],
             ROOT / "book" / "_static" / "seed_spread_real.json"),
}
CHAPTERS, OUT_JSON = GROUPS["embedded"]
GLUE_MIME = "application/papermill.record/text/plain"


def is_assert_cell(cell) -> bool:
    """The convention of tests/test_notebooks.py: assert cells are the ones tagged remove-input."""
    return cell.cell_type == "code" and "remove-input" in cell.metadata.get("tags", [])


def tolerant_copy(src: Path, dst: Path) -> None:
    """A copy of the chapter whose assert cells may fail without stopping the run."""
    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        if is_assert_cell(cell):
            cell.metadata.setdefault("tags", []).append("raises-exception")
    nbformat.write(nb, dst)


def run(seeds: list[int], chapters: list[str], work: Path) -> None:
    """Execute every chapter for every seed with papermill, one after the other."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("INSTRUCTEDIT_SEED", None)  # the seed is passed as the papermill parameter
    for seed in seeds:
        out = work / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        for chapter in chapters:
            src = out / f"{chapter}.input.ipynb"
            tolerant_copy(ROOT / "notebooks" / f"{chapter}.ipynb", src)
            start = time.perf_counter()
            parameter, file = TABLE_PARAMETERS.get(chapter, (None, None))
            cases = ["-p", parameter, str(out / file)] if parameter else []
            code = subprocess.call([sys.executable, "-m", "papermill", str(src), str(out / f"{chapter}.ipynb"),
                                    "--cwd", str(ROOT / "notebooks"), "-p", "seed", str(seed),
                                    "-p", "smoke", "False", *cases, "--no-progress-bar"], env=env)
            print(f"seed {seed} {chapter}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)


def as_number(value):
    """A glued value as a number where it reads as one ("1,309" → 1309.0, "76.5%" → 76.5)."""
    if isinstance(value, str):
        try:
            return float(value.replace(",", "").rstrip("%"))
        except ValueError:
            pass
    return value


def glued(path: Path) -> tuple[dict[str, object], list[str]]:
    """The glued values of an executed notebook (numbers parsed) and the sources of failed asserts."""
    nb = nbformat.read(path, as_version=4)
    values, failed = {}, []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name and GLUE_MIME in output.get("data", {}):
                text = output["data"][GLUE_MIME]
                try:
                    values[name] = as_number(ast.literal_eval(text))
                except (ValueError, SyntaxError):  # a glued table or figure, not a quantity
                    continue
            if output.get("output_type") == "error" and is_assert_cell(cell):
                failed.append(cell.source.strip().splitlines()[-1][:120])
    return values, failed


def collect(seeds: list[int], chapters: list[str], work: Path, command: str) -> dict:
    """Per-seed glued values of every chapter, with min, max and spread of the numeric ones."""
    rows, failures, measured = {}, {}, {}
    for seed in seeds:
        for chapter in chapters:
            path = work / f"seed{seed}" / f"{chapter}.ipynb"
            if not path.exists() or not nbformat.read(path, as_version=4).metadata.get(
                    "papermill", {}).get("end_time"):
                continue  # not run, or still running: its values are not all there yet
            measured.setdefault(str(seed), []).append(chapter)
            values, failed = glued(path)
            for name, value in values.items():
                rows.setdefault((chapter, name), {})[seed] = value
            if failed:
                failures.setdefault(chapter, {})[seed] = failed
    quantities = []
    for (chapter, name), per_seed in sorted(rows.items()):
        numbers = [v for v in per_seed.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        entry = {"chapter": chapter, "name": name, "values": {str(s): v for s, v in per_seed.items()}}
        if len(numbers) == len(per_seed) >= 2:  # a spread needs two seeds
            entry.update(min=min(numbers), max=max(numbers), spread=max(numbers) - min(numbers))
        quantities.append(entry)
    return {"command": command, "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
                       f"Python {platform.python_version()}",
            "seeds": seeds, "measured": measured, "failed_asserts": failures, "quantities": quantities,
            "pooled_claims": pooled_claims(seeds, work) if CASES_CHAPTER in chapters else None,
            "editors": editors(seeds, work) if EDITORS_CHAPTER in chapters else None}


def editors(seeds: list[int], work: Path) -> list[dict] | None:
    """Every seed's rows of chapter 7's table of trained editors; None when no seed wrote one."""
    import pandas as pd

    paths = [work / f"seed{s}" / EDITORS_FILE for s in seeds]
    tables = [pd.read_csv(path) for path in paths if path.exists()]
    return pd.concat(tables, ignore_index=True).to_dict(orient="records") if tables else None


def _commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def pooled_claims(seeds: list[int], work: Path) -> dict | None:
    """Claims 1-3 tested on every seed's cases together, the seed as the cluster; None when fewer
    than two seeds wrote their cases."""
    import pandas as pd

    from instructedit_lite import claims

    tables = [pd.read_csv(work / f"seed{s}" / CASES_FILE).assign(seed=s) for s in seeds
              if (work / f"seed{s}" / CASES_FILE).exists()]
    if len(tables) < 2:
        return None
    pooled = claims.experiment_claims(pd.concat(tables, ignore_index=True))
    rows = claims.claim_rows(pooled).reset_index()
    return {"seeds": sorted({int(t["seed"].iloc[0]) for t in tables}), "rows": rows.to_dict(orient="records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["run", "collect", "both"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--group", choices=sorted(GROUPS), default="embedded",
                        help="which chapters, and so which JSON (default: embedded, chapters 1-6)")
    parser.add_argument("--chapters", nargs="+", help="a subset of the group's chapters")
    parser.add_argument("--work", type=Path, default=ROOT / "_build" / "spread")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    group_chapters, group_out = GROUPS[args.group]
    args.out = args.out or group_out
    chosen = args.chapters or group_chapters
    unknown = sorted(set(chosen) - set(group_chapters))
    if unknown:
        parser.error(f"--chapters {unknown} are not in group {args.group!r}: {group_chapters}")
    args.chapters = chosen
    if args.action in ("run", "both"):
        run(args.seeds, args.chapters, args.work)
    if args.action in ("collect", "both"):
        command = f"python book/spread.py both --group {args.group} --seeds " + " ".join(map(str, args.seeds))
        if args.chapters != group_chapters:
            command += " --chapters " + " ".join(args.chapters)
        result = collect(args.seeds, args.chapters, args.work, command)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}: {len(result['quantities'])} quantities, failed asserts: {result['failed_asserts']}")


if __name__ == "__main__":
    main()
