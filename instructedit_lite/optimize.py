"""The instruction optimisation loop: propose descriptions, score them with a trial editor, keep the best.

The paper wrote its task descriptions with GPT-4 and revised them in a loop (its Figure 2): a
*trial editor* edits with a candidate instruction, its metrics go back to GPT-4, and the
instruction is revised until the metrics stop improving.  Book chapter 10 runs this loop::

    start (9 seen descriptions per task) ──► trial editor scores each ──► incumbent = the best
        ▲                                                                      │
        └── stop? ◄── paired bootstrap: candidate vs incumbent ◄── trial editor ◄── proposer
                                                                (n candidates; filter)

* **Trial editor** (:class:`TrialEditor`): a trained InstructEdit editor (kept fixed: no further
  meta-training) edits a fixed set of validation records with the candidate as each record's
  description.  Records: the *val* split after the first ``skip`` records (those picked the
  editor's checkpoint), so they are disjoint from training, from every test set and from model
  selection.  Per record it reports reliability, generalization and locality
  (:func:`~instructedit_lite.evaluate.evaluate_case`); **the score that drives the search is
  their per-record mean**, averaged over the records.
* **Stop rule**: in each round, the best candidate of a task replaces the task's incumbent only
  if its gain is significant: the 95% paired-bootstrap interval of the per-record score
  difference (:func:`~instructedit_lite.tables.paired_difference`) lies above 0.  A task stops
  after ``patience`` rounds in a row without a significant gain; the loop stops when every task
  has stopped or after ``rounds`` rounds.
* **Output** (:func:`write_instruction_file`): the official file's format, ten descriptions per
  task.  The nine seen slots hold the nine best descriptions by validation score among everything
  scored (the starting ones included; a starting one that stays keeps its slot, a new one takes
  the slot of a dropped one); the held-out tenth stays the starting set's, so the "unseen
  instruction" test keeps meaning the same thing.  The settings and seed are recorded.

Scores and proposals are cached by text (atomic JSON), so a rerun replays without a model call.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .editors import MendMethod
from .evaluate import _forward, evaluate_case, evaluate_methods, locality_rows, paired_difference
from .instructions import InstructionSet
from .paths import cache_dir
from .progress import bar_disabled
from .proposers import CandidateFilter, Proposer, from_brackets, key_hash, to_brackets
from .records import TASKS, EditRecord
from .tasks import is_sentiment

__all__ = ["SearchConfig", "TrialEditor", "score_records", "significant_gain", "SearchResult", "optimize_instructions",
           "write_instruction_file", "compare_on_test", "search_records", "trial_editor", "FACT_TASKS"]

#: Bumped whenever a change here changes what a search produces (part of the cache key and the file).
SEARCH_VERSION = 1
#: The per-record metrics the driving score averages.
SCORE_METRICS = ("reliability", "generalization", "locality")


@dataclass(frozen=True)
class SearchConfig:
    """The loop's settings.  ``candidates``: proposals per task and round (before filtering);
    ``patience``: rounds without a significant gain before a task stops; ``n_val``: search
    records per task, the val split from index ``skip`` on; ``shown``: descriptions (with
    scores) in the proposer's prompt; ``n_boot``: bootstrap resamples of the stop rule."""

    rounds: int = 3
    candidates: int = 3
    patience: int = 2
    n_val: int = 20
    skip: int = 20
    shown: int = 5
    n_boot: int = 1000
    tasks: tuple[str, ...] = TASKS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for name in ("rounds", "candidates", "patience", "n_val", "shown", "n_boot"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.skip < 0:
            raise ValueError(f"SearchConfig.skip must be >= 0, got {self.skip!r}")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"SearchConfig.tasks must be a non-empty subset of {TASKS}, got {self.tasks}")


def search_records(world, config: SearchConfig) -> dict[str, list[EditRecord]]:
    """The trial editor's records: ``val[skip : skip + n_val]`` of each task."""
    out = {t: world.records(t, "val")[config.skip: config.skip + config.n_val] for t in config.tasks}
    for task, recs in out.items():
        if len(recs) < 2:
            raise ValueError(f"search_records: task {task!r} has {len(recs)} val records after skipping "
                             f"{config.skip}; the paired bootstrap needs at least 2")
    return out


#: The tasks a real-model search covers by default: a ConvSent record costs about ten fact records
#: to score on SmolLM2 (21 response rows through the vocabulary head; chapter 10 measures it), so
#: it joins only when asked (``--tasks``, chapter 10's ``full = True``).
FACT_TASKS = tuple(t for t in TASKS if not is_sentiment(t))


def trial_editor(base, trained, config: SearchConfig, start: InstructionSet | None = None, *,
          progress: bool = True) -> "TrialEditor":
    """The :class:`TrialEditor` of a trained InstructEdit editor (a
    :class:`~instructedit_lite.train.TrainedEditor`) of ``base`` (any
    :class:`~instructedit_lite.base_model.BaseModel`; a real one edits through its frozen-prefix
    engine), scoring on :func:`search_records` of its records, from ``start`` (default: its data's
    instructions), its scores cached under :func:`~instructedit_lite.paths.cache_dir`.  The search
    records come after the editor's own validation records (``config.skip`` must not be smaller
    than its ``n_val``: checked), so the records that picked its checkpoint never pick an instruction."""
    if config.skip < trained.config.n_val:
        raise ValueError(f"trial_editor: config.skip={config.skip} would search on the {trained.config.n_val} val "
                         "records that picked the editor's checkpoint; use skip >= the editor's n_val")
    key = f"{base.key}-{trained.config.key()}"
    model = base.for_editing(trained.config.mend.weight_names).model
    return TrialEditor(trained.editor, model, base.tokenizer, search_records(base.world, config),
                       start or base.instructions(), key=key,
                       cache_file=cache_dir() / f"instruction-search-{key}" / "scores.json", progress=progress)


def score_records(cases: pd.DataFrame) -> pd.Series:
    """The driving score of each case: the mean of reliability, generalization and locality
    (those that apply)."""
    return cases[list(SCORE_METRICS)].mean(axis=1, skipna=True)


def _probe_set(start: InstructionSet, task: str, description: str) -> InstructionSet:
    """An instruction set whose held-out description for ``task`` is ``description`` (the rest is
    ``start``'s), so that ``unseen=True`` edits every record with exactly that text and
    :class:`InstructionSet` checks its placeholders."""
    texts = list(start.descriptions[task])
    if description in texts:  # a starting description: swap it into the held-out slot
        i = texts.index(description)
        texts[i], texts[start.heldout_index] = texts[start.heldout_index], texts[i]
    else:
        texts[start.heldout_index] = description
    return InstructionSet(start.template, {task: tuple(texts)}, start.heldout_index, source="candidate description")


class TrialEditor:
    """Scores a description by editing the search records with it (see the module docstring).

    ``editor`` is a trained InstructEdit :class:`~instructedit_lite.editors.mend.MendEditor`; ``key``
    names it and the base model (cache key; e.g. ``f"{base.config.key()}-{config.key()}"``).
    Scores are cached in ``cache_file`` (atomic JSON, rewritten after each new description).
    """

    def __init__(self, editor, model, tokenizer, records: Mapping[str, Sequence[EditRecord]], start: InstructionSet,
                 *, key: str, cache_file: str | Path | None = None, progress: bool = True):
        self.editor, self.model, self.tokenizer, self.start = editor, model, tokenizer, start
        self.records = {t: list(r) for t, r in records.items()}
        self.key, self.progress = key, progress
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache: dict[str, dict] = json.loads(self.cache_file.read_text()) if self.cache_file and self.cache_file.exists() else {}
        self.limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
        self._pre: dict[tuple[str, int], Any] = {}
        self.n_scored = 0  # descriptions scored in this process (not from the cache)

    def _key(self, task: str, description: str) -> str:
        ids = [(r.source, r.index) for r in self.records[task]]
        return key_hash(SEARCH_VERSION, self.key, self.start.template, task, description, ids)

    def fits(self, task: str, description: str) -> bool:
        """Whether every scoring row with ``description`` fits the model's context (a bound: the
        longest instructed prompt plus the longest answer)."""
        method = MendMethod(self.editor, "trial", instructions=_probe_set(self.start, task, description), unseen=True)
        n = lambda s: len(self.tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        for record in self.records[task]:
            rec = method.prepare(record)
            prompts = [rec.prompt, *rec.rephrase, *(p.prompt for p in rec.portability_probes)]
            answers = [rec.target_new, *rec.wanted_responses, *rec.unwanted_responses,
                       *(a for p in rec.portability_probes for a in p.answers)]
            if max(map(n, prompts)) + max(map(n, answers)) + 1 > self.limit:
                return False
        return True

    def score(self, task: str, description: str) -> pd.DataFrame:
        """One row per search record: reliability, generalization, locality and ``score``."""
        key = self._key(task, description)
        if key not in self.cache:
            self.cache[key] = self._evaluate(task, description)
            self.n_scored += 1
            if self.cache_file:
                atomic_write_text(self.cache_file, json.dumps(self.cache))
        frame = pd.DataFrame(self.cache[key])
        frame["score"] = score_records(frame)
        return frame

    def _evaluate(self, task: str, description: str) -> dict[str, list]:
        method = MendMethod(self.editor, "trial", instructions=_probe_set(self.start, task, description), unseen=True)
        rows = []
        for record in self.records[task]:
            pre_key = (task, record.index)
            if pre_key not in self._pre:  # the unedited model's locality logits, once per record
                self._pre[pre_key] = _forward(self.model, self.tokenizer, locality_rows(record))[0]
            row = evaluate_case(method, self.model, self.tokenizer, record, pre_locality=self._pre[pre_key],
                                generation=False)  # the search scores rel, gen and loc only
            rows.append({"case": record.index, **{m: _finite(row[m]) for m in SCORE_METRICS}})
        return {k: [r[k] for r in rows] for k in rows[0]}


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def significant_gain(candidate: Sequence[float], incumbent: Sequence[float], *, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Mean per-record gain of ``candidate`` over ``incumbent`` (paired by position) with its 95%
    paired-bootstrap interval, and ``significant`` (1.0 when the interval lies above 0)."""
    if len(candidate) != len(incumbent) or len(candidate) < 2:
        raise ValueError(f"significant_gain: need two paired score lists of length >= 2, got {len(candidate)} "
                         f"and {len(incumbent)}")
    cases = pd.DataFrame({"method": ["candidate"] * len(candidate) + ["incumbent"] * len(incumbent),
                          "task": "search", "case": list(range(len(candidate))) * 2,
                          "score": list(candidate) + list(incumbent)})
    out = paired_difference(cases, "candidate", "incumbent", "score", n_boot=n_boot, seed=seed)
    return {**out, "significant": float(out["low"] > 0)}


@dataclass
class SearchResult:
    """What a search produced: the optimised set, the log (one row per description tried), the
    incumbent after each round, the filter's rejections and the settings."""

    instructions: InstructionSet
    log: pd.DataFrame
    incumbents: pd.DataFrame
    rejections: pd.DataFrame
    settings: dict[str, Any]
    stopped: dict[str, str] = field(default_factory=dict)


def _cached_proposals(proposer: Proposer, cache: dict, cache_file: Path | None, task: str,
                      shown: list[tuple[str, float]], n: int, seed: int) -> list[str]:
    key = key_hash(SEARCH_VERSION, proposer.key(), task, [(t, round(s, 6)) for t, s in shown], n, seed)
    if key not in cache:
        cache[key] = proposer.propose(task, shown, n, np.random.default_rng(seed))
        if cache_file:
            atomic_write_text(cache_file, json.dumps(cache))
    return cache[key]


def optimize_instructions(trial: TrialEditor, proposer: Proposer, config: SearchConfig, *,
                          proposal_cache: str | Path | None = None, progress: bool = True) -> SearchResult:
    """Run the loop (module docstring) from ``trial.start``; returns the optimised set and the log."""
    start = trial.start
    rng = np.random.default_rng(config.seed)
    cache_file = Path(proposal_cache) if proposal_cache else None
    proposals = json.loads(cache_file.read_text()) if cache_file and cache_file.exists() else {}
    filt = CandidateFilter()
    pool: dict[str, dict[str, pd.DataFrame]] = {t: {} for t in config.tasks}  # task → text → per-record scores
    log, incumbents, rejected = [], [], Counter()
    incumbent: dict[str, str] = {}
    stale = {t: 0 for t in config.tasks}
    stopped: dict[str, str] = {}

    def mean(task, text):
        return float(pool[task][text]["score"].mean())

    def record(round_, task, text, origin, kept, reason=None, gain=None):
        scores = pool[task].get(text) if reason is None else None
        row = {"round": round_, "task": task, "description": text, "origin": origin, "kept": kept, "rejected": reason}
        if scores is not None:
            row.update({m: float(scores[m].mean()) for m in (*SCORE_METRICS, "score")})
        row.update(gain or {})
        log.append(row)

    n_work = len(config.tasks) * (len(start.seen(config.tasks[0])) + config.rounds * config.candidates)
    bar = tqdm(total=n_work, desc="instruction search", disable=bar_disabled(progress))
    for task in config.tasks:  # round 0: the starting seen descriptions
        for text in start.seen(task):
            pool[task][text] = trial.score(task, text)
            bar.update(1)
        incumbent[task] = max(pool[task], key=lambda t: mean(task, t))
        for text in start.seen(task):
            record(0, task, text, "start", text == incumbent[task])
        incumbents.append({"round": 0, "task": task, "incumbent": incumbent[task], "score": mean(task, incumbent[task])})

    for round_ in range(1, config.rounds + 1):
        active = [t for t in config.tasks if t not in stopped]
        if not active:
            break
        for task in active:
            shown = sorted(pool[task], key=lambda t: -mean(task, t))[: config.shown]
            raw = _cached_proposals(proposer, proposals, cache_file, task, [(t, mean(task, t)) for t in shown],
                                    config.candidates, int(rng.integers(2**31 - 1)))
            accepted, reasons = filt(task, raw, [to_brackets(t) for t in pool[task]])
            for text, why in zip(raw, reasons):
                if why is None and not trial.fits(task, from_brackets(text.strip())):
                    why = "too long for the model"
                    filt.rejected[why] += 1
                    accepted.remove(text.strip())
                if why is not None:
                    rejected[(task, why)] += 1
                    record(round_, task, from_brackets(text), "proposed", False, why)
            scored = []
            for text in accepted:
                text = from_brackets(text)
                pool[task][text] = trial.score(task, text)
                scored.append(text)
            bar.update(config.candidates)
            best = max(scored, key=lambda t: mean(task, t)) if scored else None
            gain = None
            if best is not None:
                gain = significant_gain(pool[task][best]["score"].fillna(0).tolist(),
                                        pool[task][incumbent[task]]["score"].fillna(0).tolist(),
                                        n_boot=config.n_boot, seed=config.seed + round_)
            for text in scored:
                record(round_, task, text, "proposed", text == best and bool(gain["significant"]),
                       gain=gain if text == best else None)
            if gain is not None and gain["significant"]:
                incumbent[task], stale[task] = best, 0
            else:
                stale[task] += 1
                if stale[task] >= config.patience:
                    stopped[task] = f"no significant gain for {config.patience} rounds (round {round_})"
            incumbents.append({"round": round_, "task": task, "incumbent": incumbent[task],
                               "score": mean(task, incumbent[task])})
    bar.close()
    for task in config.tasks:
        stopped.setdefault(task, f"round budget ({config.rounds}) reached")

    descriptions = dict(start.descriptions)
    for task in config.tasks:
        seen = start.seen(task)
        best = sorted(pool[task], key=lambda t: -mean(task, t))[: len(seen)]
        # A starting description that stays keeps its slot and a new one takes a dropped one's, so
        # every record keeps its description (the choice is by slot) unless the search replaced it.
        new = iter(t for t in best if t not in seen)
        texts = [t if t in best else next(new) for t in seen]
        texts.insert(start.heldout_index, start.unseen(task))
        descriptions[task] = tuple(texts)
    settings = {"version": SEARCH_VERSION, "search": {**asdict(config), "tasks": list(config.tasks)},
                "proposer": json.loads(proposer.key()), "trial_editor": trial.key, "score": "mean of " + ", ".join(SCORE_METRICS),
                "start": start.source, "stopped": stopped}
    optimized = InstructionSet(start.template, descriptions, start.heldout_index, source="instruction search")
    rejections = pd.DataFrame([{"task": t, "reason": r, "count": c} for (t, r), c in sorted(rejected.items())],
                              columns=["task", "reason", "count"])
    return SearchResult(optimized, pd.DataFrame(log), pd.DataFrame(incumbents), rejections, settings, stopped)


def write_instruction_file(path: str | Path, result: SearchResult) -> Path:
    """The optimised set in the official file's format (atomic); loads with
    :func:`~instructedit_lite.instructions.official_instructions`.  The log goes beside it
    (``<name>.log.csv``)."""
    path = Path(path)
    instructions = result.instructions
    template = instructions.template.format(task="{}", description="{}", prompt="{}")
    data = {"source": "instructedit_lite.optimize (book chapter 10)", "template": template,
            "note": "Descriptions 0-8 (all but the held-out index) are the nine best by the trial editor's "
                    "validation score; the held-out one is the starting set's.",
            "train_instruction_indices": [i for i in range(len(next(iter(instructions.descriptions.values()))))
                                          if i != instructions.heldout_index],
            "heldout_instruction_index": instructions.heldout_index,
            "instructions": {t: [to_brackets(d) for d in ds] for t, ds in instructions.descriptions.items()},
            "optimization": result.settings}
    atomic_write_text(path, json.dumps(data, indent=1))
    atomic_write_text(path.with_name(path.stem + ".log.csv"), result.log.to_csv(index=False))
    return path


def compare_on_test(editor, base, sets: Mapping[str, InstructionSet], records: Mapping[str, Sequence[EditRecord]], *,
                    progress: bool = True, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, dict[str, dict]]:
    """InstructEdit (one editor) with each instruction set, on the same test records.  Returns the
    per-case table (with ``score``) and, for the first set minus each other, the paired difference
    of the score and of each of its metrics, averaged over the tasks where the metric is defined."""
    methods = [MendMethod(editor, name, instructions=s) for name, s in sets.items()]
    cases = evaluate_methods(methods, base.model, base.tokenizer, records, progress=progress, generation=False)
    cases["score"] = score_records(cases)
    names = list(sets)

    def defined(metric: str) -> list[str]:  # e.g. no generalization where a task's records have no rephrase
        return [t for t, d in cases.groupby("task") if d[metric].notna().all()]

    diffs = {f"{names[0]} - {other}": {m: paired_difference(cases, names[0], other, m, defined(m), n_boot=n_boot,
                                                            seed=seed) if defined(m) else
                                        {"difference": math.nan, "low": math.nan, "high": math.nan}
                                        for m in ("score", *SCORE_METRICS)} for other in names[1:]}
    return cases, diffs
