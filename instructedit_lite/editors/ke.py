"""KnowledgeEditor (KE; De Cao, Aziz and Titov, EMNLP 2021) as ported to GPT models.

KE is a hypernetwork that reads the *text* of an edit and predicts, for every edited matrix ``W``
(``rows × cols`` in the parameter's own layout: ``(d_out, d_in)`` for ``nn.Linear``, ``(d_in,
d_out)`` for GPT-2's ``Conv1D``), a rank-one gate on the fine-tuning gradient plus a rank-one shift:

1. **Condition.**  The edit batch's tokens (``input_ids``: prompt + target rows; several rows for
   ConvSent) are embedded with the model's own input embedding matrix (frozen, detached), read by a
   bidirectional LSTM, mean-pooled over the real tokens of each row (``attention_mask``) and then
   over the rows, and projected: ``c = tanh(P · pool(BiLSTM(E[x])))``.
2. **Heads.**  Per edited matrix, ``h = tanh(H₁ c)`` and ``[a; γ_a; b; γ_b; η] = H₂ h`` with
   ``a, b ∈ R^rows``, ``γ_a, γ_b ∈ R^cols`` and a scalar ``η``.
3. **Update.**  ``ΔW = α_W · σ(η) · (softmax(a) γ_aᵀ ⊙ ∇W + softmax(b) γ_bᵀ)``, where ``∇W`` is the
   true gradient of the edit's loss (:func:`~instructedit_lite.editors.mend.edit_loss` on
   ``batch["labels"]``) w.r.t. ``W``, computed with only the edited weights requiring grad (the
   backward pass stops at the lowest edited layer) and detached.  Apply as ``W' = W + ΔW``.

:class:`KEEditor` has the interface of :class:`~instructedit_lite.editors.mend.MendEditor` that the
meta-training loop (:func:`instructedit_lite.train.train`) uses, so KE is trained with MEND's loss
(``c_e L_e + c_loc KL``), optimisers, accumulation and clipping, as in the GPT ports of KE
(EasyEdit, MEND's code base).

Choices, and where they depart from the original KE (``nicola-decao/KnowledgeEditor``):

* **Learned step size α_W (the one deviation in the update rule).**  The original multiplies by a
  fixed ``max_scale``; here ``α_W`` is one learned scalar per matrix, initialised to ``alpha_init``
  and trained by the second Adam, exactly MEND's device, so that both editors run under the
  identical loop and optimisers (``alpha_parameters`` / ``network_parameters``).
* **Identity initialisation.**  The last layer of every head is zero; its biases are ``a = 0``
  (softmax uniform, ``1/rows``), ``γ_a = 2·rows``, ``b = 0``, ``γ_b = 0``, ``η = 0``
  (``σ(0) = ½``), so the gate ``σ(η)·softmax(a)_i·γ_a,j`` is exactly 1 and the shift exactly 0:
  an untrained KE makes the step ``α_init·∇W``, as an untrained MEND does.  ``η = 0`` rather than a
  large bias keeps the sigmoid out of saturation.  As with MEND's ``U = 0``, the layers before the
  zero layer (``H₁``, ``P``, the LSTM) get a zero gradient on the very first optimiser step and
  non-zero ones from the second on.  The original's random (weight-normalised) initialisation has
  no such property, and weight normalisation is undefined for a zero matrix, so it is not used.
* **Condition.**  The original trains its own embedding (initialised from the model's) and reads
  the LSTM's final states; here the model's embedding stays frozen (the editor holds no copy of the
  vocabulary) and the LSTM states are mean-pooled over real tokens, which makes ``c`` independent
  of padding and of left/right padding.  Rows are pooled with equal weight.
* **No sharing.**  One head per edited matrix, as in the original (one conditioned parameter per
  matrix); there are only a handful of edited matrices.
* ``∇W`` and the update are computed in float32 and cast to the weight's dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from ..atomic import atomic_torch_save
from ..config import Config
from ..text import model_inputs as _model_inputs
from .mend import WeightInfo, _key, default_weight_names, edit_loss, only_these_require_grad, weight_info

__all__ = ["KEConfig", "KEEditor", "ConditionEncoder", "ConditionedWeight", "FORMAT", "FORMAT_VERSION"]

FORMAT = "instructedit_lite.ke"  # the file format's tag (the module's name when it was defined): never change it
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class KEConfig(Config):
    """Hyper-parameters of KE.

    ``lstm_hidden``: hidden size of the bidirectional LSTM, per direction.
    ``condition_dim``: size of the condition vector ``c``.
    ``head_hidden``: hidden size of each matrix's two-layer head.
    ``alpha_init``: initial per-matrix step size ``α_W`` (see the module docstring).
    ``weight_names``: full parameter names of the edited matrices; empty means
    :func:`~instructedit_lite.editors.mend.default_weight_names`.
    """

    lstm_hidden: int = 64
    condition_dim: int = 128
    head_hidden: int = 64
    alpha_init: float = 1e-4
    weight_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("lstm_hidden", "condition_dim", "head_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KEConfig.{name} must be a positive integer, got {value!r}")
        self.alpha_init = float(self.alpha_init)
        self.weight_names = list(self.weight_names)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class ConditionEncoder(nn.Module):
    """Token embeddings (B, T, E) + mask (B, T) → condition vector ``c`` (condition_dim,).

    ``c = tanh(P · mean_rows(mean_real_tokens(BiLSTM(E[x]))))``.  Only the real tokens of each row
    (mask 1, wherever they sit) are fed to the LSTM, as a packed sequence, so padding changes nothing.
    """

    def __init__(self, embed_dim: int, lstm_hidden: int, condition_dim: int):
        super().__init__()
        self.lstm = nn.LSTM(embed_dim, lstm_hidden, num_layers=1, bidirectional=True, batch_first=True)
        self.proj = nn.Linear(2 * lstm_hidden, condition_dim)

    def forward(self, embeddings: Tensor, mask: Tensor) -> Tensor:
        mask = mask.bool()
        lengths = mask.sum(-1)
        if (lengths == 0).any():
            raise ValueError("KE condition: a row of the edit batch has no real token (attention_mask all 0)")
        rows = [emb[m] for emb, m in zip(embeddings, mask)]  # real tokens only, in order
        padded = pad_sequence(rows, batch_first=True)
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)  # (B, T', 2H), zero-padded
        row_means = states.sum(1) / lengths.to(states.dtype).unsqueeze(-1)
        return torch.tanh(self.proj(row_means.mean(0)))


class ConditionedWeight(nn.Module):
    """The head of one edited matrix ``W`` (rows × cols): ``c`` → ``a, γ_a, b, γ_b, η``.

    ``h = tanh(H₁ c)``, ``[a; γ_a; b; γ_b; η] = H₂ h``.  ``H₂``'s weight is zero at start and its
    bias makes the gate exactly 1 and the shift 0 (see the module docstring).
    """

    def __init__(self, rows: int, cols: int, condition_dim: int, hidden: int):
        super().__init__()
        self.rows, self.cols = rows, cols
        self.hidden = nn.Linear(condition_dim, hidden)
        self.out = nn.Linear(hidden, 2 * (rows + cols) + 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()
            _, gamma_a, _, _, _ = self.out.bias.split(self.sizes)
            gamma_a.fill_(2.0 * rows)  # σ(0) · (1/rows) · 2·rows = 1

    @property
    def sizes(self) -> list[int]:
        return [self.rows, self.cols, self.rows, self.cols, 1]

    def forward(self, c: Tensor) -> dict[str, Tensor]:
        a, gamma_a, b, gamma_b, eta = self.out(torch.tanh(self.hidden(c))).split(self.sizes)
        return {"a": a, "gamma_a": gamma_a, "b": b, "gamma_b": gamma_b, "eta": eta.squeeze(-1)}

    @staticmethod
    def gate_and_shift(heads: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(σ(η)·softmax(a) γ_aᵀ, σ(η)·softmax(b) γ_bᵀ)``, both (rows, cols)."""
        scale = torch.sigmoid(heads["eta"])
        gate = scale * torch.outer(heads["a"].softmax(-1), heads["gamma_a"])
        shift = scale * torch.outer(heads["b"].softmax(-1), heads["gamma_b"])
        return gate, shift


# ---------------------------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------------------------


class KEEditor(nn.Module):
    """KE for a given set of weight matrices of ``model`` (interface of ``MendEditor``).

    The model is not a submodule (neither saved nor trained with the editor); pass it to each call.
    ``generator`` seeds the random initialisation (default: torch's global RNG).
    """

    def __init__(self, model: nn.Module, config: KEConfig, generator: torch.Generator | None = None):
        super().__init__()
        names = list(config.weight_names) or default_weight_names(model)
        self.config = replace(config, weight_names=names)
        self.infos: dict[str, WeightInfo] = {name: weight_info(model, name) for name in names}
        embed_dim = model.get_input_embeddings().weight.shape[1]
        # With a generator the modules' default initialisation must not draw from (and so move)
        # torch's global RNG: build them on a forked RNG, then re-draw from the generator.
        with torch.random.fork_rng(devices=[], enabled=generator is not None):
            self.encoder = ConditionEncoder(embed_dim, self.config.lstm_hidden, self.config.condition_dim)
            self.heads = nn.ModuleDict({
                _key(name): ConditionedWeight(*info.shape, self.config.condition_dim, self.config.head_hidden)
                for name, info in self.infos.items()
            })
        self.alphas = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.tensor(self.config.alpha_init)) for name in names}
        )
        if generator is not None:  # reproducible initialisation of the random parameters
            self._reinit(generator)
        self.to(model.get_parameter(names[0]).device)

    @torch.no_grad()
    def _reinit(self, generator: torch.Generator) -> None:
        """PyTorch's default uniform(±1/√fan_in) init of the LSTM, projection and hidden layers,
        drawn from ``generator``; the zero output layers and the α's are left as they are."""
        def uniform_(t: Tensor, bound: float) -> None:
            t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * bound)

        bound = 1.0 / self.config.lstm_hidden ** 0.5
        for p in self.encoder.lstm.parameters():
            uniform_(p, bound)
        for layer in [self.encoder.proj] + [h.hidden for h in self.heads.values()]:
            fan_in_bound = 1.0 / layer.in_features ** 0.5
            uniform_(layer.weight, fan_in_bound)
            uniform_(layer.bias, fan_in_bound)

    # -- parameter groups -------------------------------------------------------------------

    def alpha_parameters(self) -> list[nn.Parameter]:
        """The step sizes α (one per edited matrix), for their own optimiser."""
        return list(self.alphas.values())

    def network_parameters(self) -> list[nn.Parameter]:
        """LSTM, projection and heads; disjoint from the α's."""
        return [p for name, p in self.named_parameters() if not name.startswith("alphas.")]

    def alpha(self, name: str) -> nn.Parameter:
        return self.alphas[_key(name)]

    # -- the pieces of an edit ----------------------------------------------------------------

    def condition(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """The condition vector ``c`` of an edit batch (on the editor's graph, if grad is enabled):
        the rows to make likely only (ConvSent's unlikelihood rows are not the edit's text)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if batch.get("unlikely") is not None:
            ids, mask = ids[~batch["unlikely"]], mask[~batch["unlikely"]]
        table = model.get_input_embeddings().weight.detach()  # frozen: no gradient to the model
        embeddings = table[ids].float()
        return self.encoder(embeddings, mask)

    def head_outputs(self, name: str, c: Tensor) -> dict[str, Tensor]:
        """``{"a", "gamma_a", "b", "gamma_b", "eta"}`` of matrix ``name`` for condition ``c``."""
        return self.heads[_key(name)](c)

    def gate_and_shift(self, name: str, c: Tensor) -> tuple[Tensor, Tensor]:
        """``(σ(η)·softmax(a) γ_aᵀ, σ(η)·softmax(b) γ_bᵀ)`` of matrix ``name``, in W's layout."""
        return ConditionedWeight.gate_and_shift(self.head_outputs(name, c))

    def true_gradients(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """``({name: ∇W}, loss)``: detached float32 gradients of the edit's loss
        (:func:`~instructedit_lite.editors.mend.edit_loss`: token-mean NLL, plus ConvSent's unlikelihood).

        Only the edited weights require grad during the pass (so backward stops at the lowest
        edited layer); ``torch.autograd.grad`` leaves every ``.grad`` of the model untouched.
        """
        names = list(self.infos)
        with only_these_require_grad(model, names), torch.enable_grad():
            loss = edit_loss(model(**_model_inputs(batch)).logits, batch["labels"], batch.get("unlikely"))
            weights = [model.get_parameter(n) for n in names]
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        out = {}
        for name, grad in zip(names, grads):
            if grad is None:
                raise RuntimeError(f"KE: edited weight {name!r} was not used by the edit's loss")
            out[name] = grad.detach().float()
        return out, loss.detach()

    def compute_deltas(
        self, model: nn.Module, batch: Mapping[str, Tensor], meta_grad: bool = True
    ) -> dict[str, Tensor]:
        """``ΔW = α_W · σ(η) · (softmax(a) γ_aᵀ ⊙ ∇W + softmax(b) γ_bᵀ)`` per edited weight.

        In the weight's own layout and dtype; apply as ``W' = W + ΔW``.  ``meta_grad=True`` keeps
        ΔW on the autograd graph of the editor (LSTM, heads, α); ``meta_grad=False`` (evaluation)
        runs the editor under ``torch.no_grad``.  ``∇W`` is detached either way.
        """
        grads, _ = self.true_gradients(model, batch)
        with torch.set_grad_enabled(meta_grad and torch.is_grad_enabled()):
            c = self.condition(model, batch)
            deltas = {}
            for name in self.infos:
                gate, shift = self.gate_and_shift(name, c)
                step = self.alpha(name) * (gate * grads[name] + shift)
                deltas[name] = step.to(model.get_parameter(name).dtype)
        return deltas

    def edited_params(self, model: nn.Module, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{name: W + ΔW}`` with ΔW on the graph and W detached: meta-gradients reach the editor
        and α, never the (frozen) base model."""
        return {name: model.get_parameter(name).detach() + delta for name, delta in deltas.items()}

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """One file (written atomically): format tag, config, edited weights' layout/shape, state dict."""
        blob = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "weights": {n: {"layout": i.layout, "shape": list(i.shape)} for n, i in self.infos.items()},
            "embed_dim": int(self.encoder.lstm.input_size),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        atomic_torch_save(blob, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> "KEEditor":
        """Rebuild a saved editor for ``model``; ValueError (naming the file) if it does not fit."""
        path = os.fspath(path)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"{path}: not a KE editor file (format {blob.get('format') if isinstance(blob, dict) else None!r})")
        if blob.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported KE editor format version {blob.get('format_version')!r}")
        for name, saved in blob["weights"].items():
            try:
                info = weight_info(model, name)
            except ValueError as err:
                raise ValueError(f"{path}: saved editor does not fit the model: {err}") from None
            if list(info.shape) != saved["shape"] or info.layout != saved["layout"]:
                raise ValueError(
                    f"{path}: edited weight {name!r} is {info.layout} {list(info.shape)} in the model "
                    f"but {saved['layout']} {saved['shape']} in the file"
                )
        embed_dim = model.get_input_embeddings().weight.shape[1]
        if embed_dim != blob["embed_dim"]:
            raise ValueError(f"{path}: the model's input embeddings have width {embed_dim}, "
                             f"the saved editor reads width {blob['embed_dim']}")
        # A private generator: the initial values are overwritten by the state dict and torch's
        # global RNG stays untouched.
        editor = cls(model, KEConfig.from_dict(blob["config"]), generator=torch.Generator().manual_seed(0))
        editor.load_state_dict(blob["state_dict"])
        return editor
