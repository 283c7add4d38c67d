"""The task registry: every task family declared once (chapter 2).

A task has a ``kind`` that decides how its records are edited and scored (``"fact"``: a prompt and
its new object; ``"sentiment"``: a topic whose chatbot opinion should change, ConvSent), a
``role`` (``"train"``: editors are meta-trained on it; ``"held_out"``: evaluated only), a colour
for the book's figures, the split sizes of the embedded world, and its size in the paper's
training data (chapter 6's unbalanced and balanced mixes).  Everything else that used to name tasks (``records.TASKS``,
``train.TRAINABLE_TASKS``, ``plots.TASK_COLORS``, the hold-out table, the instruction parser)
reads this registry, so a new task is one :func:`register_task` call::

    register_task(Task("mquake", kind="fact", role="held_out", color="#56B4E9"))

The embedded world generates only its four built-in tasks (``embedded=True``); records of any
other task come from another records source (see :class:`~instructedit_lite.base_model.BaseModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Task", "KINDS", "ROLES", "register_task", "unregister_task", "get_task", "task_names",
           "trainable_tasks", "held_out_tasks", "task_colors", "is_sentiment", "registered"]

KINDS = ("fact", "sentiment")
ROLES = ("train", "held_out")


@dataclass(frozen=True)
class Task:
    """One task family.  ``descriptions``: its ten instruction descriptions (optional; the built-in
    tasks keep theirs in :data:`~instructedit_lite.instructions.DESCRIPTIONS`).  ``scaling_rank``:
    the order in which chapter 6's task-scaling study adds training tasks (lower first)."""

    name: str
    kind: str = "fact"
    role: str = "train"
    color: str = "#777777"
    split_sizes: tuple[int, int, int] | None = None  # embedded world (train, val, test); None: not generated
    paper_train: int | None = None  # training records in the paper's multi-task data (chapter 6's mixes)
    paper_balanced: int | None = None  # ... in its balanced setting (Fig. 4d); None: as paper_train
    scaling_rank: int = 100
    descriptions: tuple[str, ...] | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "," in self.name:
            raise ValueError(f"Task.name must be a non-empty string without commas, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"Task {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.split_sizes is not None and (len(self.split_sizes) != 3 or min(self.split_sizes) < 0):
            raise ValueError(f"Task {self.name!r}: split_sizes must be three counts (train, val, test)")
        for name in ("paper_train", "paper_balanced"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"Task {self.name!r}: {name} must be a positive count or None, got {value!r}")

    @property
    def embedded(self) -> bool:
        """Whether the embedded world generates this task's records."""
        return self.split_sizes is not None

    @property
    def trainable(self) -> bool:
        return self.role == "train"


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry (``replace=True`` to redeclare an existing name)."""
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"register_task: a task named {task.name!r} exists; pass replace=True")
    _REGISTRY[task.name] = task
    return task


def unregister_task(name: str) -> None:
    """Remove a task (tests register and remove their own)."""
    _REGISTRY.pop(name, None)


def get_task(name: str) -> Task:
    """The registered task ``name``; a clear error naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {task_names()}") from None


def registered() -> tuple[Task, ...]:
    return tuple(_REGISTRY.values())


def task_names() -> tuple[str, ...]:
    """Every task, in registration order (training tasks of the paper first, ZsRE last)."""
    return tuple(_REGISTRY)


def trainable_tasks() -> tuple[str, ...]:
    """Tasks editors are meta-trained on (role ``"train"``)."""
    return tuple(t.name for t in _REGISTRY.values() if t.role == "train")


def held_out_tasks() -> tuple[str, ...]:
    """Tasks only evaluated, never trained on (role ``"held_out"``)."""
    return tuple(t.name for t in _REGISTRY.values() if t.role == "held_out")


def task_colors() -> dict[str, str]:
    return {t.name: t.color for t in _REGISTRY.values()}


def is_sentiment(task: str) -> bool:
    """Whether ``task`` edits a chatbot's sentiment (ConvSent-like records) rather than a fact."""
    return get_task(task).kind == "sentiment"


# The paper's four task families.  Split sizes are the embedded world's (part of its cache key:
# never change them without expecting a new base model).
# ``paper_train``: the paper's training records (CounterFact 1,455, Recent 570, ConvSent 14,390:
# ConvSent 88% of the mix); ``paper_balanced``: its Fig. 4d setting, ConvSent cut to 1,427.
register_task(Task("counterfact", "fact", "train", "#0072B2", (400, 100, 250), scaling_rank=1,
                   paper_train=1455, label="CounterFact"))
register_task(Task("wikirecent", "fact", "train", "#009E73", (500, 100, 250), scaling_rank=0,
                   paper_train=570, label="WikiRecent"))
register_task(Task("convsent", "sentiment", "train", "#CC79A7", (250, 100, 250), scaling_rank=2,
                   paper_train=14390, paper_balanced=1427, label="ConvSent"))
register_task(Task("zsre", "fact", "held_out", "#E69F00", (0, 100, 250), scaling_rank=3, label="ZsRE"))
