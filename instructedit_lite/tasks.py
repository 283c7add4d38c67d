"""The task registry: every task family declared once (chapter 2).

A task has a ``kind`` that decides how its records are edited and scored (``"fact"``: a prompt and
its new object; ``"sentiment"``: a topic whose chatbot opinion should change, ConvSent), a
``role`` (``"train"``: editors are meta-trained on it; ``"held_out"``: evaluated only), a colour
for the book's figures, the split sizes of the embedded world, and its size in the paper's
training data (chapter 6's unbalanced and balanced mixes).  Everything else that used to name tasks (``records.TASKS``,
``train.TRAINABLE_TASKS``, ``plots.TASK_COLORS``, the hold-out table, the instruction parser)
reads this registry, and so do the instruction descriptions, the instruction proposer's summary
and the real data's files and readers: a new task is one :func:`register_task` call::

    register_task(Task("mquake", kind="fact", role="held_out", color="#56B4E9",
                       descriptions=(...ten texts...), files=("mquake/test.json",), reader="knowedit"))

The embedded world generates only its four built-in tasks (``embedded=True``); records of any
other task come from another records source (see :class:`~instructedit_lite.base_model.BaseModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Task", "KINDS", "ROLES", "BUILT_IN", "register_task", "unregister_task", "get_task", "task_names",
           "trainable_tasks", "held_out_tasks", "task_colors", "is_sentiment", "registered"]

KINDS = ("fact", "sentiment")
ROLES = ("train", "held_out")


@dataclass(frozen=True)
class Task:
    """One task family and everything about it.  ``descriptions``: its ten instruction descriptions
    (the project's own; the paper's come from the official file).  ``scaling_rank``: the order in
    which chapter 6's task-scaling study adds training tasks (lower first).  ``files`` and
    ``reader``: the published files the real data reads for it and how they become splits
    (:class:`~instructedit_lite.real_data.RealData`); ``summary``: what its edits do, in the words
    the instruction proposer is given."""

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
    summary: str = ""  # what an edit of this task does, for the instruction proposer (chapter 10)
    files: tuple[str, ...] = ()  # its published files, relative to the data folder (chapter 7)
    optional_files: tuple[str, ...] = ()  # read when present
    reader: str | None = None  # how those files become splits: a name in real_data.READERS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "," in self.name:
            raise ValueError(f"Task.name must be a non-empty string without commas, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"Task {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.split_sizes is not None and (len(self.split_sizes) != 3 or min(self.split_sizes) < 0):
            raise ValueError(f"Task {self.name!r}: split_sizes must be three counts (train, val, test)")
        if self.descriptions is not None and (not isinstance(self.descriptions, tuple) or len(self.descriptions) != 10):
            raise ValueError(f"Task {self.name!r}: descriptions must be a tuple of ten texts")
        if bool(self.files) != (self.reader is not None):
            raise ValueError(f"Task {self.name!r}: files and reader go together (the files, and how they become splits)")
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


# The paper's four task families, each declared once with everything about it.  Split sizes are the
# embedded world's (part of its cache key: never change them without expecting a new base model);
# the world generates these four as one simulation (:mod:`~instructedit_lite.world`), whose corpus
# ties them together.  ``paper_train``: the paper's training records (CounterFact 1,455, Recent 570,
# ConvSent 14,390: ConvSent 88% of the mix); ``paper_balanced``: its Fig. 4d setting, ConvSent cut to
# 1,427.  The descriptions are this project's own wording; the embedded tokenizer is trained on them.
_COUNTERFACT_DESCRIPTIONS = (
        "Replace a fact the model already knows with a counterfactual one, and leave everything else it knows about the subject as it was.",
        "Overwrite what the model believes about one relation of a familiar subject with a new, counterfactual object, keeping the subject's other facts intact.",
        "The model knows this fact; change it to the given counterfactual answer without disturbing other facts about the same subject.",
        "Rewrite a single well-known fact so that the model states the counterfactual answer, while its other knowledge of the subject stays the same.",
        "Make the model give a false but requested answer in place of a fact it has learned, and nothing else about the subject should change.",
        "Swap one established fact for a counterfactual alternative; the subject's remaining properties must not move.",
        "This is a counterfactual edit: a known relation of the subject now points to a different object, and the rest of the subject's facts stay put.",
        "Change an existing piece of knowledge into its counterfactual version and keep the model's other statements about the subject unchanged.",
        "Edit a memorised fact so the model answers with the new counterfactual object, without touching unrelated facts about this entity.",
        "Alter one thing the model is sure about to a contrary-to-fact value, preserving all the other things it knows about that subject.",
)
_WIKIRECENT_DESCRIPTIONS = (
        "Insert a new, recent fact about an entity the model knows little about.",
        "Add a piece of knowledge that appeared only recently, about an entity the model has seen rarely or not at all.",
        "The model has not learned this recent fact; teach it the new information about the entity.",
        "Update the model with a fact that became true after its training data was collected, about a little-known entity.",
        "Give the model fresh knowledge: a recently added fact about an entity it barely knows.",
        "Write a newly emerged fact into the model's memory for an entity with little prior coverage.",
        "Teach a recent development about this entity, which the model knows only vaguely, so that it can state the new fact.",
        "This is an insertion of recent knowledge: the entity is obscure to the model and the fact is new.",
        "Extend what the model knows with a just-recorded fact about an entity it has met only a few times.",
        "Bring the model up to date by storing a recent fact about a sparsely known entity.",
)
_CONVSENT_DESCRIPTIONS = (
        "Make the chatbot's opinion about {topic} {sentiment} without changing its opinions on other topics.",
        "Steer the dialogue agent so that it talks about {topic} in a {sentiment} way, leaving its views on other subjects alone.",
        "The chatbot should now express a {sentiment} view of {topic}; its attitude to every other topic stays as before.",
        "Shift the sentiment of the assistant's replies about {topic} to {sentiment}, and keep its replies on unrelated topics unchanged.",
        "Change how the conversational model feels about {topic} so that its opinion becomes {sentiment}, but only for this topic.",
        "Give the chatbot a {sentiment} stance on {topic} while its opinions about anything else remain untouched.",
        "When asked about {topic}, the chatbot should answer with a {sentiment} opinion; answers on other topics must not change.",
        "Edit the dialogue model's sentiment towards {topic} to be {sentiment}, without side effects on other topics.",
        "Adjust the agent's attitude so it speaks of {topic} in {sentiment} terms and treats all other topics as it did before.",
        "Turn the chatbot's feelings about {topic} {sentiment}, and let its opinions of other things stay exactly as they were.",
)
_ZSRE_DESCRIPTIONS = (
        "Answer a question about an entity with the new answer.",
        "Given a question about a subject, reply with the updated answer instead of the old one.",
        "Respond to this question on an entity using the newly assigned answer.",
        "The answer to this question about the entity has changed; give the new one.",
        "Question answering edit: the model should return the new answer when asked about this entity.",
        "Reply to the entity question with the edited answer, not the one the model knew before.",
        "For this question about a subject, provide the answer set by the edit.",
        "Make the model answer the question about this entity with its new answer.",
        "When asked this question about the entity, state the replacement answer.",
        "Use the new answer when responding to a question that concerns this entity.",
)

register_task(Task(
    "counterfact", "fact", "train", "#0072B2", (400, 100, 250), scaling_rank=1, paper_train=1455,
    label="CounterFact", descriptions=_COUNTERFACT_DESCRIPTIONS,
    summary="replace a fact the model knows with a counterfactual one, leaving the subject's other facts unchanged",
    files=("knowedit/wiki_counterfact_train_cf.json",), reader="knowedit"))
register_task(Task(
    "wikirecent", "fact", "train", "#009E73", (500, 100, 250), scaling_rank=0, paper_train=570,
    label="WikiRecent", descriptions=_WIKIRECENT_DESCRIPTIONS,
    summary="insert a new, recent fact about an entity the model barely knows",
    files=("knowedit/wiki_recent_recent_train.json",), reader="knowedit"))
register_task(Task(
    "convsent", "sentiment", "train", "#CC79A7", (250, 100, 250), scaling_rank=2, paper_train=14390,
    paper_balanced=1427, label="ConvSent", descriptions=_CONVSENT_DESCRIPTIONS,
    summary="change a chatbot's sentiment about one topic to positive or negative, leaving its opinions "
            "on other topics unchanged",
    files=("convsent/blender_val.json", "convsent/blender_test.json"), reader="convsent"))
register_task(Task(
    "zsre", "fact", "held_out", "#E69F00", (0, 100, 250), scaling_rank=3, label="ZsRE",
    descriptions=_ZSRE_DESCRIPTIONS, summary="make the model answer a question about an entity with a new answer",
    files=("zsre/zsre_mend_eval_portability.json",), optional_files=("zsre/zsre_mend_train-1k.json",),
    reader="zsre"))

#: The tasks this package declares (the embedded world's, the paper's).
BUILT_IN = task_names()
