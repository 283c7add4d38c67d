"""``instructedit-lite verify``: the run that decides the paper's claims, kept as a bundle under ``results/``.

The chapters run the experiments at demonstration size: they show the method at work and cannot
decide the claims.  This run repeats experiments 1-3 (multi-task editing, the held-out task,
unseen instructions) over several seeds, with the seed as the unit of replication (on the embedded
model a seed is a world, its base model and its editors; on a real model a split of the published
files and the editors), with editors trained until their validation stops improving
(the ``"verify"`` size of ``train/config.py``'s ``SIZES``), on enough test records per task
that an interval can decide a claim (:data:`PLAN`), and decides each claim by the rules of
:mod:`~instructedit_lite.claims` over seeds and cases.

Nothing is lost and nothing is repeated: editors are cached (and resume from their checkpoints);
each evaluated case is a line of a journal, appended and synced to disk, so a run killed at any
moment resumes where it stopped and ends with the rows an uninterrupted run ends with (every case
depends only on its method, record and seed).  The result is written atomically to
``results/<model>/verification.json`` (provenance, plan, configuration hashes, every claim's
outcome, interval, n and mde, each editor's validation curve, wall time per phase) beside the
per-case table ``cases.csv``; :mod:`~instructedit_lite.bundles` writes, reads and checks it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy
import pandas as pd
import scipy
import torch
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_write_text
from .bundles import RESULTS, _evaluation_declaration, _folder, _hash, write_bundle
from .claims import CLAIMS, claims_json, experiment_claims
from .evaluate import evaluate_methods
from .experiments import build_methods, editor_configs, evaluation_models, evaluation_records, methods_not_learned
from .generation import WILD_MAX_TOKENS
from .methods import get_method
from .models import load_model
from .parallel import cores
from .paths import cache_dir
from .progress import bar_disabled
from .tasks import trainable_tasks
from .train import learning_problem, train_editors

__all__ = ["PLAN", "plan_for", "CaseJournal", "verify"]

#: What the run evaluates on each scale: test records per task for every comparison a claim rests
#: on (the unedited model and the meta-trained methods: InstructEdit with seen and unseen
#: instructions, multi-task and single-task MEND, KE), or the whole test split where it is
#: smaller; records per task for the baselines (FT-L, FT-M, GRACE, CaliNet), on the first seed
#: only (they do not train, so a seed changes only the records on a real model); the seeds.
#: 150 records per task give a standard error of about 1.7 points for experiment 1's paired
#: difference (its spread is about 0.20-0.25 per case), what a gain of 14.86 points needs to clear
#: +10 with 80% power.
PLAN: dict[str, dict[str, Any]] = {
    "embedded": {"records": 150, "baseline_records": 50, "seeds": (0, 1, 2)},
    "real": {"records": 150, "baseline_records": 50, "seeds": (0, 1, 2)},
}
def plan_for(model: str, scale: str, *, seeds: Sequence[int] | None = None, records: int | None = None,
             baseline_records: int | None = None, size: str = "verify") -> dict[str, Any]:
    """The run's declared plan: the model, seeds, records per task, the editors' size."""
    declared = PLAN[scale]
    return {"model": model, "scale": scale, "size": size,
            "seeds": [int(s) for s in (seeds if seeds is not None else declared["seeds"])],
            "records": int(records or declared["records"]),
            "baseline_records": int(declared["baseline_records"] if baseline_records is None else baseline_records)}


class CaseJournal:
    """Evaluated cases, one JSON line each, appended and synced to disk.

    A run killed while writing leaves at most one partial last line, which the next run drops;
    ``done()`` says which (method, task, case) rows exist."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            keep = raw[: raw.rfind(b"\n") + 1]  # a partial last line (a kill mid-write) is dropped
            if len(keep) != len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(len(keep))
            self.rows = [json.loads(line) for line in keep.decode().splitlines() if line.strip()]

    def done(self) -> set[tuple[str, str, int]]:
        return {(r["method"], r["task"], int(r["case"])) for r in self.rows}

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = [json.loads(json.dumps(dict(r), default=_plain, sort_keys=True)) for r in rows]  # as read back
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        self.rows += rows


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _commit() -> str:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", ".")  # the package's files (run from its folder)
    return commit + ("-dirty" if dirty else "")


def _machine(device: str) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {"cores": cores(), "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "gpu": gpu, "device": device}


def _packages() -> dict[str, str]:
    import transformers  # heavy: only when a bundle is written

    return {"instructedit_lite": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "pandas": pd.__version__,
            "scipy": scipy.__version__}


def _editor_summary(trained) -> dict[str, Any]:
    s = trained.summary
    curve = trained.validation[["step", "val_loss", "val_reliability", "val_locality"]].round(5)
    return {"config_key": trained.config.key(), "edits": s["steps"], "cap": trained.config.steps,
            "best_step": s["best_step"], "early_stopped": bool(s.get("early_stopped", False)),
            "train_seconds": round(s["train_seconds"], 1), "did_not_learn": learning_problem(trained),
            "validation": curve.to_dict(orient="list")}


def _evaluate_seed(edited, methods: Mapping[str, Any], records: Mapping[str, list], journal: CaseJournal, *,
                   seed: int, processes: int, chunk: int, bar) -> None:
    """Evaluate every (method, record) pair not yet in ``journal``, ``chunk`` records at a time."""
    done = journal.done()
    todo: dict[tuple[str, ...], list] = {}
    for task, recs in records.items():
        for rec in recs:
            pending = tuple(m for m in _evaluated_on(methods, task) if (m, task, int(rec.index)) not in done)
            if pending:
                todo.setdefault(pending, []).append(rec)
    for names, recs in todo.items():
        for start in range(0, len(recs), chunk):
            part = recs[start:start + chunk]
            cases = evaluate_methods([methods[n] for n in names], edited.model, edited.tokenizer, part,
                                     fluency_cases=0, generation=True, wild_tokens=WILD_MAX_TOKENS, seed=seed,
                                     progress=False, processes=min(processes, len(part)))
            journal.append(cases.assign(seed=seed).to_dict(orient="records"))
            bar.update(len(part) * len(names))


def _evaluated_on(methods: Mapping[str, Any], task: str) -> list[str]:
    """The methods evaluated on ``task``: all, except a per-task editor on a held-out task
    (there is no single-task ZsRE editor), as in :func:`~instructedit_lite.experiments.main_evaluation`."""
    return [m for m in methods if task in trainable_tasks() or get_method(m).held_out]


def _pending(methods, records, journal: CaseJournal) -> int:
    done = journal.done()
    return sum(1 for task, recs in records.items() for r in recs for m in _evaluated_on(methods, task)
               if (m, task, int(r.index)) not in done)


def _records(base, n: int) -> dict[str, list]:
    """The first ``n`` test records of each task (the whole split where it is smaller)."""
    return evaluation_records(base.world, n)


def verify(model: str = "embedded", *, seeds: Sequence[int] | None = None, records: int | None = None,
           baseline_records: int | None = None, data=None, device: str = "cpu", out: str | os.PathLike = RESULTS,
           size: str = "verify", processes: int | None = None, chunk: int | None = None,
           work: str | os.PathLike | None = None, command: str | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the verification of ``model`` and write its bundle to ``out/<model>/``.

    For each seed: load the model (:func:`~instructedit_lite.models.load_model`), train (or load)
    every editor a registered method needs at ``size``, evaluate the unedited model and the
    meta-trained methods on ``records`` test records per task and, on the first seed, the
    baselines on ``baseline_records``; then decide experiments 1-3 over seeds and cases.
    ``work``: the journal folder (default under the cache, named by the plan's hash).  Returns
    the bundle."""
    started = time.perf_counter()
    processes = processes or cores()
    chunk = chunk or 25 * processes
    scale = "embedded" if model == "embedded" else "real"
    plan = plan_for(model, scale, seeds=seeds, records=records, baseline_records=baseline_records, size=size)
    work = Path(work) if work is not None else cache_dir() / "verify" / f"{model}-{_hash(plan)}"
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    editors: dict[str, Any] = {}
    not_learned: dict[str, list[str]] = {}
    keys: dict[str, dict[str, str]] = {}
    frames = []
    baseline_cases: set[tuple[str, int]] = set()
    for seed in plan["seeds"]:
        phase = time.perf_counter()
        base = load_model(model, data=data, seed=seed, size="smoke" if size == "smoke" else "default",
                          progress=progress)
        if device != "cpu":
            base.model.to(device)
        timings[f"seed {seed}: load_s"] = time.perf_counter() - phase
        phase = time.perf_counter()
        configs = editor_configs(seed, size=size, model=base)
        trained = train_editors(configs, base, processes=processes, progress=progress)
        timings[f"seed {seed}: editors_s"] = timings.get(f"seed {seed}: editors_s", 0.0) + time.perf_counter() - phase
        keys[str(seed)] = {name: t.config.key() for name, t in trained.items()}
        editors[str(seed)] = {name: _editor_summary(t) for name, t in trained.items()}
        for method, why in methods_not_learned(trained).items():
            not_learned.setdefault(method, []).append(f"seed {seed}: {why}")
        built = build_methods(trained, base=base)
        meta = {n: m for n, m in built.items() if get_method(n).family != "baseline"}
        groups = [(meta, _records(base, plan["records"]))]
        if seed == plan["seeds"][0] and plan["baseline_records"]:
            groups.append(({n: m for n, m in built.items() if n not in meta}, _records(base, plan["baseline_records"])))
            baseline_cases = {(t, int(r.index)) for t, rs in groups[-1][1].items() for r in rs}
        journal = CaseJournal(work / f"cases-seed{seed}.jsonl")
        phase = time.perf_counter()
        total = sum(_pending(m, r, journal) for m, r in groups)
        with tqdm(total=total, desc=f"verify {model}, seed {seed}: cases", disable=bar_disabled(progress)) as bar:
            for methods, recs in groups:
                for edited, group in evaluation_models(methods, base):  # each method on its engine
                    _evaluate_seed(edited, group, recs, journal, seed=seed, processes=processes, chunk=chunk,
                                   bar=bar)
        timings[f"seed {seed}: evaluation_s"] = (timings.get(f"seed {seed}: evaluation_s", 0.0)
                                                 + time.perf_counter() - phase)
        atomic_write_text(timings_path, json.dumps(timings, indent=1))
        wanted = {(n, t, int(r.index)) for methods, recs in groups for t, rs in recs.items()
                  for n in _evaluated_on(methods, t) for r in rs}
        frame = pd.DataFrame(journal.rows)
        keep = [(m, t, int(c)) in wanted for m, t, c in zip(frame["method"], frame["task"], frame["case"])]
        frames.append(frame[keep])
    cases = pd.concat(frames, ignore_index=True).sort_values(["seed", "task", "case", "method"], kind="stable")
    leading = ["seed", "method", "task", "case"]
    cases = cases[leading + sorted(c for c in cases.columns if c not in leading)].reset_index(drop=True)
    reasons = {m: "; ".join(why) for m, why in not_learned.items()}
    baseline = cases["method"].map(lambda m: get_method(m).family == "baseline")
    # the claims' tests compare meta-trained methods, on every seed and record
    claims = experiment_claims(cases[~baseline], seed=plan["seeds"][0], not_learned=reasons)
    # every method, baselines included, on the first seed's baseline records
    first = cases[(cases["seed"] == plan["seeds"][0])
                  & cases.set_index(["task", "case"]).index.isin(list(baseline_cases))]
    with_baselines = experiment_claims(first, seed=plan["seeds"][0], not_learned=reasons) if baseline_cases else None
    bundle = {
        "format": 1, "model": model, "scale": scale, "commit": _commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or "instructedit-lite verify --model " + model, "plan": plan,
        "seeds": plan["seeds"],
        "records_per_task": {m: {str(t): int(n) for t, n in g.groupby("task")["case"].nunique().items()}
                             for m, g in cases.groupby("method")},
        "cases": len(cases), "seeds_per_method": {m: sorted(int(s) for s in g["seed"].unique())
                                                  for m, g in cases.groupby("method")},
        "claims": _claims_summary(claims), "claims_detail": claims_json(claims),
        "with_baselines": None if with_baselines is None else {
            "seed": plan["seeds"][0], "records_per_task": plan["baseline_records"],
            "best_other": with_baselines["multitask"]["best_other"],
            "vs_best_other": with_baselines["multitask"]["vs_best_other"].as_dict(), "averages": _averages(first)},
        "not_learned": reasons,
        "hashes": {"editors": keys, "evaluation": _hash(_evaluation_declaration(plan))},
        "editors": editors,
        "packages": _packages(), "machine": _machine(device),
        "wall_seconds": {**{k: round(v, 1) for k, v in timings.items()},
                         "this_sitting_s": round(time.perf_counter() - started, 1)},
    }
    write_bundle(Path(out) / _folder(model), bundle, cases)
    return bundle


def _averages(cases: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Each method's mean of the headline columns (tasks pooled) on ``cases``."""
    columns = [c for c in ("reliability", "generalization", "locality", "portability", "wild_reliability")
               if c in cases]
    means = cases.groupby("method")[columns].mean().round(4)
    return {m: {c: (None if pd.isna(v) else float(v)) for c, v in row.items()} for m, row in means.iterrows()}


def _claims_summary(claims: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for c in CLAIMS:
        found = claims.get(c.key)
        if found is None:
            out[c.key] = {"label": c.label, "verdict": "not run by verify (chapters 6 and 8 test it at book size)"}
            continue
        test = found.get("test")
        out[c.key] = {"label": c.label, "verdict": found["verdict"], "why": found.get("why", ""),
                      **({} if test is None else {k: v for k, v in test.as_dict().items()
                                                  if k in ("estimate", "low", "high", "level", "n", "clusters", "mde",
                                                           "outcome", "target", "kind")})}
    return out


