"""What a meta-training run depends on: :class:`TrainConfig`, the book's defaults, the paper's settings (chapter 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from ..architectures import profile_named
from ..config import Config
from ..ke import KEConfig
from ..mend import MendConfig
from ..tasks import task_names, trainable_tasks

__all__ = ["TrainConfig", "default_config", "paper_config", "PAPER_CONFIGS", "REGIMES", "EDIT_LOSS_INPUTS",
           "MIXINGS", "METHODS", "TRAIN_VERSION"]

TRAIN_VERSION = 5  # 3: ConvSent edits add the unlikelihood rows; locality rows of both sentiments
# 4: fused Adam, one network call per shared group (the same training up to rounding, but rounding
#    compounds over hundreds of steps: every editor trains again rather than reuse an old one)
# 5: the untrained editor (step 0) is no longer a candidate for the kept checkpoint
CHECKPOINT_FORMAT = 1
REGIMES = ("single", "multi", "instruct")
EDIT_LOSS_INPUTS = ("edit", "rephrase")
MIXINGS = ("proportional", "uniform")
METHODS = ("mend", "ke")
#: When MEND's running statistics take in an edit's rows: at once (``"per_edit"``, the reference's
#: behaviour in one process) or together at the optimiser step (``"per_step"``: what several
#: processes can do identically, see :mod:`~instructedit_lite.train.processes`).
STATISTICS = ("per_edit", "per_step")
#: Fields of :class:`TrainConfig` that change how a run is carried out, never what it produces.
_NOT_IN_KEY = ("checkpoint_every",)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(Config):
    """Everything a meta-training run depends on.

    ``steps`` counts edits (meta-training iterations, one record each); the optimisers step every
    ``grad_accum`` edits.  ``lr`` is the editor networks' Adam rate, ``alpha_lr`` that of the step
    sizes α.  ``mixing``: ``"proportional"`` samples tasks in proportion to their (capped)
    training-split sizes, unbalanced as in the paper; ``"uniform"`` balances them; ``task_weights``
    (task → weight) overrides both.  ``task_caps`` (task → n) keeps only ``n`` training records of
    a task (a fixed seeded subset), e.g. to reproduce the paper's balanced ConvSent.
    ``edit_loss_input``: ``"edit"`` (default, EasyEdit's InstructEdit) computes ``L_e`` on the
    edit input itself, ``"rephrase"`` (original MEND) on a rephrase of it.
    ``n_responses``: ConvSent responses per sentiment in one edit (and per locality topic).
    ``max_locality``: locality rows per fact record.  ``val_every``: edits between validations;
    ``n_val``: validation records per task (the first ``n_val`` of the val split).
    ``instruction_seed``: the seed of the (seen) instruction choice per record.
    ``checkpoint_every``: edits between checkpoints (not part of :meth:`~instructedit_lite.config.Config.key`).
    ``statistics``: when MEND's running normalisation takes in an edit's rows (``STATISTICS``;
    ``"per_step"`` is needed to train on several processes, and is in the key only when set).
    """

    regime: str = "instruct"
    tasks: tuple[str, ...] = field(default_factory=trainable_tasks)
    steps: int = 3000
    grad_accum: int = 2
    lr: float = 1e-4
    alpha_lr: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    edit_loss_input: str = "edit"
    clip: float = 100.0
    mixing: str = "proportional"
    task_weights: dict[str, float] | None = None
    task_caps: dict[str, int] | None = None
    n_responses: int = 4
    max_locality: int = 4
    val_every: int = 500
    n_val: int = 32
    seed: int = 0
    instruction_seed: int = 0
    checkpoint_every: int = 500
    mend: MendConfig = field(default_factory=MendConfig)
    #: ``"mend"`` (MEND, InstructEdit) or ``"ke"`` (KnowledgeEditor, trained with the same loop).
    method: str = "mend"
    #: KE's hyper-parameters (a :class:`~instructedit_lite.ke.KEConfig`, kept as its fields other than
    #: ``weight_names``/``alpha_init``, which come from ``mend``; see :meth:`ke_config`); ``method="ke"`` only.
    ke: Any = None
    statistics: str = "per_edit"

    def __post_init__(self) -> None:
        if isinstance(self.mend, Mapping):
            self.mend = MendConfig.from_dict(self.mend)
        self.tasks = tuple(self.tasks)
        if self.regime not in REGIMES:
            raise ValueError(f"TrainConfig.regime must be one of {REGIMES}, got {self.regime!r}")
        if not self.tasks:
            raise ValueError("TrainConfig.tasks: at least one training task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"TrainConfig.tasks has duplicates: {self.tasks}")
        for task in self.tasks:
            if task not in trainable_tasks():
                why = "it is a held-out task with no training split" if task in task_names() else "unknown task"
                raise ValueError(f"TrainConfig.tasks: {task!r} cannot be trained on ({why}); "
                                 f"choose from {trainable_tasks()}")
        if self.regime == "single" and len(self.tasks) != 1:
            raise ValueError(f"regime 'single' trains on exactly one task, got {self.tasks}")
        if self.edit_loss_input not in EDIT_LOSS_INPUTS:
            raise ValueError(f"TrainConfig.edit_loss_input must be one of {EDIT_LOSS_INPUTS}, got {self.edit_loss_input!r}")
        if self.method not in METHODS:
            raise ValueError(f"TrainConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.ke is not None and self.method != "ke":
            raise ValueError("TrainConfig.ke is set but method is not 'ke'")
        if self.ke is not None:
            if isinstance(self.ke, KEConfig):  # stored as its own settings; weights and α come from ``mend``
                self.ke = {k: v for k, v in self.ke.to_dict().items() if k not in ("weight_names", "alpha_init")}
            self.ke = dict(self.ke)
            KEConfig.from_dict(self.ke)  # unknown or bad KE settings fail here, not in training
        if self.statistics not in STATISTICS:
            raise ValueError(f"TrainConfig.statistics must be one of {STATISTICS}, got {self.statistics!r}")
        if self.statistics == "per_step" and self.checkpoint_every % self.grad_accum:
            raise ValueError(f"TrainConfig.checkpoint_every ({self.checkpoint_every}) must be a multiple of "
                             f"grad_accum ({self.grad_accum}) with statistics='per_step': a checkpoint "
                             "falls between optimiser steps")
        if self.mixing not in MIXINGS:
            raise ValueError(f"TrainConfig.mixing must be one of {MIXINGS}, got {self.mixing!r}")
        for name in ("steps", "grad_accum", "val_every", "n_val", "checkpoint_every", "n_responses", "max_locality"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("task_weights", "task_caps"):
            value = getattr(self, name)
            if value is None:
                continue
            value = dict(value)
            extra = set(value) - set(self.tasks)
            if extra:
                raise ValueError(f"TrainConfig.{name} names tasks that are not trained: {sorted(extra)}")
            if any(v <= 0 for v in value.values()):
                raise ValueError(f"TrainConfig.{name} must be positive, got {value}")
            setattr(self, name, value)
        if self.task_weights is not None and set(self.task_weights) != set(self.tasks):
            raise ValueError(f"TrainConfig.task_weights must give a weight to every task {self.tasks}")

    @property
    def instructed(self) -> bool:
        return self.regime == "instruct"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["mend"] = self.mend.to_dict()
        return out

    @classmethod
    def nested(cls) -> dict[str, type]:
        return {"mend": MendConfig}

    def ke_config(self):
        """KE's full :class:`~instructedit_lite.ke.KEConfig` (edited weights and α from ``mend``)."""
        return KEConfig.from_dict({"weight_names": self.mend.weight_names, "alpha_init": self.mend.alpha_init,
                                   **(self.ke or {})})

    def key_data(self) -> dict[str, Any]:
        """Everything that changes the trained editor (cache key), with the version of the training code."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_KEY}
        if data["statistics"] == "per_edit":  # the default predates the field: keep the caches valid
            del data["statistics"]
        if data["method"] == "mend":  # MEND keys predate the method field: keep their caches valid
            del data["method"], data["ke"]
        return {"version": TRAIN_VERSION, **data}


def paper_config(profile: str = "gpt2", depth: int = 48, **changes) -> TrainConfig:
    """The paper's (and EasyEdit's) InstructEdit settings for a model of ``profile``
    (:mod:`~instructedit_lite.architectures`: ``"gpt2"``, ``"llama"``) with ``depth`` blocks: MEND
    on the MLP matrices of the last three blocks, rank 1920.  Validation settings are this
    project's (the reference validates on training records).  Keyword arguments override fields."""
    weights = profile_named(profile).edited_weights(depth)
    values = dict(regime="instruct", tasks=trainable_tasks(), steps=30_000, grad_accum=2, lr=1e-6, alpha_lr=1e-4,
                  c_edit=0.1, c_loc=1.0, edit_loss_input="edit", clip=100.0, mixing="proportional",
                  val_every=5_000, n_val=100, checkpoint_every=5_000,
                  mend=MendConfig(rank=1920, n_blocks=2, alpha_init=1e-4, weight_names=weights))
    values.update(changes)
    return TrainConfig(**values)


#: The paper's two editors.  Not runnable on the embedded model (the weight names are those of the
#: real models); use them with ``load_hf_model``.  The LLaMA editor was trained without ConvSent.
PAPER_CONFIGS: dict[str, TrainConfig] = {
    "gpt2-xl": paper_config("gpt2", 48),
    "llama-2-7b": paper_config("llama", 32, tasks=("counterfact", "wikirecent"), steps=100_000),
}

#: Hyper-parameters for the embedded base model (4 blocks of width 128, ~1M parameters), chosen by
#: measurement on this project's world (1 CPU thread; see docs/measurements.md).
_SCALE_DEFAULTS = dict(grad_accum=2, lr=1e-4, alpha_lr=1e-4, c_edit=0.1, c_loc=1.0, clip=100.0,
                       edit_loss_input="edit", n_responses=2, val_every=400, n_val=20, checkpoint_every=400)
_DEFAULT_STEPS = 2000
_DEFAULT_RANK = 64
_SMOKE = dict(steps=40, val_every=20, n_val=6, checkpoint_every=20)


def default_config(regime: str = "instruct", tasks: Sequence[str] | str | None = None, *,
                   smoke: bool = False, **changes) -> TrainConfig:
    """A configuration that trains well on the embedded world in a few minutes on a laptop CPU.

    ``tasks`` defaults to the three training tasks (``"single"`` needs exactly one).  ``smoke``
    trains for a few dozen edits only (fast notebook tests; enough for a single-task editor to
    move, not to plateau).  Further keyword arguments override fields.

    The values were chosen by measurement on the embedded world (learning rates, length, ConvSent
    responses, loss weights); the measurements are in docs/measurements.md.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    if tasks is None:
        if regime == "single":
            raise ValueError("default_config: regime 'single' needs its one task, e.g. tasks=('counterfact',)")
        tasks = trainable_tasks()
    # A single-task editor plateaus after 500-750 edits of its task; 1,000 is enough and halves its cost.
    steps = _DEFAULT_STEPS // 2 if regime == "single" else _DEFAULT_STEPS
    values = dict(_SCALE_DEFAULTS, steps=steps, mend=MendConfig(rank=_DEFAULT_RANK))
    if smoke:
        values.update(_SMOKE)
    values.update(changes)
    return TrainConfig(regime=regime, tasks=tuple(tasks), **values)

