"""The four record formats of the public files, each read into :class:`~instructedit_lite.records.EditRecord` objects.

See the package docstring of :mod:`instructedit_lite.loaders` for the formats and the error
conventions (book chapter 1).  ``source`` names the file in messages and records (default: the
path as given); :func:`~instructedit_lite.loaders.load_real` passes the path relative to the data
folder, so no message names a folder of one machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..records import EditRecord, Probe, RecordError, alternating
from .reading import (Fields, answers_value, check_options, check_task, keys_hint, load_each, probe_groups, read_list,
                      rephrases, short, text_value, unicode_problem)
from .skipped import Drops

#: ConvSent edit questions; ``{topic}`` is the topic.  Record ``i`` uses entry ``i % 12``.
CONVSENT_QUESTIONS: tuple[str, ...] = (
    "What do you think of {topic}?",
    "How do you feel about {topic}?",
    "What is your opinion of {topic}?",
    "What are your thoughts on {topic}?",
    "Tell me what you think about {topic}.",
    "Do you like {topic}?",
    "What's your take on {topic}?",
    "How would you describe {topic}?",
    "What comes to mind when you think of {topic}?",
    "Can you share your view on {topic}?",
    "What is your impression of {topic}?",
    "How do you rate {topic}?",
)

#: How many responses of each sentiment a ConvSent locality probe keeps.
CONVSENT_LOCALITY_RESPONSES = 5


def load_knowedit(path: str | Path, task: str, *, limit: int | None = None, on_error: str = "raise",
                  source: str | None = None) -> list[EditRecord]:
    """A KnowEdit file; ``task`` is required because three task families share the format.

    ``rephrase_prompt`` (ZsRE-test-all only) may be a string or a list of strings.
    """
    check_task(task, str(path) if source is None else source)

    def build(f: Fields) -> EditRecord:
        return EditRecord(
            task=task,
            subject=f.text("subject", allow_empty=True),
            prompt=f.text("prompt"),
            target_new=f.text("target_new"),
            # Optional: the pre-edit answer; an empty string means "not known" and gives ().
            ground_truth=f.answers("ground_truth", required=False, allow_empty=True),
            rephrase=rephrases(f, "rephrase_prompt"),
            locality=probe_groups(f, "locality"),
            portability=probe_groups(f, "portability"),
            source=f.source, index=f.index,
        )

    return load_each(path, build, fmt="knowedit", source=source, limit=limit, on_error=on_error)


def load_zsre_mend(path: str | Path, *, task: str = "zsre", limit: int | None = None,
                   on_error: str = "raise", source: str | None = None) -> list[EditRecord]:
    """MEND's zsRE format (the held-out test file with portability, or the train file without).

    ``loc`` keeps its ``"nq question: "`` prefix: the reference implementation feeds it to the
    model as given, so locality is measured on the same text.  ``pred`` (MEND's model output),
    ``cond`` and ``portability["Recalled Relation"]`` are not used.
    """
    check_task(task, str(path) if source is None else source)

    def build(f: Fields) -> EditRecord:
        # Fields of the edit itself first: if the record is unusable, its probes are not reported.
        subject, prompt, target = f.text("subject", allow_empty=True), f.text("src"), f.text("alt")
        ground_truth = f.answers("answers", allow_empty=True)
        return EditRecord(
            task=task, subject=subject, prompt=prompt, target_new=target, ground_truth=ground_truth,
            rephrase=rephrases(f, "rephrase"),
            locality=_single_probe(f, "NQ", "loc", "loc_ans"),
            portability=_zsre_portability(f),
            source=f.source, index=f.index,
        )

    return load_each(path, build, fmt="zsre_mend", source=source, limit=limit, on_error=on_error)


def _single_probe(f: Fields, kind: str, prompt_key: str, answer_key: str) -> dict[str, tuple[Probe, ...]]:
    """``{kind: (Probe,)}`` from two top-level fields, or ``{}`` if dropped as unusable."""
    try:
        return {kind: (Probe(f.text(prompt_key), f.answers(answer_key)),)}
    except RecordError as err:
        f.dropped(err, "probe")
        return {}


def _zsre_portability(f: Fields) -> dict[str, tuple[Probe, ...]]:
    if "portability" not in f.raw:
        return {}
    port = f.raw["portability"]
    if not isinstance(port, dict):
        f.fail("portability", f"expected an object with 'New Question' and 'New Answer', got {type(port).__name__}")
    try:
        for key in ("New Question", "New Answer"):
            if key not in port:
                f.fail(f"portability.{key}", "required field is missing")
        probe = Probe(text_value(port["New Question"], f, "portability.New Question"),
                      answers_value(port["New Answer"], f, "portability.New Answer"))
    except RecordError as err:
        f.dropped(err, "probe")
        return {}
    return {"New_Question": (probe,)}


def load_counterfact_mend(path: str | Path, *, task: str = "counterfact", limit: int | None = None,
                          on_error: str = "raise", source: str | None = None) -> list[EditRecord]:
    """MEND's CounterFact split; one ``Neighborhood`` locality probe per record.

    ``case_id`` is checked to be an integer when present but not kept (``EditRecord.index`` is the
    position in the file).
    """
    check_task(task, str(path) if source is None else source)

    def build(f: Fields) -> EditRecord:
        case_id = f.raw.get("case_id")
        if case_id is not None and (not isinstance(case_id, int) or isinstance(case_id, bool)):
            f.fail("case_id", f"expected an integer, got {short(case_id)}")
        subject, prompt, target = f.text("subject", allow_empty=True), f.text("prompt"), f.text("target_new")
        ground_truth = f.answers("ground_truth", required=False, allow_empty=True)
        return EditRecord(
            task=task, subject=subject, prompt=prompt, target_new=target, ground_truth=ground_truth,
            rephrase=rephrases(f, "rephrase_prompt"),
            locality=_single_probe(f, "Neighborhood", "locality_prompt", "locality_ground_truth"),
            source=f.source, index=f.index,
        )

    return load_each(path, build, fmt="counterfact_mend", source=source, limit=limit, on_error=on_error)


def load_convsent(path: str | Path, *, task: str = "convsent", limit: int | None = None,
                  sentiments: str = "alternate", on_error: str = "raise",
                  source: str | None = None) -> list[EditRecord]:
    """SERAC's ConvSent file: one edit per topic.

    The file has no edit question and no wanted sentiment, so they are made here,
    deterministically from the record's index ``i`` in the file:

    * sentiment: ``"alternate"`` gives ``"positive"`` for even ``i`` and ``"negative"`` for odd
      ``i`` (both directions are trained, in equal numbers); ``"positive"`` or ``"negative"``
      forces one;
    * prompt: ``CONVSENT_QUESTIONS[i % 12]`` about the topic;
    * target_new: the first response of the wanted sentiment;
    * locality ``Other_Topic``: the question of the next topic in the file (wrapping round), whose
      answers are its first 5 positive then first 5 negative responses.  With ``on_error="skip"``
      a topic that was dropped is passed over; a file of one topic has no locality probe.

    Responses are stripped of their surrounding spaces; empty ones are dropped.
    """
    source = str(path) if source is None else source
    if task != "convsent":
        raise RecordError(source, None, "task", f"a ConvSent file makes 'convsent' records, not {task!r}")
    if sentiments not in ("alternate", "positive", "negative"):
        raise ValueError(f"sentiments must be 'alternate', 'positive' or 'negative', got {sentiments!r}")
    check_options(limit, on_error)
    raw = read_list(path, source, "convsent")
    n = len(raw)
    drops = Drops(source, on_error, "load_convsent")
    parsed: dict[int, tuple[str, tuple[str, ...], tuple[str, ...]] | None] = {}

    def topic(i: int):
        """The topic at ``i`` as (ent, pos, neg); None once reported as skipped."""
        if i not in parsed:
            try:
                parsed[i] = _convsent_topic(Fields(raw[i], source, i))
            except RecordError as err:
                drops.add(err, "record")
                parsed[i] = None
        return parsed[i]

    records = []
    wanted_n = n if limit is None else min(limit, n)
    for i in range(wanted_n):
        own = topic(i)
        if own is None:
            continue
        ent, pos, neg = own
        sentiment = sentiments if sentiments != "alternate" else ("positive" if i % 2 == 0 else "negative")
        wanted = pos if sentiment == "positive" else neg
        if not wanted:
            drops.add(RecordError(source, i, sentiment[:3], f"no {sentiment} response to use as the edit target"),
                      "record")
            continue
        records.append(EditRecord(
            task="convsent", subject=ent, prompt=_convsent_question(i, ent), target_new=wanted[0],
            locality=_other_topic(i, n, topic), topic=ent, sentiment=sentiment,
            pos_responses=pos, neg_responses=neg, source=source, index=i,
        ))
    hint = keys_hint(raw, "convsent") if wanted_n and not records else ""
    drops.finish(wanted_n, len(records), stacklevel=3, hint=hint)
    return records


def _convsent_topic(f: Fields) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    ent = f.text("ent")
    lists = []
    for key in ("pos", "neg"):
        if key not in f.raw:
            f.fail(key, "required field is missing")
        value = f.raw[key]
        if not isinstance(value, list):
            f.fail(key, f"expected a list of responses, got {type(value).__name__}")
        out = []
        for j, response in enumerate(value):
            if not isinstance(response, str):
                f.fail(f"{key}[{j}]", f"expected a string, got {type(response).__name__}")
            if unicode_problem(response):
                f.fail(f"{key}[{j}]", unicode_problem(response))
            if response.strip():
                out.append(response.strip())
        lists.append(tuple(out))
    if not lists[0] and not lists[1]:
        f.fail("pos", "the topic has no responses of either sentiment")
    return ent, lists[0], lists[1]


def _convsent_question(i: int, topic: str) -> str:
    return CONVSENT_QUESTIONS[i % len(CONVSENT_QUESTIONS)].format(topic=topic)


def _other_topic(i: int, n: int, topic: Callable[[int], Any]) -> dict[str, tuple[Probe, ...]]:
    """Locality on the next usable topic after ``i`` (wrapping); none if ``i`` is the only one."""
    for step in range(1, n):
        j = (i + step) % n
        other = topic(j)
        if other is None:
            continue
        ent, pos, neg = other
        k = CONVSENT_LOCALITY_RESPONSES
        return {"Other_Topic": (Probe(_convsent_question(j, ent), alternating(pos[:k], neg[:k])),)}
    return {}


