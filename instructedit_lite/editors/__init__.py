"""Every editing method of the book, one module each, behind one interface (chapter 5).

* ``base.py``: the interface (:class:`Editor`: ``prepare`` a record,
  edit the model inside ``with editor.edited(...)``, restore it exactly on exit), the weight
  editors' base classes, MEND as a method (:class:`MendMethod`, InstructEdit with instructions),
  the per-task and unedited methods;
* :mod:`~instructedit_lite.editors.mend`: the MEND hypernetwork (chapter 3);
  :mod:`~instructedit_lite.editors.ke`: KE (Knowledge Editor);
* ``finetune.py``: FT-L and FT-M; ``grace.py``: GRACE; ``calinet.py``: CaliNet (``common.py``: what
  they share); :mod:`~instructedit_lite.editors.baselines` makes one by name and places it on a
  model;
* :mod:`~instructedit_lite.editors.ike`: IKE, in-context editing (no weight changes);
  :mod:`~instructedit_lite.editors.unlikelihood`: forgetting by unlikelihood fine-tuning (chapter 9).

Each is registered once, by name, in :mod:`~instructedit_lite.methods`.
"""

from .base import (EditInfo, Editor, FittedWeightEditor, MendMethod, PerTaskMethod, Unedited, WeightEditor,
                   check_restored, edit_batch, edit_rows, flagged_batch, unlikely_rows)

__all__ = ["Editor", "WeightEditor", "FittedWeightEditor", "MendMethod", "PerTaskMethod", "EditInfo", "edit_rows",
           "unlikely_rows", "edit_batch", "flagged_batch", "Unedited", "check_restored"]
