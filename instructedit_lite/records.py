"""The one record type for an edit request, and its validation.

Every loader (public formats) and the embedded world produce :class:`~instructedit_lite.records.EditRecord`
objects, so the
editor, the metrics and the notebooks never see a file format.  Validation raises
:class:`~instructedit_lite.records.RecordError`, which names the source file, the record's index in it and the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from . import tasks as _tasks

SENTIMENTS = ("positive", "negative")


class RecordError(ValueError):
    """A record that cannot be used, with where it came from and which field is wrong."""

    def __init__(self, source: str, index: int | None, field_name: str, message: str):
        self.source, self.index, self.field, self.message = source, index, field_name, message
        where = f"{source}" + (f", record {index}" if index is not None else "")
        super().__init__(f"{where}, field '{field_name}': {message}")


@dataclass(frozen=True)
class Probe:
    """A prompt with the answers that count as correct (aliases), e.g. a locality question."""

    prompt: str
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        # A plain string here would make ``answer`` its first character: the reference code's
        # character-sampling bug.  Callers with raw data go through ``answers_from``.
        if isinstance(self.answers, str) or not isinstance(self.answers, tuple):
            raise TypeError(f"Probe.answers must be a tuple of strings, got {self.answers!r}")

    @property
    def answer(self) -> str:
        """The answer used for teacher forcing: the first alias."""
        return self.answers[0]


@dataclass(frozen=True)
class EditRecord:
    """One edit request, in the shape shared by every task family.

    ``prompt`` + ``" " + target_new`` is the edit.  ``ground_truth`` holds the answers the model
    gave before the edit (aliases; empty for facts the model never saw).  ``locality`` and
    ``portability`` map a probe kind (``"Relation_Specificity"``, ``"Subject_Aliasing"``...) to
    probes.  The ConvSent fields are set for tasks of kind ``"sentiment"`` only.
    """

    task: str
    subject: str
    prompt: str
    target_new: str
    ground_truth: tuple[str, ...] = ()
    rephrase: tuple[str, ...] = ()
    locality: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    portability: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    # ConvSent only: the topic, the wanted sentiment and example responses of each sentiment.
    topic: str | None = None
    sentiment: str | None = None
    pos_responses: tuple[str, ...] = ()
    neg_responses: tuple[str, ...] = ()
    # Where the record came from, for error messages and tables.
    source: str = ""
    index: int | None = None

    def __post_init__(self) -> None:
        validate_record(self)

    def __hash__(self) -> int:
        # The probe dicts are unhashable; these fields identify a record well enough for sets.
        return hash((self.task, self.subject, self.prompt, self.target_new, self.source, self.index))

    # Convenience views -------------------------------------------------------------------
    @property
    def locality_probes(self) -> list[Probe]:
        return [p for probes in self.locality.values() for p in probes]

    @property
    def portability_probes(self) -> list[Probe]:
        return [p for probes in self.portability.values() for p in probes]

    @property
    def wanted_responses(self) -> tuple[str, ...]:
        """ConvSent: responses of the sentiment the edit asks for."""
        return self.pos_responses if self.sentiment == "positive" else self.neg_responses

    @property
    def unwanted_responses(self) -> tuple[str, ...]:
        return self.neg_responses if self.sentiment == "positive" else self.pos_responses

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["locality"] = {k: [asdict(p) for p in v] for k, v in self.locality.items()}
        out["portability"] = {k: [asdict(p) for p in v] for k, v in self.portability.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditRecord":
        def probes(d: dict) -> dict[str, tuple[Probe, ...]]:
            return {k: tuple(Probe(p["prompt"], tuple(p["answers"])) for p in v) for k, v in d.items()}

        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise RecordError(str(data.get("source", "<dict>")), data.get("index"), sorted(unknown)[0], "unknown field")
        kwargs = dict(data)
        kwargs["locality"] = probes(data.get("locality", {}))
        kwargs["portability"] = probes(data.get("portability", {}))
        for key in ("ground_truth", "rephrase", "pos_responses", "neg_responses"):
            kwargs[key] = tuple(data.get(key, ()))
        return cls(**kwargs)


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def validate_record(rec: EditRecord) -> None:
    """Raise :class:`~instructedit_lite.records.RecordError` if ``rec`` cannot be edited or scored."""

    def fail(field_name: str, message: str) -> None:
        raise RecordError(rec.source or "<memory>", rec.index, field_name, message)

    if rec.task not in _tasks.task_names():
        fail("task", f"unknown task {rec.task!r}; expected one of {_tasks.task_names()}")
    for name in ("prompt", "target_new"):
        if not _non_empty_str(getattr(rec, name)):
            fail(name, f"must be a non-empty string, got {getattr(rec, name)!r}")
    if not isinstance(rec.subject, str):
        fail("subject", f"must be a string, got {type(rec.subject).__name__}")
    for name in ("ground_truth", "rephrase", "pos_responses", "neg_responses"):
        values = getattr(rec, name)
        if not isinstance(values, tuple) or not all(_non_empty_str(v) for v in values):
            fail(name, f"must be a tuple of non-empty strings, got {values!r}")
    for name in ("locality", "portability"):
        groups = getattr(rec, name)
        if not isinstance(groups, dict):
            fail(name, f"must map a probe kind to probes, got {type(groups).__name__}")
        for kind, probes in groups.items():
            if not isinstance(probes, (tuple, list)):
                fail(f"{name}.{kind}", f"must be a tuple of probes, got {type(probes).__name__}")
            for i, probe in enumerate(probes):
                if not isinstance(probe, Probe):
                    fail(f"{name}.{kind}[{i}]", f"must be a Probe, got {type(probe).__name__}")
                if not _non_empty_str(probe.prompt):
                    fail(f"{name}.{kind}[{i}].prompt", "must be a non-empty string")
                if not probe.answers or not all(_non_empty_str(a) for a in probe.answers):
                    fail(f"{name}.{kind}[{i}].answers", f"needs at least one non-empty answer, got {probe.answers!r}")
    if _tasks.is_sentiment(rec.task):
        if not _non_empty_str(rec.topic):
            fail("topic", "a ConvSent record needs its topic")
        if rec.sentiment not in SENTIMENTS:
            fail("sentiment", f"must be one of {SENTIMENTS}, got {rec.sentiment!r}")
        if not rec.wanted_responses:
            fail(f"{rec.sentiment[:3]}_responses", "a ConvSent edit needs responses of the wanted sentiment")
    elif rec.sentiment is not None or rec.topic is not None:
        fail("sentiment", f"only sentiment records (ConvSent) carry a topic and sentiment (task is {rec.task!r})")


def answers_from(value: Any, *, source: str, index: int | None, field_name: str) -> tuple[str, ...]:
    """Normalise the three public ground-truth shapes to a tuple of acceptable answers.

    ``"Paris"`` -> ``("Paris",)``; ``["Paris", "City of Light"]`` -> both;
    ``[["USSR", "Soviet Union"], ["Russia"]]`` -> all aliases, in order, without duplicates.
    A plain string is one answer, never a sequence of characters to sample from.
    """
    if isinstance(value, str):
        flat: Iterable[Any] = [value]
    elif isinstance(value, list):
        flat = [a for item in value for a in (item if isinstance(item, list) else [item])]
    else:
        raise RecordError(source, index, field_name, f"expected a string or a list of answers, got {type(value).__name__}")
    out: list[str] = []
    for a in flat:
        if not isinstance(a, str):
            raise RecordError(source, index, field_name, f"answers must be strings, got {a!r}")
        a = a.strip()
        if a and a not in out:
            out.append(a)
    return tuple(out)


def alternating(positive: Iterable[str], negative: Iterable[str]) -> tuple[str, ...]:
    """Responses of both sentiments, alternating (positive first): a ConvSent locality probe's
    answers, so that its first ``2n`` are ``n`` of each sentiment (chapter 4)."""
    pos, neg = list(positive), list(negative)
    out = [x for pair in zip(pos, neg) for x in pair]
    return tuple(out + pos[len(neg):] + neg[len(pos):])


def __getattr__(name: str):
    # ``records.TASKS`` stays importable and always reflects the task registry (PEP 562).
    if name == "TASKS":
        return _tasks.task_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
