"""The official InstructEdit instruction file: the template and ten descriptions per task (chapter 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from ..records import RecordError
from ..tasks import is_sentiment, task_names
from .reading import read_json, short, unicode_problem


def load_instruction_file(path: str | Path, *, source: str | None = None) -> dict[str, Any]:
    """Parse and check the official instruction file.

    Returns ``{"template": str, "instructions": {task: [10 str]}, "heldout_instruction_index":
    int}``.  Checks: the template has exactly three positional ``{}`` fields (task, description,
    input); the file covers a non-empty subset of the registered tasks (:mod:`~instructedit_lite.tasks`),
    each with ten non-empty descriptions; a sentiment task's contain the ``[LABEL]`` and ``[TOPIC]``
    placeholders; the
    held-out index is in range; and ``train_instruction_indices``, if given, are exactly the
    other nine (the file's own statement of the split must agree with what is returned).
    """
    source = str(path) if source is None else source

    def fail(field_name: str, message: str) -> NoReturn:
        raise RecordError(source, None, field_name, message)

    data = read_json(path, source, note="")  # one object, no records to skip
    if not isinstance(data, dict):
        fail("<file>", f"expected a JSON object, got {type(data).__name__}")
    for key in ("template", "instructions"):
        if key not in data:
            fail(key, "required field is missing")

    template = data["template"]
    if not isinstance(template, str):
        fail("template", f"expected a string, got {type(template).__name__}")
    if unicode_problem(template):
        fail("template", unicode_problem(template))
    if template.count("{}") != 3:  # other braces are literal text (chapter 2)
        fail("template", f"needs exactly three '{{}}' fields (task, description, input), got {short(template)}")

    instructions = data["instructions"]
    if not isinstance(instructions, dict):
        fail("instructions",
             f"expected an object mapping a task to its descriptions, got {type(instructions).__name__}")
    known = task_names()
    unknown = sorted(set(instructions) - set(known))
    if unknown:
        fail(f"instructions.{unknown[0]}", f"unknown task; expected registered tasks only {known}")
    if not instructions:
        fail("instructions", "covers no task")
    out: dict[str, list[str]] = {}
    for task in instructions:
        texts = instructions[task]
        if not isinstance(texts, list) or len(texts) != 10:
            fail(f"instructions.{task}", f"expected a list of 10 descriptions, got {short(texts)}")
        for j, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                fail(f"instructions.{task}[{j}]", f"expected a non-empty string, got {short(text)}")
            if unicode_problem(text):
                fail(f"instructions.{task}[{j}]", unicode_problem(text))
            if is_sentiment(task) and ("[LABEL]" not in text or "[TOPIC]" not in text):
                fail(f"instructions.{task}[{j}]", "a sentiment task's description must contain [LABEL] and [TOPIC]")
        out[task] = list(texts)

    heldout = data.get("heldout_instruction_index", 9)  # the paper keeps the tenth back
    if not isinstance(heldout, int) or isinstance(heldout, bool) or not 0 <= heldout < 10:
        fail("heldout_instruction_index", f"expected an integer in 0..9, got {short(heldout)}")
    if "train_instruction_indices" in data:
        expected = [j for j in range(10) if j != heldout]
        if data["train_instruction_indices"] != expected:
            fail("train_instruction_indices", f"expected {expected} (all but the held-out one), "
                                              f"got {short(data['train_instruction_indices'])}")
    return {"template": template, "instructions": out, "heldout_instruction_index": heldout}
