"""The MEND editor: capture u and δ, transform them, turn them into ΔW; and what an edit costs (chapter 3)."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ...atomic import atomic_torch_save
from ...text import model_inputs as _model_inputs
from .networks import GradientTransform, MendConfig
from .weights import WeightInfo, applied, default_weight_names, edit_loss, lm_loss, only_these_require_grad, weight_info

__all__ = ["FORMAT_VERSION", "EditFactors", "capture_factors", "keep_nonzero_rows", "MendEditor",
           "time_edit_vs_forward_backward"]

FORMAT_VERSION = 1


@dataclass
class EditFactors:
    """What one pre-edit backward pass gives: kept rows of u and δ per weight, the loss, ∇W."""

    u: dict[str, Tensor]
    delta: dict[str, Tensor]
    loss: Tensor
    true_grads: dict[str, Tensor]


@contextlib.contextmanager
def capture_factors(model: nn.Module, infos: list[WeightInfo]) -> Iterator[dict[str, dict]]:
    """Hooks that record each edited layer's detached input u and output gradient δ.

    Yields ``{name: {"u": [...], "delta": {call_index: tensor}}}``.  The forward hook stores the
    input and registers a hook on the output *tensor*, which autograd calls with ∂L/∂output: this
    works the same for Linear and Conv1D and needs no module backward hook.  The module hooks are
    removed on exit, also when the body raises.
    """
    store: dict[str, dict] = {info.name: {"u": [], "delta": {}} for info in infos}
    handles = []

    def make_hook(slot: dict):
        def forward_hook(module, inputs, output):
            call = len(slot["u"])  # a module may run more than once; pair u and δ by call
            slot["u"].append(inputs[0].detach())
            if output.requires_grad:
                output.register_hook(lambda grad: slot["delta"].__setitem__(call, grad.detach()))

        return forward_hook

    try:
        for info in infos:
            module = model.get_submodule(info.module_name)
            handles.append(module.register_forward_hook(make_hook(store[info.name])))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def keep_nonzero_rows(u: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten (batch, seq, dim) to rows and drop rows where u or δ is all zero.

    Such rows add nothing to ``Σ_t δ_t u_tᵀ`` but would distort the running statistics: padding and
    positions after the last label have δ = 0 exactly.
    """
    u, delta = u.reshape(-1, u.shape[-1]), delta.reshape(-1, delta.shape[-1])
    keep = (u != 0).any(-1) & (delta != 0).any(-1)
    return u[keep], delta[keep]




def _key(name: str) -> str:
    """Module/parameter dict keys may not contain dots."""
    return name.replace(".", "__")


class MendEditor(nn.Module):
    """MEND's editor for a given set of weight matrices of ``model``.

    The model is not a submodule (it is neither saved nor trained with the editor); pass it to each
    call.  ``generator`` seeds the random ``V`` matrices (default: torch's global RNG).  The
    model's train/eval mode is left to the caller (eval switches dropout off, as MEND does).
    """

    def __init__(self, model: nn.Module, config: MendConfig, generator: torch.Generator | None = None):
        super().__init__()
        names = list(config.weight_names) or default_weight_names(model)
        self.config = replace(config, weight_names=names)
        self.infos = {name: weight_info(model, name) for name in names}

        # Group the matrices: one network per (d_in, d_out) if shared, else one per matrix.  A
        # matrix's mode is its index within its group, in the order of ``weight_names``.
        self.group_of: dict[str, str] = {}
        self.mode_of: dict[str, int] = {}
        groups: dict[str, list[str]] = {}
        for name, info in self.infos.items():
            group = f"{info.d_in}x{info.d_out}" if self.config.share else _key(name)
            self.group_of[name] = group
            self.mode_of[name] = len(groups.setdefault(group, []))
            groups[group].append(name)
        self.transforms = nn.ModuleDict()
        for group, members in groups.items():
            info = self.infos[members[0]]
            self.transforms[group] = GradientTransform(info.d_in, info.d_out, self.config, len(members), generator)

        # One learned step size per edited matrix, in its own parameter group.
        self.alphas = nn.ParameterDict(
            {_key(name): nn.Parameter(torch.tensor(float(self.config.alpha_init))) for name in names}
        )
        self.to(model.get_parameter(names[0]).device)

    # -- parameter groups -------------------------------------------------------------------

    def alpha_parameters(self) -> list[nn.Parameter]:
        """The step sizes α (one per edited matrix), for their own optimiser."""
        return list(self.alphas.values())

    def network_parameters(self) -> list[nn.Parameter]:
        """Every other editor parameter (U, V, b, mode scale/shift); disjoint from the α's."""
        return [p for name, p in self.named_parameters() if not name.startswith("alphas.")]

    def alpha(self, name: str) -> nn.Parameter:
        return self.alphas[_key(name)]

    # -- the edit ----------------------------------------------------------------------------

    def capture(self, model: nn.Module, batch: Mapping[str, Tensor]) -> EditFactors:
        """Run the edit batch forward and backward once and collect the kept rows of u and δ.

        Only the edited weights require grad during the pass; ``torch.autograd.grad`` (not
        ``backward``) fires the δ hooks, so no parameter of the model gets a ``.grad``.
        """
        names = list(self.infos)
        with only_these_require_grad(model, names), capture_factors(model, list(self.infos.values())) as store:
            with torch.enable_grad():
                logits = model(**_model_inputs(batch)).logits
                loss = edit_loss(logits, batch["labels"], batch.get("unlikely"))
                weights = [model.get_parameter(n) for n in names]
                true_grads = dict(zip(names, torch.autograd.grad(loss, weights)))
        u_rows, delta_rows = {}, {}
        for name in names:
            slot = store[name]
            pairs = [keep_nonzero_rows(u, slot["delta"][i]) for i, u in enumerate(slot["u"]) if i in slot["delta"]]
            if not pairs:
                raise RuntimeError(f"MEND: edited weight {name!r} was not used by the edit's loss")
            u_rows[name] = torch.cat([p[0] for p in pairs])
            delta_rows[name] = torch.cat([p[1] for p in pairs])
        return EditFactors(u_rows, delta_rows, loss.detach(), true_grads)

    def transform(self, name: str, u: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, δ)`` rows of weight ``name`` → ``(ũ, δ̃)`` (float32), through its group's network."""
        mode = torch.tensor(self.mode_of[name], device=u.device)
        return self.transforms[self.group_of[name]](u.float(), delta.float(), mode)

    def pseudo_gradient(self, name: str, u_tilde: Tensor, delta_tilde: Tensor) -> Tensor:
        """``∇̃W = Σ_t δ̃_t ũ_tᵀ`` (Linear, (d_out, d_in)) or ``Σ_t ũ_t δ̃_tᵀ`` (Conv1D, (d_in, d_out)).

        A sum over the kept tokens, not a mean: with the identity editor it is the true ∇W.
        """
        if self.infos[name].layout == "linear":
            return delta_tilde.T @ u_tilde
        return u_tilde.T @ delta_tilde

    def compute_deltas(
        self, model: nn.Module, batch: Mapping[str, Tensor], meta_grad: bool = True
    ) -> dict[str, Tensor]:
        """The update ``ΔW = α_W · ∇̃W`` of every edited weight, in the weight's own layout and dtype.

        Apply it as ``W' = W + ΔW``.  The reference code adds (the paper writes ``W − α∇̃W``); with
        the plus sign a trained α is negative, and indeed α turns negative early in meta-training.
        ``meta_grad=True`` keeps ΔW on the autograd graph of the editor and the α's;
        ``meta_grad=False`` (evaluation) runs the editor under ``torch.no_grad``.
        The running statistics update only if the editor is in training mode.
        """
        factors = self.capture(model, batch)
        with torch.set_grad_enabled(meta_grad and torch.is_grad_enabled()):
            tilde = self.transform_all(factors)
            deltas = {}
            for name in self.infos:
                weight = model.get_parameter(name)
                step = self.alpha(name) * self.pseudo_gradient(name, *tilde[name])
                deltas[name] = step.to(weight.dtype)
        return deltas

    def transform_all(self, factors: EditFactors) -> dict[str, tuple[Tensor, Tensor]]:
        """:meth:`transform` of every weight, the weights of one shared network in one call.

        The running statistics still see the weights one after another, in the order of
        :meth:`transform` calls; only the networks run once per group, on the rows of all its
        weights (each row with its layer's mode), so the network's weight gradients come out of
        one matrix product per layer instead of one per edited weight plus their sum: the same
        values up to rounding, a third less time per meta-training step at rank 1,920 on SmolLM2.
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for group, transform in self.transforms.items():
            names = [n for n in self.infos if self.group_of[n] == group]
            hats = [transform.normalized(factors.u[n].float(), factors.delta[n].float()) for n in names]
            sizes = [u.shape[0] for u, _ in hats]
            modes = torch.cat([torch.full((k,), self.mode_of[n], dtype=torch.long) for n, k in zip(names, sizes)])
            u_t, d_t = transform.transform_normalized(torch.cat([u for u, _ in hats]), torch.cat([d for _, d in hats]),
                                                      modes.to(hats[0][0].device))
            out.update(zip(names, zip(u_t.split(sizes), d_t.split(sizes))))
        return out

    def edited_params(self, model: nn.Module, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{name: W + ΔW}`` with ΔW on the graph and W detached: meta-gradients reach the editor
        and α, never the (frozen) base model."""
        return {name: model.get_parameter(name).detach() + delta for name, delta in deltas.items()}

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """One file: config, state dict (networks, α, running statistics), edited weights.

        Written to a temporary file in the same folder and moved into place with ``os.replace``, so
        a crash never leaves a half-written checkpoint under ``path``.
        """
        path = os.fspath(path)
        blob = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "weights": {n: {"layout": i.layout, "shape": list(i.shape)} for n, i in self.infos.items()},
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        atomic_torch_save(blob, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> "MendEditor":
        """Rebuild a saved editor for ``model``; ValueError if the model's edited weights differ."""
        path = os.fspath(path)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported MEND checkpoint format {blob.get('format_version')!r}")
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
        # A private generator: V is overwritten by the state dict and the global RNG stays untouched.
        editor = cls(model, MendConfig.from_dict(blob["config"]), generator=torch.Generator().manual_seed(0))
        editor.load_state_dict(blob["state_dict"])
        return editor




def time_edit_vs_forward_backward(
    model: nn.Module, editor: MendEditor, batch: Mapping[str, Tensor], repeats: int = 20
) -> dict[str, float]:
    """Median seconds of one MEND edit vs one plain forward+backward of the whole model.

    Edit: ``compute_deltas`` with the editor in eval mode and no meta-gradient, then writing ΔW into
    the weights (restoring them is not timed).  Forward+backward: every parameter requires grad
    and ``loss.backward()`` fills all ``.grad``s, as one step of fine-tuning would.  One warm-up
    round first; the editor's mode, the model's flags and weights are restored afterwards.
    """
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    was_training = editor.training
    editor.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def time_edit() -> float:
        start = time.perf_counter()
        deltas = editor.compute_deltas(model, batch, meta_grad=False)
        with applied(model, deltas):
            sync()
            return time.perf_counter() - start

    def time_fwd_bwd() -> float:
        start = time.perf_counter()
        loss = lm_loss(model(**_model_inputs(batch)).logits, batch["labels"])
        loss.backward()
        sync()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    try:
        edit_times, fwd_bwd_times = [], []
        for i in range(repeats + 1):  # round 0 is the warm-up
            t_edit = time_edit()
            model.requires_grad_(True)
            t_fb = time_fwd_bwd()
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            if i > 0:
                edit_times.append(t_edit)
                fwd_bwd_times.append(t_fb)
    finally:
        editor.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    edit_s, fwd_bwd_s = statistics.median(edit_times), statistics.median(fwd_bwd_times)
    return {"edit_s": edit_s, "fwd_bwd_s": fwd_bwd_s, "ratio": edit_s / fwd_bwd_s}
