"""The published task files as a records source: seeded train/val/test splits of the real data (chapter 7).

:class:`RealData` reads a folder in the layout of ``$INSTRUCTEDIT_DATA`` (see
:data:`~instructedit_lite.fetch.FILES`) and offers what the embedded world offers, ``tasks`` and
``records(task, split)``, so a base model can take its edits from either.  Which file gives which
split:

* ``counterfact``: KnowEdit ``wiki_counterfact`` (1,428 records), split by subject;
* ``wikirecent``: KnowEdit ``wiki_recent`` (570), split by subject;
* ``convsent``: SERAC ``blender_val`` (799 topics) split by topic into train and val, and
  ``blender_test`` (800 topics) for test.  A topic gives one edit per wanted sentiment (both by
  default): the question ``CONVSENT_QUESTIONS[i % 12]`` about the topic, the first response of the
  wanted sentiment as the target, and the file's responses of both sentiments.  Its locality probe
  is the question about the next topic *of the same split*, so no split sees another's topics;
* ``zsre`` (held out, never trained on): test is the MEND zsRE file with portability (1,037); val,
  when ``zsre/zsre_mend_train-1k.json`` is present, its usable records (998) whose subject is not a
  test subject; train is empty.

Subject-disjoint splits: subjects (compared case-insensitively) are shuffled with ``seed`` and
whole subjects go to test until it holds about ``fractions[2]`` of the records, then to val until
it holds about ``fractions[1]``, and the rest to train.  With the defaults (seed 0, 70/10/20 %,
both sentiments) the records per split (train / val / test) are: counterfact 999 / 143 / 286,
wikirecent 399 / 57 / 114, convsent 1,398 / 200 / 1,600 (699 / 100 / 800 topics), zsre
0 / 997 / 1,037.  Loading all of it takes about 2 s; parsed records are cached in the process.  The official instruction file of the folder, when present, is what
:meth:`RealData.instructions` returns.  Items the loaders drop are kept in ``skipped``.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable

import pandas as pd

from . import loaders
from .fetch import FILES
from .instructions import InstructionSet, default_instructions, official_instructions
from .records import EditRecord, Probe, alternating
from .tasks import Task, get_task, registered

SPLITS = ("train", "val", "test")


def data_tasks() -> tuple[str, ...]:
    """The tasks the real data holds: every registered task that declares its files."""
    return tuple(t.name for t in registered() if t.files)


def required_files() -> dict[str, tuple[str, ...]]:
    """Files every task needs, relative to the data folder (each task's declaration)."""
    return {t.name: t.files for t in registered() if t.files}


def optional_files() -> tuple[str, ...]:
    """Files read when present: the tasks' optional ones (ZsRE's validation records) and the paper's
    instructions."""
    return tuple(f for t in registered() for f in t.optional_files) + (loaders.INSTRUCTION_FILE,)


class DataMissingError(FileNotFoundError):
    """The data folder or some of its files are absent; the message says how to get them."""


def missing_files(folder: str | Path | None = None) -> list[str]:
    """Required files absent from the data folder (all of them when there is no folder)."""
    root = loaders.data_dir(folder)
    needed = [rel for rels in required_files().values() for rel in rels]
    return needed if root is None else [rel for rel in needed if not (root / rel).is_file()]


def available(folder: str | Path | None = None) -> bool:
    """Whether every required file is there, so chapters can skip the real data gracefully."""
    return not missing_files(folder)


def _missing_message(folder: Path | None, missing: list[str]) -> str:
    where = "no data folder (pass folder= or set INSTRUCTEDIT_DATA)" if folder is None else f"the data folder {folder}"
    lines = [f"{where} lacks {len(missing)} required file(s):"]
    lines += [f"  {rel}: {FILES[rel].where if rel in FILES else 'a file its task declares'}" for rel in missing]
    lines.append("`instructedit-lite fetch-data DIR` downloads those on the Hugging Face hub; "
                 "then set INSTRUCTEDIT_DATA=DIR")
    return "\n".join(lines)


def subject_split(records: list[EditRecord], fractions: tuple[float, float, float], seed: int,
                  key: Callable[[EditRecord], str], name: str) -> dict[str, list[EditRecord]]:
    """Seeded split in which no subject (``key``) falls in two splits; file order within a split."""
    groups: dict[str, list[EditRecord]] = {}
    for rec in records:
        groups.setdefault(key(rec).strip().lower(), []).append(rec)
    order = sorted(groups)
    random.Random(f"{seed}/{name}").shuffle(order)  # a str seed is hashed with sha512: stable across runs
    want = {"test": round(fractions[2] * len(records)), "val": round(fractions[1] * len(records))}
    out: dict[str, list[EditRecord]] = {s: [] for s in SPLITS}
    for subject in order:
        # a group goes where it brings the split closer to its target (the middle of it still fits)
        size = len(groups[subject])
        split = next((s for s in ("test", "val") if len(out[s]) + size / 2 < want[s]), "train")
        out[split] += groups[subject]
    return {s: sorted(rs, key=lambda r: r.index) for s, rs in out.items()}


def _relink_topics(records: list[EditRecord]) -> list[EditRecord]:
    """ConvSent locality: the question about the next topic of the same list (wrapping round)."""
    topics = list(dict.fromkeys(r.topic for r in records))
    first = {}
    for rec in records:
        first.setdefault(rec.topic, rec)
    k = loaders.CONVSENT_LOCALITY_RESPONSES
    out = []
    for rec in records:
        if len(topics) < 2:
            out.append(dataclasses.replace(rec, locality={}))
            continue
        other = first[topics[(topics.index(rec.topic) + 1) % len(topics)]]
        probe = Probe(other.prompt, alternating(other.pos_responses[:k], other.neg_responses[:k]))
        out.append(dataclasses.replace(rec, locality={"Other_Topic": (probe,)}))
    return out


#: Parsed splits (and the items dropped while parsing) by folder, files, task and options.
_CACHE: dict[tuple, tuple[dict[str, list[EditRecord]], list]] = {}


class RealData:
    """The real task files as a records source with ``tasks`` and ``records(task, split)`` (chapter 7).

    ``fractions`` are the (train, val, test) shares of CounterFact and Recent and the (train, val)
    shares of ``blender_val`` for ConvSent; ``convsent_sentiments`` is ``"both"`` (two edits per
    topic) or ``"alternate"`` (one, positive for even file positions).
    """

    @property
    def tasks(self) -> tuple[str, ...]:
        return data_tasks()

    @property
    def training_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in data_tasks() if get_task(t).trainable)

    def __init__(self, folder: str | Path | None = None, seed: int = 0, *,
                 fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), convsent_sentiments: str = "both"):
        root = loaders.data_dir(folder)
        missing = missing_files(root)
        if missing:
            raise DataMissingError(_missing_message(root, missing))
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
            raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions!r}")
        if convsent_sentiments not in ("both", "alternate"):
            raise ValueError(f"convsent_sentiments must be 'both' or 'alternate', got {convsent_sentiments!r}")
        self.folder, self.seed = root, seed
        self.fractions, self.convsent_sentiments = tuple(fractions), convsent_sentiments
        self.skipped = loaders.Skipped()
        self._reported: set[str] = set()  # tasks whose dropped items are in self.skipped

    # The records source ---------------------------------------------------------------------
    def records(self, task: str, split: str) -> list[EditRecord]:
        """The edit records of one task and split (a new list; records are immutable)."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; the real data has {self.tasks}")
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._splits(task)[split])

    def counts(self) -> pd.DataFrame:
        """Records per task (rows) and split (columns)."""
        return pd.DataFrame([[len(self.records(t, s)) for s in SPLITS] for t in self.tasks],
                            index=pd.Index(self.tasks, name="task"), columns=list(SPLITS))

    def instructions(self) -> InstructionSet:
        """The paper's instructions from the folder's official file when present, else the project's own."""
        path = self.folder / loaders.INSTRUCTION_FILE
        if not path.is_file():
            return default_instructions()
        loaders.load_instruction_file(path, source=loaders.INSTRUCTION_FILE)  # strict check, names the field
        return official_instructions(path)

    @property
    def instructions_source(self) -> str:
        """``"official"`` or ``"project"``: which descriptions :meth:`instructions` returns."""
        return "official" if (self.folder / loaders.INSTRUCTION_FILE).is_file() else "project"

    def skipped_table(self) -> pd.DataFrame:
        """The items the loaders dropped so far, one row each (file, record, field, dropped, reason)."""
        return self.skipped.table()

    # Loading ----------------------------------------------------------------------------------
    def _load(self, rel: str, loader, **kw) -> list[EditRecord]:
        with loaders.collect_skipped() as dropped:
            out = loader(self.folder / rel, on_error="skip", source=rel, **kw)
        self._dropped.extend(dropped)
        return out

    def _file_key(self, task: str) -> tuple:
        rels = get_task(task).files + get_task(task).optional_files
        stats = tuple((rel, p.stat().st_mtime_ns, p.stat().st_size) for rel in rels
                      if (p := self.folder / rel).is_file())
        return (str(self.folder.resolve()), task, self.seed, self.fractions, self.convsent_sentiments, stats)

    def _splits(self, task: str) -> dict[str, list[EditRecord]]:
        key = self._file_key(task)
        if key not in _CACHE:  # parsing is the slow part; records are immutable, so share them
            self._dropped: list = []
            splits = READERS[get_task(task).reader](self, get_task(task))
            # both ConvSent sentiments read the same file: keep each dropped item once
            unique = {(w, e.source, e.index, e.field, e.message): (w, e) for w, e in self._dropped}
            _CACHE[key] = (splits, list(unique.values()))
        splits, dropped = _CACHE[key]
        if task not in self._reported:
            self._reported.add(task)
            self.skipped.extend(dropped)
        return splits

    def _convsent(self, rel: str) -> list[EditRecord]:
        if self.convsent_sentiments == "alternate":
            return self._load(rel, loaders.load_convsent)
        both = self._load(rel, loaders.load_convsent, sentiments="positive")
        both += self._load(rel, loaders.load_convsent, sentiments="negative")
        return sorted(both, key=lambda r: (r.index, r.sentiment != "positive"))


# Readers: how a task's declared files become its splits (``Task.reader`` names one) -----------------
def _read_knowedit(data: RealData, task: Task) -> dict[str, list[EditRecord]]:
    """A KnowEdit file (CounterFact, Recent), split by subject."""
    recs = data._load(task.files[0], loaders.load_knowedit, task=task.name)
    return subject_split(recs, data.fractions, data.seed, lambda r: r.subject, task.name)


def _read_convsent(data: RealData, task: Task) -> dict[str, list[EditRecord]]:
    """SERAC's ConvSent: the first file split by topic into train and val, the second for test."""
    train, val = data.fractions[0], data.fractions[1]
    shares = (train / (train + val), val / (train + val), 0.0) if train + val else (1.0, 0.0, 0.0)
    split = subject_split(data._convsent(task.files[0]), shares, data.seed, lambda r: r.topic, task.name)
    return {"train": _relink_topics(split["train"]), "val": _relink_topics(split["val"]),
            "test": _relink_topics(data._convsent(task.files[1]))}


def _read_zsre(data: RealData, task: Task) -> dict[str, list[EditRecord]]:
    """MEND's zsRE: the first file for test; the optional file's records whose subject is not a test
    subject for val; no training records (a held-out task)."""
    test = data._load(task.files[0], loaders.load_zsre_mend)
    val: list[EditRecord] = []
    extra = [rel for rel in task.optional_files if (data.folder / rel).is_file()]
    if extra:
        seen = {r.subject.strip().lower() for r in test}
        val = [r for r in data._load(extra[0], loaders.load_zsre_mend) if r.subject.strip().lower() not in seen]
    return {"train": [], "val": val, "test": test}


#: Reader name -> function ``(data, task) -> {split: records}``; a new file format adds one here.
READERS: dict[str, Callable[[RealData, Task], dict[str, list[EditRecord]]]] = {
    "knowedit": _read_knowedit, "convsent": _read_convsent, "zsre": _read_zsre}
