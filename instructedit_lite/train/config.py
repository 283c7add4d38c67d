"""What a meta-training run depends on: :class:`TrainConfig`, the book's defaults, the paper's settings (chapter 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from .. import smollm2
from ..architectures import profile_named
from ..config import Config
from ..editors.ke import KEConfig
from ..editors.mend import MendConfig
from ..tasks import task_names, trainable_tasks

__all__ = ["TrainConfig", "default_config", "paper_config", "PAPER_CONFIGS", "REGIMES", "EDIT_LOSS_INPUTS",
           "MIXINGS", "METHODS", "TRAIN_VERSION", "SETTINGS", "SIZES"]

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
    ``patience``: stop early after that many validations in a row without a lower validation
    loss than the kept editor's (0, the default: run all ``steps``; in the key only when set).
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
    #: KE's hyper-parameters (a :class:`~instructedit_lite.editors.ke.KEConfig`, kept as its fields other than
    #: ``weight_names``/``alpha_init``, which come from ``mend``; see :meth:`ke_config`); ``method="ke"`` only.
    ke: Any = None
    statistics: str = "per_edit"
    patience: int = 0

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
        if self.patience < 0:
            raise ValueError(f"TrainConfig.patience must be >= 0 (0: no early stopping), got {self.patience!r}")
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
        """KE's full :class:`~instructedit_lite.editors.ke.KEConfig` (edited weights and α from ``mend``)."""
        return KEConfig.from_dict({"weight_names": self.mend.weight_names, "alpha_init": self.mend.alpha_init,
                                   **(self.ke or {})})

    def key_data(self) -> dict[str, Any]:
        """Everything that changes the trained editor (cache key), with the version of the training code."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_KEY}
        if data["statistics"] == "per_edit":  # the default predates the field: keep the caches valid
            del data["statistics"]
        if not data["patience"]:  # likewise
            del data["patience"]
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

#: The settings of each scale (:attr:`~instructedit_lite.base_model.BaseModel.scale`), chosen by
#: measurement (docs/measurements.md).  Both keep the paper's ``c_edit = 0.1``, ``c_loc = 1``,
#: accumulation 2 and clipping at 100, and learn at 1e-4 (measured on the embedded world; the
#: paper's 1e-6 moves nothing in a few thousand edits).  The embedded model (4 blocks of width 128,
#: about 1M parameters, one CPU thread) edits its own default weights.  A real model edits the
#: paper's weights (gate, up and down projections of the last three blocks, from its profile) with
#: uniform task mixing, so that a few hundred edits are shared evenly, and 2 locality rows per fact
#: for cheaper steps.  Rank 64 on both: on SmolLM2 measured against 256 and 1,920 after the same 120
#: edits (64 reaches the lowest validation loss, 256 trades locality for reliability, 1,920 diverges
#: at this rate); 64 is 3% of SmolLM2's networks' width (``combine``: d_in + d_out = 576 + 1,536 =
#: 2,112), where the reference's 1,920 on GPT2-XL is 24% of 8,000 (1,600 + 6,400).
SETTINGS: dict[str, dict[str, Any]] = {
    "embedded": dict(grad_accum=2, lr=1e-4, alpha_lr=1e-4, c_edit=0.1, c_loc=1.0, clip=100.0, edit_loss_input="edit",
                     n_responses=2),
    "real": dict(grad_accum=2, lr=1e-4, alpha_lr=1e-4, c_edit=0.1, c_loc=1.0, clip=100.0, edit_loss_input="edit",
                 n_responses=2, max_locality=2, mixing="uniform"),
}
#: Edits, validation interval, validation records per task and early-stopping patience
#: (validations without a lower loss; 0: none) by scale and size; checkpoints at each validation.
#: Embedded: a single-task editor plateaus after 500-750 edits of its task, so it makes half as
#: many (1,000) at the default and full sizes; ``"smoke"`` trains a few dozen edits (fast notebook
#: tests: enough for a single-task editor to move, not to plateau).  Real: ``"default"`` fits
#: chapter 7's budget on two cores (step costs measured in chapter 7, through the engine about a
#: third of a plain step), ``"full"`` ten times as many, ``"smoke"`` one update of the editor.
#: ``"verify"`` (the verification run, :mod:`~instructedit_lite.verify`): until validation on 50
#: records per task stops improving, within a cap.
SIZES: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "embedded": {"smoke": (40, 20, 6, 0), "default": (2000, 400, 20, 0), "full": (2000, 400, 20, 0),
                 "verify": (2500, 500, 50, 2)},
    "real": {"smoke": (2, 2, 1, 0), "default": (120, 40, 6, 0), "full": (1200, 200, 24, 0),
             "verify": (1200, 200, 50, 2)},
}
_RANK = 64
#: KE's step sizes act on raw (unnormalised) gradients, which on SmolLM2 want |α| of a few 1e-2: at
#: the MEND rate of 1e-4 per optimiser step they had moved only to about 4e-3 after 120 edits, and
#: validation reliability from 0.19 to 0.23; at 1e-3 it reaches 0.45 (seed 1, 120 edits;
#: docs/measurements.md).
_KE_ALPHA_LR = {"real": 1e-3}
#: The real scale's weights when a configuration is asked for by name, without a loaded model.
_NAMED_MODELS = {"smollm2": ("llama", smollm2.DEPTH)}


def default_config(regime: str = "instruct", tasks: Sequence[str] | str | None = None, *,
                   smoke: bool = False, size: str | None = None, model: Any = "embedded", **changes) -> TrainConfig:
    """The book's editor configuration for ``model`` (``"embedded"``, ``"smollm2"`` or a loaded
    :class:`~instructedit_lite.base_model.BaseModel`) at ``size`` (``"smoke"``, ``"default"``,
    ``"full"`` or ``"verify"``; ``smoke=True`` is ``size="smoke"``), from the tables ``SETTINGS``
    and ``SIZES`` of ``train/config.py``.

    ``tasks`` defaults to the training tasks (``"single"`` needs exactly one).  A real-scale model
    edits the MLP matrices of its last three blocks.  Further keyword arguments override fields.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    if tasks is None:
        if regime == "single":
            raise ValueError("default_config: regime 'single' needs its one task, e.g. tasks=('counterfact',)")
        tasks = trainable_tasks()
    size = size or ("smoke" if smoke else "default")
    if isinstance(model, str):
        if model != "embedded" and model not in _NAMED_MODELS:
            raise ValueError(f"default_config: model must be 'embedded', one of {sorted(_NAMED_MODELS)} "
                             f"or a loaded BaseModel, got {model!r}")
        scale = "embedded" if model == "embedded" else "real"
        weights = None if scale == "embedded" else profile_named(_NAMED_MODELS[model][0]).edited_weights(
            _NAMED_MODELS[model][1])
    else:
        scale, weights = model.scale, (None if model.scale == "embedded" else model.weight_names())
    if size not in SIZES[scale]:
        raise ValueError(f"default_config: size must be one of {sorted(SIZES[scale])}, got {size!r}")
    steps, val_every, n_val, patience = SIZES[scale][size]
    if scale == "embedded" and regime == "single" and size in ("default", "full"):
        steps //= 2
    mend = MendConfig(rank=_RANK) if weights is None else MendConfig(rank=_RANK, weight_names=weights)
    values = dict(SETTINGS[scale], steps=steps, val_every=val_every, n_val=n_val, checkpoint_every=val_every,
                  patience=patience, mend=mend)
    if changes.get("method") == "ke" and scale in _KE_ALPHA_LR:
        values["alpha_lr"] = _KE_ALPHA_LR[scale]
    values.update(changes)
    return TrainConfig(regime=regime, tasks=tuple(tasks), **values)
