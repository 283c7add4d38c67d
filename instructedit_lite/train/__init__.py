"""Meta-training of a MEND editor: single-task MEND, multi-task MEND and InstructEdit.

The three regimes of the paper run through one code path and differ only in their configuration:

* ``"single"``: one task, no instructions (single-task MEND);
* ``"multi"``: several tasks, no instructions (the paper's multi-task MEND baseline);
* ``"instruct"``: several tasks, every edit input prefixed with its task instruction (InstructEdit).

One meta-training step takes one edit record (batch of one edit, as in the paper):

1. ``pre``: logits of the unedited model on the record's locality rows (``prompt + " " + answer``,
   never instruction-prefixed), under ``torch.no_grad``.
2. The edit rows (``prompt + " " + target_new``, instruction-prefixed in ``"instruct"``) go through
   :meth:`~instructedit_lite.editors.mend.MendEditor.compute_deltas`, which gives ``ΔW`` on the autograd graph of the editor.
3. ``L_e``: token-mean NLL of the target under the edited model (:func:`~instructedit_lite.editors.mend.functional_forward`), on
   the edit input (default, as in EasyEdit's InstructEdit) or on a rephrase (original MEND).
   ConvSent: NLL of responses of the wanted sentiment plus the unlikelihood ``−mean log(1 − p)``
   of the tokens of responses of the other sentiment; the instruction prefix is kept.
4. ``L_loc``: token-mean ``KL(pre ‖ post)`` over the locality answer positions only.
5. ``L = c_edit·L_e + c_loc·L_loc``; gradients are accumulated over ``grad_accum`` edits; an
   optimiser step whose gradients are not finite is skipped (and counted); the gradient norm is
   clipped; one Adam steps the editor's networks, a second one the step sizes ``α``.

The base model is frozen throughout (its ``requires_grad`` flags are switched off and restored).
Validation runs on a fixed subset of the *val* split, disjoint from training, and the editor with
the lowest validation loss is kept.  Checkpoints hold everything needed to resume bit for bit
(editor with its running statistics, both optimisers, accumulated gradients, step, RNG states,
curves, best-so-far); :func:`train` resumes from the checkpoint in its output folder.
:func:`train_editor` caches finished editors under :func:`~instructedit_lite.paths.cache_dir`.

One idea per file: ``config.py`` (the settings), ``examples.py`` (records → rows, the task mix
and schedule), ``losses.py``, ``validation.py``, ``loop.py`` (training, checkpoints, resume) and
``cache.py`` (the editor cache, editors trained side by side).
"""


from ..tasks import trainable_tasks as _trainable_tasks
from .cache import (LEARNING_MARGIN, TrainedEditor, editor_dir, learning_problem, load_trained_editor, train_editor,
                    train_editors)
from .config import (EDIT_LOSS_INPUTS, METHODS, MIXINGS, PAPER_CONFIGS, REGIMES, TRAIN_VERSION, TrainConfig,
                     default_config, paper_config)
from .examples import EditExample, build_example, records_for, schedule, task_probabilities
from .loop import CHECKPOINT, CHECKPOINT_FORMAT, TrainResult, load_editor, make_editor, train
from .losses import edit_loss, locality_kl, meta_losses, unlikelihood_loss
from .validation import validate

__all__ = [
    "REGIMES", "EDIT_LOSS_INPUTS", "MIXINGS", "TRAINABLE_TASKS", "TrainConfig", "PAPER_CONFIGS", "default_config",
    "paper_config", "EditExample", "build_example", "locality_kl", "unlikelihood_loss", "edit_loss",
    "meta_losses", "schedule", "task_probabilities", "records_for", "validate", "TrainResult", "train", "TrainedEditor",
    "train_editor", "editor_dir", "load_trained_editor", "make_editor", "load_editor", "METHODS", "train_editors",
    "learning_problem", "LEARNING_MARGIN",
]


def __getattr__(name: str):
    # ``TRAINABLE_TASKS`` is read from the task registry on every access (PEP 562).
    if name == "TRAINABLE_TASKS":
        return _trainable_tasks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
