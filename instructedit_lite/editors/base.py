"""One interface for every editing method: apply one edit to the model, undo it exactly.

An :class:`Editor` takes an :class:`~instructedit_lite.records.EditRecord` and changes the model so
that it produces the record's target, for the duration of a ``with`` block::

    rec = editor.prepare(record)                 # InstructEdit adds the task instruction here
    with editor.edited(model, tokenizer, rec):   # the model is edited inside the block ...
        logits = model(**batch).logits
    # ... and exactly the original model again here

Weight-editing methods (MEND, KE, FT-L, FT-M) compute a weight update ``ΔW`` and apply it with
:func:`~instructedit_lite.editors.mend.applied`, which copies the original weights back on exit.  Methods
that leave the weights alone (GRACE, CaliNet) add forward hooks for the block and remove them on
exit.  Either way, each test case is an independent single edit on the original model, as in the
paper's evaluation.

What an edit is computed from (:func:`edit_rows`): ``(prompt, target_new)`` for the fact tasks; for
ConvSent, the question followed by ``n_responses`` responses of the wanted sentiment, the
record's ``target_new`` first.  MEND and KE edits of ConvSent also get the question followed by
``n_responses`` responses of the *other* sentiment (:func:`unlikely_rows`), whose unlikelihood
joins the edit's loss (:func:`~instructedit_lite.editors.mend.edit_loss`), as in the reference trainer and
in meta-training; the fine-tuning baselines minimise the NLL of the wanted rows.
"""

from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..engine import PrefixEngine, scored_batch
from ..instructions import InstructionSet, maybe_instruct
from ..records import EditRecord
from ..tasks import is_sentiment
from ..text import prompt_target_batch
from .mend import MendEditor, applied

__all__ = ["Editor", "WeightEditor", "MendMethod", "PerTaskMethod", "EditInfo", "edit_rows", "unlikely_rows",
           "edit_batch", "flagged_batch", "Unedited", "FittedWeightEditor", "check_restored"]

Row = tuple[str, str]


def edit_rows(record: EditRecord, n_responses: int = 2) -> list[Row]:
    """The ``(prompt, target)`` rows an edit of ``record`` is computed from (see module docstring)."""
    if is_sentiment(record.task):
        wanted = [record.target_new] + [r for r in record.wanted_responses if r != record.target_new]
        return [(record.prompt, w) for w in wanted[:n_responses]]
    return [(record.prompt, record.target_new)]


def unlikely_rows(record: EditRecord, n_responses: int = 2) -> list[Row]:
    """ConvSent: the question followed by ``n_responses`` responses of the unwanted sentiment (the
    unlikelihood rows of the edit's loss); none for the fact tasks."""
    if not is_sentiment(record.task):
        return []
    return [(record.prompt, u) for u in list(dict.fromkeys(record.unwanted_responses))[:n_responses]]


def edit_batch(tokenizer, record: EditRecord, device=None, n_responses: int = 2, *,
               unlikelihood: bool = False) -> dict[str, Tensor]:
    """:func:`edit_rows` as one right-padded batch with labels on the targets only; with
    ``unlikelihood``, :func:`unlikely_rows` follow and ``batch["unlikely"]`` flags them."""
    extra = unlikely_rows(record, n_responses) if unlikelihood else []
    return flagged_batch(tokenizer, edit_rows(record, n_responses), extra, device)


def flagged_batch(tokenizer, rows: list[Row], unlikely: list[Row], device=None) -> dict[str, Tensor]:
    """``rows`` then ``unlikely`` as one right-padded batch; ``batch["unlikely"]`` flags the
    latter when there are any (:func:`~instructedit_lite.editors.mend.edit_loss` reads it)."""
    prompts, targets = zip(*(rows + unlikely))
    batch = prompt_target_batch(tokenizer, list(prompts), list(targets), device)
    if unlikely:
        batch["unlikely"] = torch.tensor([False] * len(rows) + [True] * len(unlikely), device=device)
    return batch


@dataclass
class EditInfo:
    """What an edit reports while it is applied: its wall time and method-specific details."""

    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Editor(abc.ABC):
    """A knowledge-editing method.  Subclasses implement :meth:`edited`.

    ``name`` is the method's label in tables and plots (see
    ``instructedit_lite.plots.METHOD_COLORS``).  ``instructions`` is set for InstructEdit
    only: :meth:`prepare` then prefixes the edit prompt, the rephrases and the portability probes
    with the record's task instruction (``unseen=True`` uses the held-out description).
    """

    name: str = "editor"
    instructions: InstructionSet | None = None
    unseen: bool = False

    def prepare(self, record: EditRecord) -> EditRecord:
        """The record as this method sees it (instructed for InstructEdit, else unchanged)."""
        return maybe_instruct(record, self.instructions, unseen=self.unseen) if self.instructions else record

    def edits_at(self, model: nn.Module) -> list[str]:
        """The names of the weights this method changes, or of the modules it hooks, on ``model``
        (empty: it changes nothing there, like the unedited model and IKE).  The evaluation runs a
        method through a frozen-prefix engine whose cached blocks end below the lowest of them."""
        return []

    @abc.abstractmethod
    def edited(self, model: nn.Module, tokenizer, record: EditRecord) -> contextlib.AbstractContextManager[EditInfo]:
        """Context manager: ``model`` carries the edit of ``record`` inside the block and is exactly the
        original model after it (also when the block raises).  ``record`` is already prepared."""


class WeightEditor(Editor):
    """An editor whose edit is a weight update ``{parameter name: ΔW}``."""

    @abc.abstractmethod
    def deltas(self, model: nn.Module, tokenizer, record: EditRecord) -> dict[str, Tensor]:
        """The update of each edited parameter (detached, same shape and dtype as the parameter)."""

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tokenizer, record: EditRecord) -> Iterator[EditInfo]:
        start = time.perf_counter()
        deltas = self.deltas(model, tokenizer, record)
        info = EditInfo(details={"n_weights": len(deltas)})
        with applied(model, deltas):
            info.seconds = time.perf_counter() - start
            yield info


class FittedWeightEditor(WeightEditor):
    """A weight editor that optimises per edit: ``fit`` returns ``(deltas, details)``, and the
    details (steps used, final loss, ...) travel in the :class:`EditInfo` (chapter 5)."""

    def fit(self, model: nn.Module, tokenizer, record: EditRecord) -> tuple[dict[str, Tensor], dict]:
        raise NotImplementedError

    def deltas(self, model: nn.Module, tokenizer, record: EditRecord) -> dict[str, Tensor]:
        return self.fit(model, tokenizer, record)[0]

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tokenizer, record: EditRecord) -> Iterator[EditInfo]:
        start = time.perf_counter()
        deltas, details = self.fit(model, tokenizer, record)
        info = EditInfo(details={"n_weights": len(deltas), **details})
        with applied(model, deltas):
            info.seconds = time.perf_counter() - start
            yield info


class MendMethod(WeightEditor):
    """A trained MEND (or KE) editor as a method: single-task, multi-task or InstructEdit.

    ``editor`` is anything with ``compute_deltas(model, batch, meta_grad=False)``: a
    :class:`~instructedit_lite.editors.mend.MendEditor` or a :class:`~instructedit_lite.editors.ke.KEEditor`.
    """

    def __init__(self, editor: MendEditor, name: str, *, instructions: InstructionSet | None = None,
                 unseen: bool = False, n_responses: int = 2):
        self.editor, self.name, self.instructions, self.unseen = editor, name, instructions, unseen
        self.n_responses = n_responses

    def edits_at(self, model: nn.Module) -> list[str]:
        return list(self.editor.infos)

    def deltas(self, model: nn.Module, tokenizer, record: EditRecord) -> dict[str, Tensor]:
        self.editor.eval()  # no dropout, running statistics frozen
        device = next(model.parameters()).device
        with torch.no_grad():
            batch = edit_batch(tokenizer, record, device, self.n_responses, unlikelihood=True)
            if isinstance(model, PrefixEngine):  # vocabulary logits only where a label is scored
                batch = scored_batch(batch)
            deltas = self.editor.compute_deltas(model, batch, meta_grad=False)
        return {k: v.detach() for k, v in deltas.items()}


class Unedited(Editor):
    """The base model itself: no edit.  The reference row of every table."""

    name = "base model"

    @contextlib.contextmanager
    def edited(self, model: nn.Module, tokenizer, record: EditRecord) -> Iterator[EditInfo]:
        yield EditInfo()


class PerTaskMethod(Editor):
    """One editor per task, chosen by the record's task: the single-task MEND row of Table 3."""

    def __init__(self, by_task: Mapping[str, Editor], name: str = "MEND (single-task)"):
        self.by_task, self.name = dict(by_task), name

    def prepare(self, record: EditRecord) -> EditRecord:
        return self._for(record).prepare(record)

    def _for(self, record: EditRecord) -> Editor:
        if record.task not in self.by_task:
            raise ValueError(f"{self.name}: no editor for task {record.task!r} (has {sorted(self.by_task)})")
        return self.by_task[record.task]

    def edited(self, model: nn.Module, tokenizer, record: EditRecord) -> contextlib.AbstractContextManager[EditInfo]:
        return self._for(record).edited(model, tokenizer, record)

    def edits_at(self, model: nn.Module) -> list[str]:
        return sorted({name for editor in self.by_task.values() for name in editor.edits_at(model)})


def check_restored(model: nn.Module, before: Mapping[str, Tensor]) -> None:
    """Raise if any parameter differs from ``before`` (a ``{name: clone}`` snapshot)."""
    for name, p in model.named_parameters():
        if not torch.equal(p.detach(), before[name]):
            raise AssertionError(f"parameter {name} was not restored after the edit")
