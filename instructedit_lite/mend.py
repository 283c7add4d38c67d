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
the autograd graph and :func:`functional_forward` runs the model with them
(``torch.func.functional_call``), so a post-edit loss sends meta-gradients into the editor and the
step sizes.  For evaluation, :func:`applied` writes the (detached) update into the weights and
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

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from .atomic import atomic_torch_save

try:  # GPT-2's linear layer: y = x W + b with W stored as (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency of the project
    Conv1D = None

FORMAT_VERSION = 1
MODES = ("both", "x_only", "delta_only")
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of the labelled tokens.

    Causal shift: the logits at position ``t`` predict the token at ``t + 1``, so
    ``L = mean_{t: labels[t+1] ≠ -100} −log p(labels[t+1] | logits[t])``.
    Computed in float32 so half-precision models get a stable loss.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    if not (shifted_labels != IGNORE_INDEX).any():
        raise ValueError("lm_loss: no labelled token after the first position (all labels are -100)")
    return nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class MendConfig:
    """Hyper-parameters of the editor.

    ``rank``: size of the low-rank blocks, effectively ``min(rank, D)`` for a block of width ``D``.
    ``n_blocks``: residual blocks per network (the reference's ``n_hidden=1`` gives 2).
    ``combine``: one network over ``z = [û; δ̂]``; ``False`` gives separate networks for u and δ.
    ``mode``: ``"both"`` transforms u and δ, ``"x_only"`` only u (δ̂ passes through),
    ``"delta_only"`` only δ.  Needs ``combine=False`` unless ``"both"``.
    ``one_sided``: MEND's one-sided variant: per weight shape only the *smaller* side is learned
    (u if ``d_in <= d_out``, else δ), the other passes through.  Needs ``combine=False``.
    ``normalize``: apply the running normalisation (statistics are kept either way).
    ``share``: one network per weight shape, shared by the layers of that shape, with per-layer
    scale/shift embeddings ("modes"); ``False`` gives one network per matrix.
    ``alpha_init``: initial per-matrix step size ``α``.
    ``weight_names``: full parameter names of the edited matrices; empty means
    :func:`default_weight_names` (MLP matrices of the last three blocks).
    """

    rank: int = 64
    n_blocks: int = 2
    combine: bool = True
    mode: str = "both"
    one_sided: bool = False
    normalize: bool = True
    share: bool = True
    alpha_init: float = 1e-4
    weight_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MendConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.one_sided and self.mode != "both":
            raise ValueError("MendConfig: one_sided chooses the learned side itself; use mode='both'")
        if self.combine and (self.one_sided or self.mode != "both"):
            raise ValueError(
                "MendConfig: combine=True transforms u and δ jointly; one_sided, x_only and "
                "delta_only need combine=False"
            )
        if self.rank < 1 or self.n_blocks < 1:
            raise ValueError(f"MendConfig: rank and n_blocks must be >= 1, got {self.rank}, {self.n_blocks}")
        self.weight_names = list(self.weight_names)

    def learned_sides(self, d_in: int, d_out: int) -> tuple[bool, bool]:
        """Which of (u, δ) a network transforms, for a weight with these dimensions."""
        if self.one_sided:
            return (True, False) if d_in <= d_out else (False, True)
        return self.mode in ("both", "x_only"), self.mode in ("both", "delta_only")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MendConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"MendConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**dict(data))


# ---------------------------------------------------------------------------------------------
# Edited weights: where they are and how they are laid out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightInfo:
    """An edited matrix: ``layout`` is ``"linear"`` (W is (d_out, d_in)) or ``"conv1d"`` ((d_in, d_out))."""

    name: str
    layout: str
    shape: tuple[int, int]

    @property
    def d_in(self) -> int:
        return self.shape[1] if self.layout == "linear" else self.shape[0]

    @property
    def d_out(self) -> int:
        return self.shape[0] if self.layout == "linear" else self.shape[1]

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0]


def weight_info(model: nn.Module, name: str) -> WeightInfo:
    """Look up an edited weight; raises ValueError naming it if it is missing or not a linear map."""
    module_name, _, leaf = name.rpartition(".")
    if leaf != "weight":
        raise ValueError(f"edited weight {name!r} must be the '.weight' of a Linear or Conv1D module")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"edited weight {name!r}: the model has no module {module_name!r}") from None
    if Conv1D is not None and isinstance(module, Conv1D):
        layout = "conv1d"
    elif isinstance(module, nn.Linear):
        layout = "linear"
    else:
        raise ValueError(f"edited weight {name!r} belongs to a {type(module).__name__}, not Linear/Conv1D")
    return WeightInfo(name, layout, tuple(module.weight.shape))


def default_weight_names(model: nn.Module, n_last: int = 3) -> list[str]:
    """MLP weight matrices of the last ``n_last`` transformer blocks, as in the paper.

    GPT-2: ``transformer.h.{i}.mlp.c_fc.weight``, ``...c_proj.weight``; LLaMA:
    ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``.
    """
    blocks: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        if "mlp" not in parts or not isinstance(module, (nn.Linear,) + ((Conv1D,) if Conv1D else ())):
            continue
        block = parts[parts.index("mlp") - 1]
        if block.isdigit():
            blocks.setdefault(int(block), []).append(f"{module_name}.weight")
    if not blocks:
        raise ValueError("default_weight_names: found no '<blocks>.<i>.mlp.<linear>' modules; pass weight_names")
    last = sorted(blocks)[-n_last:]
    return [name for i in last for name in blocks[i]]


# ---------------------------------------------------------------------------------------------
# Editor building blocks
# ---------------------------------------------------------------------------------------------


class RunningNorm(nn.Module):
    """Per-coordinate running mean and std (Welford), frozen outside training mode.

    Buffers (saved in the state dict, so a resumed run continues the same statistics):
    ``count`` n, ``mean`` μ, ``m2`` M2 = Σ (x − μ)².  ``std = sqrt(M2 / (n − 1))`` (unbiased); with
    fewer than two rows there is no spread yet and std is taken as 1.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # float64: the statistics accumulate over a whole training run.
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Add ``rows`` (n_b, D) to the statistics.

        Welford's update for a block of rows at once (Chan et al.'s parallel form), equal to
        row-by-row updates up to rounding:
        ``μ ← μ_a + d·n_b/n``, ``M2 ← M2_a + M2_b + d²·n_a·n_b/n`` with ``d = μ_b − μ_a``.
        """
        # A non-finite row (an overflowed gradient) would poison the statistics for good, even
        # though the training loop skips that step's optimiser update: leave such rows out.
        rows = rows.detach().to(torch.float64)
        rows = rows[torch.isfinite(rows).all(-1)]
        n_b = rows.shape[0]
        if n_b == 0:
            return
        n_a = self.count.item()
        n = n_a + n_b
        mean_b = rows.mean(0)
        m2_b = ((rows - mean_b) ** 2).sum(0)
        d = mean_b - self.mean
        self.mean += d * (n_b / n)
        self.m2 += m2_b + d**2 * (n_a * n_b / n)
        self.count += n_b

    @property
    def std(self) -> Tensor:
        if self.count.item() < 2:
            return torch.ones_like(self.m2)
        return (self.m2 / (self.count - 1)).sqrt()

    def forward(self, x: Tensor, normalize: bool = True) -> Tensor:
        """Update (training mode only), then ``x̂ = (x − μ) / (σ + 1e-7)`` if ``normalize``."""
        if self.training:
            self.update(x)
        if not normalize:
            return x
        return (x - self.mean.to(x.dtype)) / (self.std.to(x.dtype) + 1e-7)


class LowRankBlock(nn.Module):
    """Residual low-rank block ``h ← h + clamp(s_m ⊙ (U V h + b) + o_m, min=0)``.

    ``V`` (rank, D) ~ N(0, 1), ``U`` (D, rank) = 0, ``b`` = 0, scale ``s_m`` = 1 and shift
    ``o_m`` = 0 per mode: the block is the identity at initialisation.
    """

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator | None = None):
        super().__init__()
        rank = min(rank, dim)
        self.V = nn.Parameter(torch.randn(rank, dim, generator=generator))
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Embedding(n_modes, dim)
        self.mode_shift = nn.Embedding(n_modes, dim)
        nn.init.ones_(self.mode_scale.weight)
        nn.init.zeros_(self.mode_shift.weight)

    @staticmethod
    def _nonlinearity(pre: Tensor) -> Tensor:
        # clamp, not relu: at init every pre-activation is exactly 0; clamp's gradient passes at 0
        # (its mask is x >= 0), relu's does not (x > 0), and the editor would never leave the identity.
        return pre.clamp(min=0)

    def forward(self, h: Tensor, mode: Tensor) -> Tensor:
        pre = (h @ self.V.T) @ self.U.T + self.bias  # rows of (U V h + b)
        pre = self.mode_scale(mode) * pre + self.mode_shift(mode)  # s_m ⊙ (...) + o_m
        return h + self._nonlinearity(pre)


class BlockStack(nn.Module):
    """``n_blocks`` residual low-rank blocks applied in turn."""

    def __init__(self, dim: int, rank: int, n_blocks: int, n_modes: int, generator=None):
        super().__init__()
        self.blocks = nn.ModuleList(LowRankBlock(dim, rank, n_modes, generator) for _ in range(n_blocks))

    def forward(self, h: Tensor, mode: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h, mode)
        return h


class GradientTransform(nn.Module):
    """Maps the gradient factors (u, δ) of one weight shape (or one weight) to (ũ, δ̃)."""

    def __init__(self, d_in: int, d_out: int, config: MendConfig, n_modes: int, generator=None):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.combine, self.normalize = config.combine, config.normalize
        self.norm_u = RunningNorm(d_in)
        self.norm_delta = RunningNorm(d_out)
        args = (config.rank, config.n_blocks, n_modes, generator)
        if config.combine:
            self.net = BlockStack(d_in + d_out, *args)
        else:
            learn_u, learn_delta = config.learned_sides(d_in, d_out)
            # None = identity: that side is only normalised.
            self.net_u = BlockStack(d_in, *args) if learn_u else None
            self.net_delta = BlockStack(d_out, *args) if learn_delta else None

    def forward(self, u: Tensor, delta: Tensor, mode: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, δ)`` rows (n, d_in), (n, d_out) → ``(ũ, δ̃)``; updates the statistics in training mode."""
        u_hat = self.norm_u(u, self.normalize)  # û = (u − μ_u)/(σ_u + 1e-7)
        delta_hat = self.norm_delta(delta, self.normalize)  # δ̂ = (δ − μ_δ)/(σ_δ + 1e-7)
        if self.combine:
            z = self.net(torch.cat([u_hat, delta_hat], dim=-1), mode)  # z = [û; δ̂] → blocks
            return z.split([self.d_in, self.d_out], dim=-1)
        u_tilde = self.net_u(u_hat, mode) if self.net_u is not None else u_hat
        delta_tilde = self.net_delta(delta_hat, mode) if self.net_delta is not None else delta_hat
        return u_tilde, delta_tilde


# ---------------------------------------------------------------------------------------------
# Capturing u and δ
# ---------------------------------------------------------------------------------------------


@dataclass
class EditFactors:
    """What one pre-edit backward pass gives: kept rows of u and δ per weight, the loss, ∇W."""

    u: dict[str, Tensor]
    delta: dict[str, Tensor]
    loss: Tensor
    true_grads: dict[str, Tensor]


@contextlib.contextmanager
def only_these_require_grad(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Temporarily let only the named parameters require grad; restore every flag afterwards.

    With everything else frozen, autograd builds no graph below the lowest edited layer: the
    backward pass of an edit costs only the top of the network.
    """
    wanted = set(names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


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


# ---------------------------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    """Module/parameter dict keys may not contain dots."""
    return name.replace(".", "__")


def _model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}


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
                loss = lm_loss(logits, batch["labels"])
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
            deltas = {}
            for name in self.infos:
                u_tilde, delta_tilde = self.transform(name, factors.u[name], factors.delta[name])
                weight = model.get_parameter(name)
                step = self.alpha(name) * self.pseudo_gradient(name, u_tilde, delta_tilde)
                deltas[name] = step.to(weight.dtype)
        return deltas

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


# ---------------------------------------------------------------------------------------------
# Running the edited model
# ---------------------------------------------------------------------------------------------


def functional_forward(model: nn.Module, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    """Logits of ``model`` with the weights in ``params`` substituted (the others unchanged).

    ``torch.func.functional_call`` keeps ``params`` on the autograd graph, so
    ``lm_loss(functional_forward(...), labels).backward()`` reaches the editor and the α's.
    """
    return torch.func.functional_call(model, dict(params), args=(), kwargs=_model_inputs(batch)).logits


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Edit ``model`` in place for the body: ``W ← W + ΔW`` (detached).

    On exit the exact original weights are copied back from clones (not ``W − ΔW``, which would
    not round-trip in floating point), also when the body raises, so no edit leaks into the next
    test case.
    """
    originals = {name: model.get_parameter(name).detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                weight = model.get_parameter(name)
                weight.add_(delta.detach().to(device=weight.device, dtype=weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_parameter(name).copy_(original)


# ---------------------------------------------------------------------------------------------
# Cost of an edit
# ---------------------------------------------------------------------------------------------


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
