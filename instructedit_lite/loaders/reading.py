"""Reading a JSON file of records: typed field access, format sniffing and unreadable files.

Shared by every loader in :mod:`instructedit_lite.loaders` (book chapter 1).  Every failure is a
:class:`~instructedit_lite.records.RecordError` naming the file, the record and the field;
skipped items are reported by :mod:`~instructedit_lite.loaders.skipped`.
"""

from __future__ import annotations

import json
import re
import reprlib
from pathlib import Path
from typing import Any, Callable, NoReturn

from ..records import EditRecord, Probe, RecordError, answers_from
from ..tasks import task_names
from .skipped import Drops

ON_ERROR = ("raise", "skip")

# Values quoted in messages are cut short: a field may hold a list of a million items or
# nesting hundreds deep, and a message must stay one readable line.
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 60, 60, 40, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 5


def short(value: Any) -> str:
    """A short repr for messages (``[1, 2, 3, 4, 5, ...]``)."""
    return _REPR.repr(value)


# A JSON ``\ud800`` escape parses into half a UTF-16 pair, which no tokenizer can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (an unpaired surrogate), or ``None``."""
    m = None if text.isascii() else _SURROGATE.search(text)  # isascii is O(1): most text needs no search
    if m is None:
        return None
    return (f"contains an unpaired surrogate \\u{ord(m.group()):04x} at character {m.start()} "
            "(a \\u escape of half a UTF-16 pair): not valid Unicode text")


# ---------------------------------------------------------------------------------------------
# Reading one record's fields
# ---------------------------------------------------------------------------------------------
class Fields:
    """Typed access to one raw JSON object; every failure names source, index and field."""

    def __init__(self, raw: Any, source: str, index: int | None, drops: Drops | None = None):
        self.source, self.index = source, index
        self.drops = drops or Drops(source, "raise")
        if not isinstance(raw, dict):
            self.fail("<record>", f"expected a JSON object, got {type(raw).__name__}")
        self.raw = raw

    def fail(self, field_name: str, message: str) -> NoReturn:
        raise RecordError(self.source, self.index, field_name, message)

    def text(self, key: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
        """A string field, stripped; ``None`` if optional and absent."""
        if key not in self.raw:
            if required:
                self.fail(key, "required field is missing")
            return None
        return text_value(self.raw[key], self, key, allow_empty=allow_empty)

    def answers(self, key: str, *, required: bool = True, allow_empty: bool = False) -> tuple[str, ...]:
        if key not in self.raw:
            if required:
                self.fail(key, "required field is missing")
            return ()
        return answers_value(self.raw[key], self, key, allow_empty=allow_empty)

    def dropped(self, error: RecordError, what: str) -> None:
        self.drops.add(error, what)


def text_value(value: Any, f: Fields, field_name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        f.fail(field_name, f"expected a string, got {type(value).__name__}")
    problem = unicode_problem(value)
    if problem:
        f.fail(field_name, problem)
    value = value.strip()
    if not value and not allow_empty:
        f.fail(field_name, "must not be empty")
    return value


def answers_value(value: Any, f: Fields, field_name: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, list):  # checked here so that a message quotes a bad item short
        for item in value:
            for a in item if isinstance(item, list) else [item]:
                if not isinstance(a, str):
                    f.fail(field_name, f"answers must be strings, got {short(a)}")
    out = answers_from(value, source=f.source, index=f.index, field_name=field_name)
    for a in out:
        problem = unicode_problem(a)
        if problem:
            f.fail(field_name, problem)
    if not out and not allow_empty:
        # An empty answer list cannot be scored; the caller decides whether to drop the item.
        f.fail(field_name, f"no non-empty answer in {short(value)}")
    return out


def rephrases(f: Fields, key: str) -> tuple[str, ...]:
    """An optional rephrase field: one string or a list of strings."""
    if key not in f.raw:
        return ()
    value = f.raw[key]
    if isinstance(value, str):
        items, names = [value], [key]
    elif isinstance(value, list):
        items, names = value, [f"{key}[{i}]" for i in range(len(value))]
    else:
        f.fail(key, f"expected a string or a list of strings, got {type(value).__name__}")
    out = []
    for item, name in zip(items, names):
        try:
            out.append(text_value(item, f, name))
        except RecordError as err:
            f.dropped(err, "rephrase")
    return tuple(out)


def probe_groups(f: Fields, key: str) -> dict[str, tuple[Probe, ...]]:
    """KnowEdit ``{KIND: [{prompt, ground_truth}]}``; kinds without probes are left out."""
    if key not in f.raw:
        return {}
    groups = f.raw[key]
    if not isinstance(groups, dict):
        f.fail(key, f"expected an object mapping a probe kind to a list, got {type(groups).__name__}")
    out: dict[str, tuple[Probe, ...]] = {}
    for kind, items in groups.items():
        if not isinstance(items, list):
            f.fail(f"{key}.{kind}", f"expected a list of probes, got {type(items).__name__}")
        probes = []
        for j, item in enumerate(items):
            name = f"{key}.{kind}[{j}]"
            try:
                probes.append(probe(item, f, name))
            except RecordError as err:
                f.dropped(err, "probe")
        if probes:
            out[kind] = tuple(probes)
    return out


def probe(item: Any, f: Fields, name: str) -> Probe:
    if not isinstance(item, dict):
        f.fail(name, f"expected an object with prompt and ground_truth, got {type(item).__name__}")
    for key in ("prompt", "ground_truth"):
        if key not in item:
            f.fail(f"{name}.{key}", "required field is missing")
    return Probe(text_value(item["prompt"], f, f"{name}.prompt"),
                 answers_value(item["ground_truth"], f, f"{name}.ground_truth"))


def check_task(task: str, source: str) -> None:
    if task not in task_names():  # read now: tasks registered after import count too
        raise RecordError(source, None, "task", f"unknown task {task!r}; expected one of {task_names()}")


def check_options(limit: int | None, on_error: str) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
#: Said of every file that cannot be parsed: there are no records to skip one by one.
WHOLE_FILE = "the file cannot be read as a whole, so on_error='skip' cannot drop single records"


def read_json(path: str | Path, source: str | None = None, *, note: str = WHOLE_FILE) -> Any:
    """Parse a JSON file; a missing file stays a FileNotFoundError, anything else unreadable is a RecordError.

    ``note`` ends every message (a file of records says that skipping records cannot help).
    """
    source = str(path) if source is None else source

    def fail(message: str) -> NoReturn:
        raise RecordError(source, None, "<file>", f"{message}; {note}" if note else message)

    data = Path(path).read_bytes()
    # UTF-16 or UTF-32 without a byte-order mark: zero bytes between the characters (ASCII text
    # even decodes as UTF-8, with NULs, and would then fail as JSON with a puzzling message).
    wide = "; it has zero bytes between its characters, as UTF-16 or UTF-32 without a byte-order mark has"
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted and dropped
    except UnicodeDecodeError as exc:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = "; it starts with a UTF-16 byte-order mark"
        else:
            hint = wide if b"\x00" in data[:1000] else " (Latin-1 or another encoding?)"
        fail(f"not UTF-8 text: byte {data[exc.start]:#04x} at offset {exc.start}{hint}; save it as UTF-8")
    if "\x00" in text[:1000]:
        fail(f"not UTF-8 text{wide}; save it as UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"not valid JSON: {exc}" + (_json_lines_hint(text) if exc.msg == "Extra data" else ""))
    except RecursionError:
        fail("nested too deeply to read (hundreds of levels of lists or objects)")
    except ValueError as exc:  # e.g. an integer of thousands of digits
        fail(f"cannot read a value: {short(str(exc))}")


def _json_lines_hint(text: str) -> str:
    """A hint when the text is JSON Lines (one value per line), as MEND's original zsRE files are."""
    lines = [line for line in text.splitlines()[:2] if line.strip()]
    try:
        if len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines):
            return " (it looks like JSON Lines, one object per line; these loaders read one JSON list of objects)"
    except (ValueError, RecursionError):
        pass
    return ""


#: The formats the loaders read, by keys their records have: name -> (keys, loader).
FORMATS: dict[str, tuple[frozenset[str], str]] = {
    "counterfact_mend": (frozenset({"prompt", "target_new", "locality_prompt", "locality_ground_truth"}),
                         "load_counterfact_mend"),
    "zsre_mend": (frozenset({"src", "alt", "loc", "loc_ans"}), "load_zsre_mend"),
    "convsent": (frozenset({"ent", "pos", "neg"}), "load_convsent"),
    "knowedit": (frozenset({"prompt", "target_new", "locality"}), "load_knowedit"),
}
#: Known formats no loader here reads, recognised so that the message can say what the file is.
OTHER_FORMATS: dict[str, tuple[frozenset[str], str]] = {
    "rome_counterfact": (frozenset({"requested_rewrite", "paraphrase_prompts", "neighborhood_prompts"}),
                         "ROME's original CounterFact; its MEND/EasyEdit split (counterfact-train/val/edit.json) "
                         "is read by load_counterfact_mend"),
    "mquake": (frozenset({"requested_rewrite", "questions", "new_answer"}), "MQuAKE's multi-hop questions"),
    "knowedit_wikibio": (frozenset({"text", "labels", "concept"}), "KnowEdit's WikiBio (hallucination) task"),
}
#: The top-level keys each loader reads or knowingly ignores (``pred`` and ``cond`` are MEND's model
#: output and SERAC's conditioning string).
READ_KEYS: dict[str, frozenset[str]] = {
    "knowedit": frozenset({"subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality",
                           "portability", "cond"}),
    "zsre_mend": frozenset({"subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans", "portability",
                            "pred", "cond"}),
    "counterfact_mend": frozenset({"case_id", "subject", "prompt", "target_new", "ground_truth", "rephrase_prompt",
                                   "locality_prompt", "locality_ground_truth"}),
    "convsent": frozenset({"ent", "pos", "neg"}),
}
# A key the loader does not read that holds probes or rephrases: reading on would lose them silently.
_PROBE_KEY = re.compile(r"locality|^loc(_|$)|portab|rephrase|paraphrase|neighbo", re.IGNORECASE)


def sniff_format(raw: list[Any], sample: int = 20) -> str | None:
    """The known format whose keys most of the first ``sample`` records have, if exactly one does."""
    objects = [item for item in raw[:sample] if isinstance(item, dict)]
    if not objects:
        return None
    known = {**{n: k for n, (k, _) in FORMATS.items()}, **{n: k for n, (k, _) in OTHER_FORMATS.items()}}
    fits = {name: sum(keys <= obj.keys() for obj in objects) for name, keys in known.items()}
    best = max(fits.values())
    winners = [name for name, n in fits.items() if n == best]
    return winners[0] if len(winners) == 1 and 2 * best > len(objects) else None


def keys_hint(raw: list[Any], fmt: str) -> str:
    """``; its first record has the keys (a, b), where load_x expects (c, d)``, or ``""``."""
    first = next((item for item in raw if isinstance(item, dict)), None)
    if first is None:
        return ""
    keys, loader = FORMATS[fmt]
    return (f"; its first record has the keys ({', '.join(k[:40] for k in sorted(first)[:12])}), "
            f"where {loader} expects ({', '.join(sorted(keys))})")


def read_list(path: str | Path, source: str, expected: str) -> list[Any]:
    """A JSON list of records in format ``expected``; a file in another known format is an error."""
    data = read_json(path, source)
    if isinstance(data, dict) and "instructions" in data and "template" in data:
        raise RecordError(source, None, "<file>", "this is an instruction file; read it with load_instruction_file")
    if isinstance(data, dict) and {"success", "locality"} <= data.keys():
        raise RecordError(source, None, "<file>", "this is KnowEdit's Sanitation file ({success, locality}); "
                                                  "no loader here reads that task")
    if not isinstance(data, list):
        raise RecordError(source, None, "<file>", f"expected a JSON list of records, got {type(data).__name__}")
    found = sniff_format(data)
    if found in FORMATS and found != expected:
        keys, loader = FORMATS[found]
        raise RecordError(source, None, "<file>",
                          f"its records have the keys of the {found} format ({', '.join(sorted(keys))}), "
                          f"not of {expected}; read it with {loader}")
    if found in OTHER_FORMATS:
        keys, what = OTHER_FORMATS[found]
        raise RecordError(source, None, "<file>", f"its records have the keys of {what} ({', '.join(sorted(keys))}); "
                                                  f"no loader here reads that format")
    _check_unread_probe_keys(data, source, expected)
    return data


def _check_unread_probe_keys(data: list[Any], source: str, expected: str) -> None:
    """Refuse a file whose records hold probes under a key the loader does not read."""
    keys = set().union(*(item.keys() for item in data if isinstance(item, dict)))
    unread = sorted(k for k in keys - READ_KEYS[expected] if _PROBE_KEY.search(k))
    if not unread:
        return
    key = unread[0]
    index = next(i for i, item in enumerate(data) if isinstance(item, dict) and key in item)
    raise RecordError(source, index, key,
                      f"{FORMATS[expected][1]} does not read this field, so the probes or rephrases it holds would be "
                      f"lost; is the file in another format? ({expected} records have "
                      f"{', '.join(sorted(READ_KEYS[expected]))})")


def load_each(path: str | Path, build: Callable[[Fields], EditRecord], *, fmt: str, source: str | None,
              limit: int | None, on_error: str) -> list[EditRecord]:
    """Read a JSON list and build one record per entry (the first ``limit`` entries)."""
    source = str(path) if source is None else source
    check_options(limit, on_error)
    raw = read_list(path, source, fmt)[:limit]
    drops = Drops(source, on_error, FORMATS[fmt][1])
    records = []
    for i, item in enumerate(raw):
        try:
            records.append(build(Fields(item, source, i, drops)))
        except RecordError as err:
            drops.add(err, "record")
        except RecursionError:  # a deeply nested value that parsed but cannot be printed
            drops.add(RecordError(source, i, "<record>", "nested too deeply"), "record")
    drops.finish(len(raw), len(records), hint=keys_hint(raw, fmt) if raw and not records else "")
    return records
