"""From records to the rows of each meta-training step, and which record comes at which step (chapter 4)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..instructions import InstructionSet, default_instructions, maybe_instruct
from ..records import EditRecord
from ..tasks import is_sentiment
from .config import TrainConfig

__all__ = ["Row", "EditExample", "build_example", "records_for", "task_probabilities", "schedule"]

Row = tuple[str, str]  # (prompt, target): the model reads prompt + " " + target


@dataclass(frozen=True)
class EditExample:
    """The text rows of one meta-training step.

    ``edit``: what the editor sees (its gradient), ``edit_unlikely``: rows whose unlikelihood
    joins the edit's pre-edit loss (ConvSent only: the other sentiment's responses, as in the
    reference trainer); ``loss``: rows of the likelihood term of ``L_e``; ``unlikely``: rows of
    its unlikelihood term (ConvSent only); ``locality``: rows of ``L_loc`` (never
    instruction-prefixed).  ``record`` is the (instructed) record.
    """

    task: str
    edit: tuple[Row, ...]
    loss: tuple[Row, ...]
    unlikely: tuple[Row, ...]
    locality: tuple[Row, ...]
    record: EditRecord
    edit_unlikely: tuple[Row, ...] = ()


def _pick(items: Sequence[str], n: int, rng: np.random.Generator | None, first: str | None = None) -> list[str]:
    """Up to ``n`` distinct items, ``first`` (if given) first; seeded choice, or in order without rng."""
    rest = [x for x in dict.fromkeys(items) if x != first]
    if rng is not None and len(rest) > 1:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    chosen = ([first] if first is not None else []) + rest
    return chosen[:n]


def build_example(record: EditRecord, config: TrainConfig, *, instructions: InstructionSet | None = None,
                  rng: np.random.Generator | None = None) -> EditExample:
    """The rows of one step for ``record``.

    In regime ``"instruct"`` the edit prompt and rephrases carry the record's (seen) instruction
    (``instructions`` defaults to :func:`~instructedit_lite.instructions.default_instructions`);
    locality rows never do.  ``rng`` picks the rephrase and the ConvSent responses; without it the
    choice is the first ones, in order (validation).
    """
    if config.instructed and instructions is None:
        instructions = default_instructions()
    rec = maybe_instruct(record, instructions if config.instructed else None, seed=config.instruction_seed)

    def loss_prompt() -> str:
        if config.edit_loss_input == "edit" or not rec.rephrase:
            return rec.prompt
        return rec.rephrase[int(rng.integers(len(rec.rephrase)))] if rng is not None else rec.rephrase[0]

    n = config.n_responses
    if is_sentiment(record.task):
        wanted = _pick(rec.wanted_responses, n, rng, first=rec.target_new)
        unwanted = _pick(rec.unwanted_responses, n, rng)
        question = loss_prompt()
        edit = tuple((rec.prompt, w) for w in wanted)
        edit_unlikely = tuple((rec.prompt, u) for u in unwanted)
        loss = tuple((question, w) for w in wanted)
        unlikely = tuple((question, u) for u in unwanted)
        # another topic's question with its responses, from the *uninstructed* record: the
        # probes list them alternating sentiments, so the first 2n are n of each (the reference
        # takes all of the other topic's responses of both sentiments).
        locality = tuple((p.prompt, a) for p in record.locality_probes for a in _pick(p.answers, 2 * n, None))
    else:
        edit = ((rec.prompt, rec.target_new),)
        loss = edit if config.edit_loss_input == "edit" else ((loss_prompt(), rec.target_new),)
        unlikely = edit_unlikely = ()
        locality = tuple((p.prompt, p.answer) for p in record.locality_probes[: config.max_locality])
    if not locality:
        raise ValueError(f"{record.source}, record {record.index}: no locality probe to compute L_loc with")
    return EditExample(record.task, edit, loss, unlikely, locality, rec, edit_unlikely)



def _capped(records: list[EditRecord], cap: int | None, task: str) -> list[EditRecord]:
    if cap is None or cap >= len(records):
        return list(records)
    rng = random.Random(f"task-cap/{task}")  # the same subset for every seed and regime
    keep = sorted(rng.sample(range(len(records)), cap))
    return [records[i] for i in keep]


def records_for(config: TrainConfig, source) -> tuple[dict[str, list[EditRecord]], dict[str, list[EditRecord]]]:
    """``(train, val)`` records per task from a records ``source`` (the embedded world, a
    BaseModel's source): the (capped) train split and the first ``n_val`` records of the *val* split."""
    world = source
    caps = config.task_caps or {}
    train = {t: _capped(world.records(t, "train"), caps.get(t), t) for t in config.tasks}
    val = {t: world.records(t, "val")[: config.n_val] for t in config.tasks}
    for t, recs in train.items():
        if not recs:
            raise ValueError(f"task {t!r} has no training records")
    return train, val


def task_probabilities(config: TrainConfig, sizes: Mapping[str, int]) -> dict[str, float]:
    """Sampling probability of each task: explicit weights, else proportional or uniform."""
    if config.task_weights is not None:
        weights = {t: float(config.task_weights[t]) for t in config.tasks}
    elif config.mixing == "uniform":
        weights = {t: 1.0 for t in config.tasks}
    else:
        weights = {t: float(sizes[t]) for t in config.tasks}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def schedule(config: TrainConfig, sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(task, record index)`` of every training step, a pure function of the config and sizes.

    Tasks are drawn with :func:`task_probabilities`; within a task the records come in shuffled
    epochs (each record once per epoch).  Being fixed up front, the order does not depend on
    where a run was interrupted.
    """
    rng = np.random.default_rng([config.seed, 1])
    probs = task_probabilities(config, sizes)
    tasks = list(config.tasks)
    picks = rng.choice(len(tasks), size=config.steps, p=[probs[t] for t in tasks])
    queues: dict[str, list[int]] = {t: [] for t in tasks}
    out = []
    for i in picks:
        task = tasks[int(i)]
        if not queues[task]:
            queues[task] = rng.permutation(sizes[task]).tolist()
        out.append((task, queues[task].pop()))
    return out

