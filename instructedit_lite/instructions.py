"""Task instructions: the one thing InstructEdit adds to MEND.

Every edit input becomes ``Task: {task}\\nDescription: {description}\\nInput: {prompt}`` and the
target is appended after it as ``" " + target_new`` (elsewhere; the target itself never changes).
The editor is still plain MEND: the prefix only changes the activations and gradients the editor
sees, so that the update directions of different task families separate and one editor can serve
them all.

Where the prefix goes: the edit prompt, every rephrase and every portability probe get it, with the
same description for all of them within a record, because they all ask for the edited knowledge and
the editor should see them in the same "mode".  Locality probes never get it: they stand for
ordinary, unrelated use of the model, which must behave as before whether or not anybody edited it.

Each task has ten descriptions.  Training and seen-instruction evaluation draw one of the first
nine per record, with a choice that is a stable hash of (seed, task, subject, prompt) so that the
same record always gets the same description, in any process and on any machine.  The tenth is
held out, never used in training, to measure whether the editor follows an instruction it has
never seen (the paper's "unseen instruction" setting).

The built-in descriptions are this project's own wording (declared with each task in
:mod:`~instructedit_lite.tasks`).  :func:`official_instructions` reads the
ones released with the paper from their JSON file instead.  The multi-task MEND baseline runs the
same code with ``instructions=None`` through :func:`maybe_instruct`.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from . import tasks as _tasks
from .loaders import load_instruction_file
from .records import EditRecord, Probe, RecordError

TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}"
N_DESCRIPTIONS = 10
HELDOUT_INDEX = 9
_TEMPLATE_FIELDS = ("task", "description", "prompt")
_CONVSENT_FIELDS = ("sentiment", "topic")  # placeholders of every description of a sentiment task

#: The built-in tasks' descriptions, as their declarations give them (:mod:`~instructedit_lite.tasks`).
#: The embedded tokenizer is trained on exactly these (see
#: :func:`~instructedit_lite.base_model.tokenizer_training_text`); a registered task brings its own
#: in ``Task.descriptions`` and leaves the base model's cache key alone.
DESCRIPTIONS: dict[str, tuple[str, ...]] = {name: _tasks.get_task(name).descriptions for name in _tasks.BUILT_IN}


def _fields(text: str) -> list[str | None]:
    """Names of the ``{...}`` replacement fields in ``text``, in order (raises on bad braces)."""
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


@dataclass(frozen=True)
class InstructionSet:
    """A template and, per task, the descriptions; ``descriptions[task][heldout_index]`` is unseen."""

    template: str
    descriptions: Mapping[str, tuple[str, ...]]
    heldout_index: int = HELDOUT_INDEX
    source: str = "instructedit_lite.instructions.DESCRIPTIONS"

    def __post_init__(self) -> None:
        # Validated once here so that a bad set fails when it is built, not in the middle of
        # training when a rare task first comes up.
        def fail(field_name: str, message: str) -> None:
            raise RecordError(self.source, None, field_name, message)

        try:
            names = _fields(self.template)
        except ValueError as exc:
            fail("template", f"not a valid format string: {exc}")
        if sorted(names) != sorted(_TEMPLATE_FIELDS):
            fail("template", f"needs exactly the placeholders {_TEMPLATE_FIELDS}, found {tuple(names)}")
        if not self.descriptions:
            fail("instructions", "no task has descriptions")
        if not 0 <= self.heldout_index < N_DESCRIPTIONS:
            fail("heldout_instruction_index", f"must be in 0..{N_DESCRIPTIONS - 1}, got {self.heldout_index!r}")
        for task, texts in self.descriptions.items():
            where = f"instructions.{task}"
            if task not in _tasks.task_names():
                fail(where, f"unknown task {task!r}; expected one of {_tasks.task_names()}")
            if not isinstance(texts, tuple) or len(texts) != N_DESCRIPTIONS:
                fail(where, f"needs exactly {N_DESCRIPTIONS} descriptions, got {len(texts) if isinstance(texts, (tuple, list)) else type(texts).__name__}")
            if len(set(texts)) != len(texts):
                fail(where, "descriptions must be distinct")
            for i, text in enumerate(texts):
                if not isinstance(text, str) or not text.strip():
                    fail(f"{where}[{i}]", "must be a non-empty string")
                try:
                    found = set(_fields(text))
                except ValueError as exc:
                    fail(f"{where}[{i}]", f"unbalanced braces: {exc}")
                # ConvSent descriptions must name the wanted sentiment and the topic, or the
                # instruction could not tell the editor which way to push; the other tasks have
                # nothing to fill in, so a stray placeholder would leak into the model's input.
                wanted = set(_CONVSENT_FIELDS) if _tasks.is_sentiment(task) else set()
                if found != wanted:
                    fail(f"{where}[{i}]", f"placeholders must be {sorted(wanted)}, found {sorted(found)}")

    # Descriptions ------------------------------------------------------------------------
    def _texts(self, task: str) -> tuple[str, ...]:
        if task not in self.descriptions:
            raise RecordError(self.source, None, "task", f"no descriptions for task {task!r}; this set has {tuple(self.descriptions)}")
        return self.descriptions[task]

    def seen(self, task: str) -> tuple[str, ...]:
        """The descriptions used in training (all but the held-out one), unfilled."""
        texts = self._texts(task)
        return texts[: self.heldout_index] + texts[self.heldout_index + 1 :]

    def unseen(self, task: str) -> str:
        """The held-out description, unfilled."""
        return self._texts(task)[self.heldout_index]

    def description_for(self, record: EditRecord, *, unseen: bool = False, seed: int = 0) -> str:
        """The (filled-in) description for ``record``: a fixed seeded choice among the seen ones."""
        if unseen:
            text = self.unseen(record.task)
        else:
            seen = self.seen(record.task)
            # hashlib, not hash(): str hashes are salted per process (PYTHONHASHSEED), and a
            # record must get the same description in training, evaluation and a re-run.
            key = "\x1f".join((str(seed), record.task, record.subject, record.prompt)).encode("utf-8")
            text = seen[int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % len(seen)]
        if _tasks.is_sentiment(record.task):
            for name in _CONVSENT_FIELDS:
                value = getattr(record, name, None)
                if not isinstance(value, str) or not value.strip():
                    raise RecordError(record.source or "<memory>", record.index, name,
                                      f"a ConvSent instruction names the {name}, but the record has {value!r}")
            # str.replace rather than str.format: a topic may itself contain braces.
            text = text.replace("{sentiment}", record.sentiment).replace("{topic}", record.topic)
        return text

    def format(self, task: str, description: str, prompt: str) -> str:
        """Apply the template."""
        return self.template.format(task=task, description=description, prompt=prompt)

    def instruct(self, record: EditRecord, *, unseen: bool = False, seed: int = 0) -> EditRecord:
        """A copy of ``record`` whose edit, rephrase and portability prompts carry the instruction."""
        description = self.description_for(record, unseen=unseen, seed=seed)

        def wrap(prompt: str) -> str:
            return self.format(record.task, description, prompt)

        portability = {kind: tuple(Probe(wrap(p.prompt), p.answers) for p in probes)
                       for kind, probes in record.portability.items()}
        return replace(record, prompt=wrap(record.prompt),
                       rephrase=tuple(wrap(r) for r in record.rephrase),
                       portability=portability)


def maybe_instruct(record: EditRecord, instructions: InstructionSet | None, **kw) -> EditRecord:
    """``instructions.instruct(record, **kw)``, or ``record`` unchanged when ``instructions is None``.

    The multi-task MEND baseline is InstructEdit with the instructions switched off, so both go
    through this one call and differ in nothing else.
    """
    return record if instructions is None else instructions.instruct(record, **kw)


def default_instructions() -> InstructionSet:
    """The project's own descriptions: the built-in tasks' and those of registered tasks that bring some."""
    descriptions = dict(DESCRIPTIONS)
    for task in _tasks.registered():
        if task.descriptions is not None:
            descriptions[task.name] = tuple(task.descriptions)
    return InstructionSet(TEMPLATE, descriptions)


def official_instructions(path: str | Path) -> InstructionSet:
    """The instructions released with the paper, read from their JSON file.

    The file's positional ``{}`` template becomes the named ``TEMPLATE`` fields (in the order
    task, description, input) and ConvSent's ``[LABEL]``/``[TOPIC]`` become ``{sentiment}`` and
    ``{topic}``, so both sets behave the same from here on.  The file may cover any subset of
    the registered tasks (editing a task it lacks then fails with an error naming the task); this
    is the one parser of the instruction-file format.
    """
    source = str(path)
    data = load_instruction_file(path, source=source)
    # Escape any other brace so that only the three converted fields are live.
    parts = [p.replace("{", "{{").replace("}", "}}") for p in data["template"].split("{}")]
    named = parts[0] + "".join("{" + f + "}" + p for f, p in zip(_TEMPLATE_FIELDS, parts[1:]))
    descriptions = {task: tuple(t.replace("[LABEL]", "{sentiment}").replace("[TOPIC]", "{topic}") for t in texts)
                    for task, texts in data["instructions"].items()}
    heldout = data["heldout_instruction_index"]
    return InstructionSet(named, descriptions, heldout, source)
