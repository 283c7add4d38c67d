"""MEND (Mitchell et al., ICLR 2022): the gradient editor that InstructEdit trains.

MEND never sees text.  It sees, for each edited weight matrix ``W`` of the language model, the two
factors of the fine-tuning gradient of one edit, and learns to turn them into a better update:

1. **Capture.**  For a linear map with layer input ``u_t`` and output gradient ``δ_t`` at token
   ``t`` the weight gradient is a sum of rank-one terms, ``∇W = Σ_t δ_t u_tᵀ`` (``Σ_t u_t δ_tᵀ``
   in the ``(d_in, d_out)`` layout of GPT-2's ``Conv1D``).  A forward hook records ``u``; a hook on
   the layer's output tensor records ``δ``.  Both are detached: MEND is first order.
2. **Normalise.**  ``û = (u − μ_u) / (σ_u + 1e-7)`` and ``δ̂`` likewise, with per-coordinate running
   statistics (Welford) of every row seen in training mode.
3. **Transform.**  ``z = [û; δ̂]`` goes through residual low-rank blocks
   ``h ← h + clamp(s_m ⊙ (U V h + b) + o_m, min=0)``, ``m`` the layer's index in its shape group.
4. **Update.**  ``∇̃W = Σ_t δ̃_t ũ_tᵀ`` and ``W' = W + α_W ∇̃W`` with one learned scalar ``α_W``
   per matrix.

The edited model is *functional*: :meth:`MendEditor.edited_params` returns ``W + ΔW`` as tensors on
the autograd graph and :func:`~instructedit_lite.editors.mend.functional_forward` runs the model with them
(``torch.func.functional_call``), so a post-edit loss sends meta-gradients into the editor and the
step sizes.  For evaluation, :func:`~instructedit_lite.editors.mend.applied` writes the (detached) update into the weights and
restores the exact original weights afterwards.

Choices where the reference implementation (``eric-mitchell/mend``, EasyEdit's copy) is not
followed, each a fix of a known pitfall:

* the normaliser keeps all its state in buffers (the reference keeps a ``norm_init`` flag outside
  the state dict, so its statistics restart from one row when training resumes);
* :meth:`MendEditor.alpha_parameters` and :meth:`MendEditor.network_parameters` are disjoint (the
  reference puts ``α`` in both optimisers, so it gets two Adam updates per step);
* the nonlinearity is ``clamp(min=0)`` as in the reference, never ``relu``: every pre-activation
  is exactly 0 at initialisation and relu's gradient there is 0, so the editor would never move.
"""

from .editor import (FORMAT_VERSION, EditFactors, MendEditor, _key, capture_factors, keep_nonzero_rows,
                     time_edit_vs_forward_backward)
from .networks import MODES, BlockStack, GradientTransform, LowRankBlock, MendConfig, RunningNorm
from .weights import (IGNORE_INDEX, Conv1D, WeightInfo, applied, default_weight_names, edit_loss, functional_forward,
                      lm_loss, only_these_require_grad, unlikelihood_loss, weight_info)

__all__ = ["FORMAT_VERSION", "MODES", "IGNORE_INDEX", "lm_loss", "edit_loss", "unlikelihood_loss", "MendConfig", "WeightInfo", "weight_info",
           "default_weight_names", "RunningNorm", "LowRankBlock", "BlockStack", "GradientTransform", "EditFactors",
           "only_these_require_grad", "capture_factors", "keep_nonzero_rows", "MendEditor", "functional_forward",
           "applied", "time_edit_vs_forward_backward"]
