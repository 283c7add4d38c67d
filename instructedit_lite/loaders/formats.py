"""Loaders for the public knowledge-editing files, each producing :class:`EditRecord` objects.

Formats (one JSON file each, a list of objects unless said otherwise):

* **KnowEdit** (``wiki_counterfact``, ``wiki_recent``, ``ZsRE-test-all``): ``subject, prompt,
  target_new, ground_truth?, rephrase_prompt?, locality{KIND: [{prompt, ground_truth}]},
  portability{KIND: [...]}``.  Ground truths come in three shapes (a string in wiki_counterfact,
  a list of strings in ZsRE, a list of alias lists in wiki_recent); all go through
  :func:`~instructedit_lite.records.answers_from`, so a plain string is one answer.
* **MEND zsRE** (``zsre_mend_*``): ``subject, src, alt, answers, rephrase, loc, loc_ans,
  portability{New Question, New Answer}?``.
* **ConvSent** (SERAC ``blender_*``): ``[{ent, pos: [responses], neg: [responses]}]``, one topic
  per entry; the edit question is made here from :data:`CONVSENT_QUESTIONS`.
* **MEND CounterFact** (``counterfact-{train,val,edit}``): ``case_id, prompt, target_new,
  subject, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``.
* The **official instruction file**: ``{template, instructions{task: [10]},
  heldout_instruction_index}``, parsed and checked by :func:`load_instruction_file`.

Every problem raises :class:`RecordError` naming the file, the record's index and the field
(``locality.Relation_Specificity[2].ground_truth``); nothing is guessed.  Some published files
hold a few unusable items (a locality probe whose ground truth is empty, an edit whose new target
is empty).  With ``on_error="skip"`` such an item is dropped, and each drop is reported as a
:class:`SkippedDataWarning` carrying the same error: a broken probe or rephrase drops only that
probe or rephrase, anything else drops the whole record.  The loaders default to ``"raise"``;
:func:`load_real`, which reads the known published files, defaults to ``"skip"``.

Normalisation applied everywhere: leading/trailing whitespace is stripped from text fields
(some published targets read ``" myna"``; the edit is assembled as ``prompt + " " + target_new``,
so a stray space would become a token of its own), and a probe kind with no probes (``[]`` in
wiki_recent) is left out, so ``bool(record.portability)`` says whether there is anything to test.
"""

from __future__ import annotations

import json
import os
import string
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

from .records import TASKS, EditRecord, Probe, RecordError, answers_from

__all__ = [
    "CONVSENT_QUESTIONS", "ENV_VAR", "INSTRUCTION_FILE", "REAL_FILES", "SkippedDataWarning",
    "available_real_files", "data_dir", "load_convsent", "load_counterfact_mend",
    "load_instruction_file", "load_knowedit", "load_real", "load_real_instructions",
    "load_zsre_mend",
]

#: Environment variable naming the folder that holds the real files.
ENV_VAR = "INSTRUCTEDIT_DATA"
#: The official instruction file, relative to the data folder.
INSTRUCTION_FILE = "instructedit_instructions.json"

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

ON_ERROR = ("raise", "skip")


class SkippedDataWarning(UserWarning):
    """An unusable item was dropped under ``on_error="skip"``; ``.error`` says which and why."""

    def __init__(self, error: RecordError, dropped: str):
        self.error, self.dropped = error, dropped
        super().__init__(f"dropped {dropped}: {error}")


# ---------------------------------------------------------------------------------------------
# Reading one record's fields
# ---------------------------------------------------------------------------------------------
class _Fields:
    """Typed access to one raw JSON object; every failure names source, index and field."""

    def __init__(self, raw: Any, source: str, index: int | None, on_error: str = "raise"):
        self.source, self.index, self.on_error = source, index, on_error
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
        return _text(self.raw[key], self, key, allow_empty=allow_empty)

    def answers(self, key: str, *, required: bool = True, allow_empty: bool = False) -> tuple[str, ...]:
        if key not in self.raw:
            if required:
                self.fail(key, "required field is missing")
            return ()
        return _answers(self.raw[key], self, key, allow_empty=allow_empty)

    def dropped(self, error: RecordError, what: str) -> None:
        _drop(error, what, self.on_error)


def _drop(error: RecordError, what: str, on_error: str) -> None:
    """Re-raise ``error``, or report it and carry on without the item (``on_error="skip"``)."""
    if on_error == "raise":
        raise error
    warnings.warn(SkippedDataWarning(error, what), stacklevel=3)


def _text(value: Any, f: _Fields, field_name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        f.fail(field_name, f"expected a string, got {type(value).__name__}")
    value = value.strip()
    if not value and not allow_empty:
        f.fail(field_name, "must not be empty")
    return value


def _answers(value: Any, f: _Fields, field_name: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    out = answers_from(value, source=f.source, index=f.index, field_name=field_name)
    if not out and not allow_empty:
        # An empty answer list cannot be scored; the caller decides whether to drop the item.
        f.fail(field_name, f"no non-empty answer in {value!r}")
    return out


def _rephrases(f: _Fields, key: str) -> tuple[str, ...]:
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
            out.append(_text(item, f, name))
        except RecordError as err:
            f.dropped(err, "rephrase")
    return tuple(out)


def _probe_groups(f: _Fields, key: str) -> dict[str, tuple[Probe, ...]]:
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
                probes.append(_probe(item, f, name))
            except RecordError as err:
                f.dropped(err, "probe")
        if probes:
            out[kind] = tuple(probes)
    return out


def _probe(item: Any, f: _Fields, name: str) -> Probe:
    if not isinstance(item, dict):
        f.fail(name, f"expected an object with prompt and ground_truth, got {type(item).__name__}")
    for key in ("prompt", "ground_truth"):
        if key not in item:
            f.fail(f"{name}.{key}", "required field is missing")
    return Probe(_text(item["prompt"], f, f"{name}.prompt"), _answers(item["ground_truth"], f, f"{name}.ground_truth"))


def _check_task(task: str, source: str) -> None:
    if task not in TASKS:
        raise RecordError(source, None, "task", f"unknown task {task!r}; expected one of {TASKS}")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _read_json(path: str | Path) -> Any:
    # A missing file stays a FileNotFoundError; unparsable content is a RecordError.
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(str(path), None, "<file>", f"not valid JSON: {exc}") from exc


def _read_list(path: str | Path) -> list[Any]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise RecordError(str(path), None, "<file>", f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _check_options(limit: int | None, on_error: str) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _load_each(path: str | Path, build: Callable[[_Fields], EditRecord], *, limit: int | None,
               on_error: str) -> list[EditRecord]:
    """Read a JSON list and build one record per entry (the first ``limit`` entries)."""
    source = str(path)
    _check_options(limit, on_error)
    raw = _read_list(path)
    records = []
    for i, item in enumerate(raw[:limit]):
        try:
            records.append(build(_Fields(item, source, i, on_error)))
        except RecordError as err:
            _drop(err, "record", on_error)
    return records


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------
def load_knowedit(path: str | Path, task: str, *, limit: int | None = None,
                  on_error: str = "raise") -> list[EditRecord]:
    """A KnowEdit file; ``task`` is required because three task families share the format.

    ``rephrase_prompt`` (ZsRE-test-all only) may be a string or a list of strings.
    """
    _check_task(task, str(path))

    def build(f: _Fields) -> EditRecord:
        return EditRecord(
            task=task,
            subject=f.text("subject", allow_empty=True),
            prompt=f.text("prompt"),
            target_new=f.text("target_new"),
            # Optional: the pre-edit answer; an empty string means "not known" and gives ().
            ground_truth=f.answers("ground_truth", required=False, allow_empty=True),
            rephrase=_rephrases(f, "rephrase_prompt"),
            locality=_probe_groups(f, "locality"),
            portability=_probe_groups(f, "portability"),
            source=f.source, index=f.index,
        )

    return _load_each(path, build, limit=limit, on_error=on_error)


def load_zsre_mend(path: str | Path, *, task: str = "zsre", limit: int | None = None,
                   on_error: str = "raise") -> list[EditRecord]:
    """MEND's zsRE format (the held-out test file with portability, or the train file without).

    ``loc`` keeps its ``"nq question: "`` prefix: the reference implementation feeds it to the
    model as given, so locality is measured on the same text.  ``pred`` (MEND's model output),
    ``cond`` and ``portability["Recalled Relation"]`` are not used.
    """
    _check_task(task, str(path))

    def build(f: _Fields) -> EditRecord:
        # Fields of the edit itself first: if the record is unusable, its probes are not reported.
        subject, prompt, target = f.text("subject", allow_empty=True), f.text("src"), f.text("alt")
        ground_truth = f.answers("answers", allow_empty=True)
        return EditRecord(
            task=task, subject=subject, prompt=prompt, target_new=target, ground_truth=ground_truth,
            rephrase=_rephrases(f, "rephrase"),
            locality=_single_probe(f, "NQ", "loc", "loc_ans"),
            portability=_zsre_portability(f),
            source=f.source, index=f.index,
        )

    return _load_each(path, build, limit=limit, on_error=on_error)


def _single_probe(f: _Fields, kind: str, prompt_key: str, answer_key: str) -> dict[str, tuple[Probe, ...]]:
    """``{kind: (Probe,)}`` from two top-level fields, or ``{}`` if dropped as unusable."""
    try:
        return {kind: (Probe(f.text(prompt_key), f.answers(answer_key)),)}
    except RecordError as err:
        f.dropped(err, "probe")
        return {}


def _zsre_portability(f: _Fields) -> dict[str, tuple[Probe, ...]]:
    if "portability" not in f.raw:
        return {}
    port = f.raw["portability"]
    if not isinstance(port, dict):
        f.fail("portability", f"expected an object with 'New Question' and 'New Answer', got {type(port).__name__}")
    try:
        for key in ("New Question", "New Answer"):
            if key not in port:
                f.fail(f"portability.{key}", "required field is missing")
        probe = Probe(_text(port["New Question"], f, "portability.New Question"),
                      _answers(port["New Answer"], f, "portability.New Answer"))
    except RecordError as err:
        f.dropped(err, "probe")
        return {}
    return {"New_Question": (probe,)}


def load_counterfact_mend(path: str | Path, *, task: str = "counterfact", limit: int | None = None,
                          on_error: str = "raise") -> list[EditRecord]:
    """MEND's CounterFact split; one ``Neighborhood`` locality probe per record.

    ``case_id`` is checked to be an integer when present but not kept (``EditRecord.index`` is the
    position in the file).
    """
    _check_task(task, str(path))

    def build(f: _Fields) -> EditRecord:
        case_id = f.raw.get("case_id")
        if case_id is not None and (not isinstance(case_id, int) or isinstance(case_id, bool)):
            f.fail("case_id", f"expected an integer, got {case_id!r}")
        subject, prompt, target = f.text("subject", allow_empty=True), f.text("prompt"), f.text("target_new")
        ground_truth = f.answers("ground_truth", required=False, allow_empty=True)
        return EditRecord(
            task=task, subject=subject, prompt=prompt, target_new=target, ground_truth=ground_truth,
            rephrase=_rephrases(f, "rephrase_prompt"),
            locality=_single_probe(f, "Neighborhood", "locality_prompt", "locality_ground_truth"),
            source=f.source, index=f.index,
        )

    return _load_each(path, build, limit=limit, on_error=on_error)


def load_convsent(path: str | Path, *, task: str = "convsent", limit: int | None = None,
                  sentiments: str = "alternate", on_error: str = "raise") -> list[EditRecord]:
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
    source = str(path)
    if task != "convsent":
        raise RecordError(source, None, "task", f"a ConvSent file makes 'convsent' records, not {task!r}")
    if sentiments not in ("alternate", "positive", "negative"):
        raise ValueError(f"sentiments must be 'alternate', 'positive' or 'negative', got {sentiments!r}")
    _check_options(limit, on_error)
    raw = _read_list(path)
    n = len(raw)
    parsed: dict[int, tuple[str, tuple[str, ...], tuple[str, ...]] | None] = {}

    def topic(i: int):
        """The topic at ``i`` as (ent, pos, neg); None once reported as skipped."""
        if i not in parsed:
            try:
                parsed[i] = _convsent_topic(_Fields(raw[i], source, i))
            except RecordError as err:
                _drop(err, "record", on_error)
                parsed[i] = None
        return parsed[i]

    records = []
    for i in range(n if limit is None else min(limit, n)):
        own = topic(i)
        if own is None:
            continue
        ent, pos, neg = own
        sentiment = sentiments if sentiments != "alternate" else ("positive" if i % 2 == 0 else "negative")
        wanted = pos if sentiment == "positive" else neg
        if not wanted:
            err = RecordError(source, i, sentiment[:3], f"no {sentiment} response to use as the edit target")
            _drop(err, "record", on_error)
            continue
        records.append(EditRecord(
            task="convsent", subject=ent, prompt=_convsent_question(i, ent), target_new=wanted[0],
            locality=_other_topic(i, n, topic), topic=ent, sentiment=sentiment,
            pos_responses=pos, neg_responses=neg, source=source, index=i,
        ))
    return records


def _convsent_topic(f: _Fields) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
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
        return {"Other_Topic": (Probe(_convsent_question(j, ent), pos[:k] + neg[:k]),)}
    return {}


def load_instruction_file(path: str | Path) -> dict[str, Any]:
    """Parse and check the official instruction file.

    Returns ``{"template": str, "instructions": {task: [10 str]}, "heldout_instruction_index":
    int}``.  Checks: the template has exactly three positional ``{}`` fields (task, description,
    input); every task of :data:`~instructedit_lite.records.TASKS`, and no other, has ten
    non-empty descriptions; ConvSent's contain the ``[LABEL]`` and ``[TOPIC]`` placeholders; the
    held-out index is in range; and ``train_instruction_indices``, if given, are exactly the
    other nine (the file's own statement of the split must agree with what is returned).
    """
    source = str(path)

    def fail(field_name: str, message: str) -> NoReturn:
        raise RecordError(source, None, field_name, message)

    data = _read_json(path)
    if not isinstance(data, dict):
        fail("<file>", f"expected a JSON object, got {type(data).__name__}")
    for key in ("template", "instructions", "heldout_instruction_index"):
        if key not in data:
            fail(key, "required field is missing")

    template = data["template"]
    if not isinstance(template, str):
        fail("template", f"expected a string, got {type(template).__name__}")
    try:
        names = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        fail("template", f"not a valid format string: {exc}")
    if names != [("", "", None)] * 3:
        fail("template", f"needs exactly three '{{}}' fields (task, description, input), found {names}")

    instructions = data["instructions"]
    if not isinstance(instructions, dict):
        fail("instructions", f"expected an object mapping a task to its descriptions, got {type(instructions).__name__}")
    unknown = sorted(set(instructions) - set(TASKS))
    if unknown:
        fail(f"instructions.{unknown[0]}", f"unknown task; expected only {TASKS}")
    out: dict[str, list[str]] = {}
    for task in TASKS:
        if task not in instructions:
            fail(f"instructions.{task}", "required task is missing")
        texts = instructions[task]
        if not isinstance(texts, list) or len(texts) != 10:
            fail(f"instructions.{task}", f"expected a list of 10 descriptions, got {texts!r:.80}")
        for j, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                fail(f"instructions.{task}[{j}]", f"expected a non-empty string, got {text!r}")
            if task == "convsent" and ("[LABEL]" not in text or "[TOPIC]" not in text):
                fail(f"instructions.{task}[{j}]", "a ConvSent description must contain [LABEL] and [TOPIC]")
        out[task] = list(texts)

    heldout = data["heldout_instruction_index"]
    if not isinstance(heldout, int) or isinstance(heldout, bool) or not 0 <= heldout < 10:
        fail("heldout_instruction_index", f"expected an integer in 0..9, got {heldout!r}")
    if "train_instruction_indices" in data:
        expected = [j for j in range(10) if j != heldout]
        if data["train_instruction_indices"] != expected:
            fail("train_instruction_indices", f"expected {expected} (all but the held-out one), "
                                              f"got {data['train_instruction_indices']!r}")
    return {"template": template, "instructions": out, "heldout_instruction_index": heldout}


# ---------------------------------------------------------------------------------------------
# The real files
# ---------------------------------------------------------------------------------------------
Loader = Callable[..., list[EditRecord]]

#: name -> (path relative to the data folder, loader, task the records get).
REAL_FILES: dict[str, tuple[str, Loader, str]] = {
    "wiki_counterfact": ("knowedit/wiki_counterfact_train_cf.json", load_knowedit, "counterfact"),
    "wiki_recent": ("knowedit/wiki_recent_recent_train.json", load_knowedit, "wikirecent"),
    "zsre_knowedit": ("knowedit/ZsRE-test-all.json", load_knowedit, "zsre"),
    "zsre_mend_portability": ("zsre/zsre_mend_eval_portability.json", load_zsre_mend, "zsre"),
    "zsre_mend_train": ("zsre/zsre_mend_train-1k.json", load_zsre_mend, "zsre"),
    "convsent_test": ("convsent/blender_test.json", load_convsent, "convsent"),
    "convsent_val": ("convsent/blender_val.json", load_convsent, "convsent"),
    "counterfact_mend_train": ("counterfact_mend/counterfact-train.json", load_counterfact_mend, "counterfact"),
    "counterfact_mend_val": ("counterfact_mend/counterfact-val.json", load_counterfact_mend, "counterfact"),
    "counterfact_mend_edit": ("counterfact_mend/counterfact-edit.json", load_counterfact_mend, "counterfact"),
}


def data_dir(path: str | Path | None = None) -> Path | None:
    """The folder of real files: ``path``, else ``$INSTRUCTEDIT_DATA``, else ``None``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else None


def _real_root(root: str | Path | None) -> Path:
    folder = data_dir(root)
    if folder is None:
        raise FileNotFoundError(f"no data folder: pass root= or set {ENV_VAR}")
    return folder


def available_real_files(root: str | Path | None = None) -> list[str]:
    """Names in :data:`REAL_FILES` whose file exists in the data folder (``[]`` without one)."""
    folder = data_dir(root)
    if folder is None:
        return []
    return [name for name, (rel, _, _) in REAL_FILES.items() if (folder / rel).is_file()]


def load_real(name: str, root: str | Path | None = None, limit: int | None = None, *,
              on_error: str = "skip") -> list[EditRecord]:
    """Load one of :data:`REAL_FILES` from the data folder.

    Defaults to ``on_error="skip"``: the published files hold a few unusable items (see the module
    docstring), each reported as a :class:`SkippedDataWarning`; pass ``"raise"`` to stop at the
    first one instead.
    """
    if name not in REAL_FILES:
        raise ValueError(f"unknown real file {name!r}; known: {sorted(REAL_FILES)}")
    rel, loader, task = REAL_FILES[name]
    path = _real_root(root) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file {path}")
    return loader(path, task=task, limit=limit, on_error=on_error)


def load_real_instructions(root: str | Path | None = None) -> dict[str, Any]:
    """:func:`load_instruction_file` on the data folder's official instruction file."""
    path = _real_root(root) / INSTRUCTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    return load_instruction_file(path)
