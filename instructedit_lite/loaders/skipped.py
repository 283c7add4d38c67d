"""Items dropped under ``on_error="skip"``: summarised warnings, or a table for the caller (chapter 1).

A load reports its drops once per file, kind and field (a count and the first record numbers),
never once per record; inside ``with collect_skipped() as skipped:`` they are gathered instead,
and ``skipped.summary()`` (one row per file and field) or ``skipped.table()`` (one row per item)
shows them.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import warnings
from typing import Iterator

import pandas as pd

from ..records import RecordError

#: How many record numbers a summary lists.
SHOWN_RECORDS = 5


def field_pattern(field_name: str) -> str:
    """``locality.Relation_Specificity[3].ground_truth`` -> ``locality.Relation_Specificity[*].ground_truth``."""
    return re.sub(r"\[\d+\]", "[*]", field_name)


def record_list(records: list[int | None]) -> str:
    """``0, 1, 2, 3, 4 and 2 more``: the first ``SHOWN_RECORDS`` record numbers."""
    shown = ", ".join(str(i) for i in records[:SHOWN_RECORDS])
    more = len(records) - SHOWN_RECORDS
    return shown + (f" and {more} more" if more > 0 else "")


class SkippedDataWarning(UserWarning):
    """Unusable items dropped under ``on_error="skip"``: one warning per file, kind and field.

    ``.errors`` holds every :class:`~instructedit_lite.records.RecordError` summarised (``.error`` is the
    first), ``.dropped``
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
            text = (f"{self.error.source}: dropped {len(self.errors)} {dropped}s, field '{self.field}', "
                    f"record{'s' if len(self.records) > 1 else ''} {record_list(self.records)}; "
                    f"the first: {self.error.message}")
        super().__init__(text)


def summarise(items: list[tuple[str, RecordError]]) -> list[SkippedDataWarning]:
    """One :class:`SkippedDataWarning` per file, kind of drop and field pattern, in first-seen order."""
    groups: dict[tuple[str, str, str], list[RecordError]] = {}
    for what, err in items:
        groups.setdefault((err.source, what, field_pattern(err.field)), []).append(err)
    return [SkippedDataWarning(errors, what) for (_, what, _), errors in groups.items()]


class Skipped(list):
    """The items dropped while :func:`collect_skipped` was active: ``(dropped, RecordError)`` pairs."""

    def table(self):
        """One row per dropped item: file, record, field, dropped, reason (a pandas DataFrame)."""
        return pd.DataFrame([{"file": e.source, "record": e.index, "field": e.field, "dropped": what,
                              "reason": e.message} for what, e in self],
                            columns=["file", "record", "field", "dropped", "reason"])

    def summary(self):
        """One row per file, kind of drop and field: how many items, which records, the first reason.

        The rows say what the :class:`SkippedDataWarning` lines say (see :meth:`lines`), as a table.
        """
        return pd.DataFrame([{"file": w.error.source, "dropped": w.dropped, "field": w.field,
                              "items": len(w.errors), "records": record_list(w.records),
                              "first reason": w.error.message} for w in summarise(self)],
                            columns=["file", "dropped", "field", "items", "records", "first reason"])

    def lines(self) -> list[str]:
        """The summary as the text of the warnings a load outside :func:`collect_skipped` would give."""
        return [str(w) for w in summarise(self)]


_COLLECTORS: contextvars.ContextVar[tuple[Skipped, ...]] = contextvars.ContextVar("skipped", default=())


@contextlib.contextmanager
def collect_skipped() -> Iterator[Skipped]:
    """Gather the items the loaders drop instead of warning about them (``with ... as skipped``).

    ``skipped.summary()`` or ``skipped.table()`` then shows them, e.g. in a chapter instead of warnings.
    """
    out = Skipped()
    token = _COLLECTORS.set(_COLLECTORS.get() + (out,))
    try:
        yield out
    finally:
        _COLLECTORS.reset(token)


class Drops:
    """What one load of ``source`` by ``loader`` dropped; raises at once under ``on_error="raise"``."""

    def __init__(self, source: str, on_error: str, loader: str = "this loader"):
        self.source, self.on_error, self.loader = source, on_error, loader
        self.items: list[tuple[str, RecordError]] = []

    def add(self, error: RecordError, what: str) -> None:
        if self.on_error == "raise":
            raise error
        self.items.append((what, error))

    def finish(self, n_items: int, n_kept: int, stacklevel: int = 4, hint: str = "") -> None:
        """Raise if every record was dropped; otherwise hand the drops to a collector or warn.

        ``hint`` ends the all-dropped message (e.g. which keys the records have).  ``stacklevel``
        points the warning at the loader's caller (3 from a loader, 4 via ``load_each``).
        """
        if n_items and not n_kept:
            problem = ""
            if self.items:
                first = self.items[0][1]
                problem = f"; the first problem: record {first.index}, field '{first.field}': {first.message}"
            raise RecordError(self.source, None, "<file>",
                              f"read with {self.loader}, all {n_items} records were dropped as unusable "
                              f"(is it a file of another format?){problem}{hint}")
        collectors = _COLLECTORS.get()
        if collectors:
            collectors[-1].extend(self.items)
            return
        for warning in summarise(self.items):
            warnings.warn(warning, stacklevel=stacklevel)
