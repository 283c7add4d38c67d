"""Reading a JSON file of records: typed field access, skipped-item reports and format sniffing.

Shared by every loader in :mod:`instructedit_lite.loaders` (book chapter 1).  Every failure is a
:class:`~instructedit_lite.records.RecordError` naming the file, the record and the field.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from ..records import EditRecord, Probe, RecordError, answers_from
from ..tasks import task_names

ON_ERROR = ("raise", "skip")
#: How many record numbers a summarised warning lists.
SHOWN_RECORDS = 5


# ---------------------------------------------------------------------------------------------
# Skipped items: summarised warnings, or a table for the caller
# ---------------------------------------------------------------------------------------------
def field_pattern(field_name: str) -> str:
    """``locality.Relation_Specificity[3].ground_truth`` -> ``locality.Relation_Specificity[*].ground_truth``."""
    return re.sub(r"\[\d+\]", "[*]", field_name)


class SkippedDataWarning(UserWarning):
    """Unusable items dropped under ``on_error="skip"``: one warning per file, kind and field.

    ``.errors`` holds every :class:`RecordError` summarised (``.error`` is the first), ``.dropped``
    says what was dropped (``"record"``, ``"probe"``, ``"rephrase"``), ``.field`` the field with
    list positions as ``[*]`` and ``.records`` the numbers of the records concerned, in file order.
    """

    def __init__(self, errors: RecordError | list[RecordError], dropped: str):
        self.errors = [errors] if isinstance(errors, RecordError) else list(errors)
        if not self.errors:
            raise ValueError("SkippedDataWarning needs at least one error")
        self.error, self.dropped = self.errors[0], dropped
        self.field = field_pattern(self.error.field)
        self.records = list(dict.fromkeys(e.index for e in self.errors))  # each record once, in file order
        if len(self.errors) == 1:
            text = f"dropped {dropped}: {self.error}"
        else:
            shown = ", ".join(str(i) for i in self.records[:SHOWN_RECORDS])
            more = f" and {len(self.records) - SHOWN_RECORDS} more" if len(self.records) > SHOWN_RECORDS else ""
            text = (f"{self.error.source}: dropped {len(self.errors)} {dropped}s, field '{self.field}', "
                    f"record{'s' if len(self.records) > 1 else ''} {shown}{more}; the first: {self.error.message}")
        super().__init__(text)


class Skipped(list):
    """The items dropped while :func:`collect_skipped` was active: ``(dropped, RecordError)`` pairs."""

    def table(self):
        """One row per dropped item: file, record, field, dropped, reason (a pandas DataFrame)."""
        import pandas as pd  # only needed by the callers who ask for a table

        return pd.DataFrame([{"file": e.source, "record": e.index, "field": e.field, "dropped": what,
                              "reason": e.message} for what, e in self],
                            columns=["file", "record", "field", "dropped", "reason"])


_COLLECTORS: contextvars.ContextVar[tuple[Skipped, ...]] = contextvars.ContextVar("skipped", default=())


@contextlib.contextmanager
def collect_skipped() -> Iterator[Skipped]:
    """Gather the items the loaders drop instead of warning about them (``with ... as skipped``).

    ``skipped.table()`` then shows them, one row each, e.g. in a chapter instead of warnings.
    """
    out = Skipped()
    token = _COLLECTORS.set(_COLLECTORS.get() + (out,))
    try:
        yield out
    finally:
        _COLLECTORS.reset(token)


class Drops:
    """What one load dropped; raises at once under ``on_error="raise"``, reports at the end."""

    def __init__(self, source: str, on_error: str):
        self.source, self.on_error = source, on_error
        self.items: list[tuple[str, RecordError]] = []

    def add(self, error: RecordError, what: str) -> None:
        if self.on_error == "raise":
            raise error
        self.items.append((what, error))

    def finish(self, n_items: int, n_kept: int, stacklevel: int = 4) -> None:
        """Raise if every record was dropped; otherwise hand the drops to a collector or warn.

        ``stacklevel`` points the warning at the loader's caller (3 from a loader, 4 via :func:`load_each`).
        """
        if n_items and not n_kept:
            first = self.items[0][1] if self.items else None
            raise RecordError(self.source, None, "<file>",
                              f"all {n_items} records were dropped as unusable (is it a file of another format?); "
                              f"the first problem: record {first.index}, field '{first.field}': {first.message}"
                              if first else f"all {n_items} records were dropped as unusable")
        collectors = _COLLECTORS.get()
        if collectors:
            collectors[-1].extend(self.items)
            return
        groups: dict[tuple[str, str], list[RecordError]] = {}
        for what, err in self.items:
            groups.setdefault((what, field_pattern(err.field)), []).append(err)
        for (what, _), errors in groups.items():
            warnings.warn(SkippedDataWarning(errors, what), stacklevel=stacklevel)


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
    value = value.strip()
    if not value and not allow_empty:
        f.fail(field_name, "must not be empty")
    return value


def answers_value(value: Any, f: Fields, field_name: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    out = answers_from(value, source=f.source, index=f.index, field_name=field_name)
    if not out and not allow_empty:
        # An empty answer list cannot be scored; the caller decides whether to drop the item.
        f.fail(field_name, f"no non-empty answer in {value!r:.80}")
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
def read_json(path: str | Path, source: str | None = None) -> Any:
    """Parse a JSON file; a missing file stays a FileNotFoundError, anything else unreadable is a RecordError."""
    source = str(path) if source is None else source

    def fail(message: str) -> NoReturn:
        raise RecordError(source, None, "<file>", message)

    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted and dropped
    except UnicodeDecodeError as exc:
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        fail(f"not UTF-8 text: byte {data[exc.start]:#04x} at offset {exc.start}"
             + ("; it starts with a UTF-16 byte-order mark" if utf16 else " (Latin-1 or another encoding?)")
             + "; save it as UTF-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"not valid JSON: {exc}")
    except RecursionError:
        fail("nested too deeply to read (hundreds of levels of lists or objects)")
    except ValueError as exc:  # e.g. an integer of thousands of digits
        fail(f"cannot read a value: {exc}")


#: The known record formats, recognised by keys every record of the format has.
FORMATS: dict[str, tuple[frozenset[str], str]] = {
    "counterfact_mend": (frozenset({"prompt", "target_new", "locality_prompt", "locality_ground_truth"}),
                         "load_counterfact_mend"),
    "zsre_mend": (frozenset({"src", "alt", "loc", "loc_ans"}), "load_zsre_mend"),
    "convsent": (frozenset({"ent", "pos", "neg"}), "load_convsent"),
    "knowedit": (frozenset({"prompt", "target_new", "locality"}), "load_knowedit"),
}


def sniff_format(raw: list[Any], sample: int = 20) -> str | None:
    """The known format whose keys the first ``sample`` records have, if exactly one fits them all."""
    objects = [item for item in raw[:sample] if isinstance(item, dict)]
    if not objects:
        return None
    fits = [name for name, (keys, _) in FORMATS.items() if all(keys <= obj.keys() for obj in objects)]
    return fits[0] if len(fits) == 1 else None


def read_list(path: str | Path, source: str, expected: str) -> list[Any]:
    """A JSON list of records in format ``expected``; a file in another known format is an error."""
    data = read_json(path, source)
    if isinstance(data, dict) and "instructions" in data and "template" in data:
        raise RecordError(source, None, "<file>", "this is an instruction file; read it with load_instruction_file")
    if not isinstance(data, list):
        raise RecordError(source, None, "<file>", f"expected a JSON list of records, got {type(data).__name__}")
    found = sniff_format(data)
    if found is not None and found != expected:
        keys, loader = FORMATS[found]
        raise RecordError(source, None, "<file>",
                          f"its records have the keys of the {found} format ({', '.join(sorted(keys))}), "
                          f"not of {expected}; read it with {loader}")
    return data


def load_each(path: str | Path, build: Callable[[Fields], EditRecord], *, fmt: str, source: str | None,
              limit: int | None, on_error: str) -> list[EditRecord]:
    """Read a JSON list and build one record per entry (the first ``limit`` entries)."""
    source = str(path) if source is None else source
    check_options(limit, on_error)
    raw = read_list(path, source, fmt)[:limit]
    drops = Drops(source, on_error)
    records = []
    for i, item in enumerate(raw):
        try:
            records.append(build(Fields(item, source, i, drops)))
        except RecordError as err:
            drops.add(err, "record")
        except RecursionError:  # a deeply nested value that parsed but cannot be printed
            drops.add(RecordError(source, i, "<record>", "nested too deeply"), "record")
    drops.finish(len(raw), len(records))
    return records
