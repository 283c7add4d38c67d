"""MEND's settings and networks: running normalisation and residual low-rank blocks (chapter 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ...config import Config

__all__ = ["MODES", "MendConfig", "RunningNorm", "LowRankBlock", "BlockStack", "GradientTransform"]

MODES = ("both", "x_only", "delta_only")


@dataclass
class MendConfig(Config):
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
        #: None: every training-mode call updates the statistics at once.  A list: the statistics
        #: stay as they are and each call's part is kept here, ``(n_b, μ_b, M2_b)``, for
        #: :meth:`merge` later (meta-training on several processes merges every process's parts
        #: in the order of the edits; ``TrainConfig.statistics="per_step"``).
        self.pending: list[tuple[int, Tensor, Tensor]] | None = None

    @staticmethod
    @torch.no_grad()
    def part(rows: Tensor) -> tuple[int, Tensor, Tensor]:
        """``(n_b, μ_b, M2_b)`` of ``rows`` (n_b, D), in float64, non-finite rows left out: an
        overflowed gradient would poison the statistics for good, even though the training loop
        skips that step's optimiser update."""
        rows = rows.detach().to(torch.float64)
        rows = rows[torch.isfinite(rows).all(-1)]
        if rows.shape[0] == 0:
            return 0, rows.new_zeros(rows.shape[-1]), rows.new_zeros(rows.shape[-1])
        mean_b = rows.mean(0)
        return rows.shape[0], mean_b, ((rows - mean_b) ** 2).sum(0)

    @torch.no_grad()
    def merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        """Add a part (:meth:`part`) to the statistics: Chan et al.'s parallel form of Welford's
        update, ``μ ← μ_a + d·n_b/n``, ``M2 ← M2_a + M2_b + d²·n_a·n_b/n`` with ``d = μ_b − μ_a``."""
        if n_b == 0:
            return
        mean_b, m2_b = mean_b.to(self.mean.device), m2_b.to(self.m2.device)  # a part from another process
        n_a = self.count.item()
        n = n_a + n_b
        d = mean_b - self.mean
        self.mean += d * (n_b / n)
        self.m2 += m2_b + d**2 * (n_a * n_b / n)
        self.count += n_b

    @torch.no_grad()
    def update(self, rows: Tensor) -> None:
        """Add ``rows`` (n_b, D) to the statistics, equal to row-by-row Welford updates up to rounding
        (or keep their part in :attr:`pending`)."""
        part = self.part(rows)
        if self.pending is not None:
            self.pending.append(part)
        else:
            self.merge(*part)

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
        return self.transform_normalized(*self.normalized(u, delta), mode)

    def normalized(self, u: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """``(û, δ̂)``: the running statistics updated with these rows (training mode), then applied."""
        u_hat = self.norm_u(u, self.normalize)  # û = (u − μ_u)/(σ_u + 1e-7)
        delta_hat = self.norm_delta(delta, self.normalize)  # δ̂ = (δ − μ_δ)/(σ_δ + 1e-7)
        return u_hat, delta_hat

    def transform_normalized(self, u_hat: Tensor, delta_hat: Tensor, mode: Tensor) -> tuple[Tensor, Tensor]:
        """``(û, δ̂) → (ũ, δ̃)``; ``mode``: one layer id (a 0-d tensor), or one per row (several layers in one call)."""
        if self.combine:
            z = self.net(torch.cat([u_hat, delta_hat], dim=-1), mode)  # z = [û; δ̂] → blocks
            return z.split([self.d_in, self.d_out], dim=-1)
        u_tilde = self.net_u(u_hat, mode) if self.net_u is not None else u_hat
        delta_tilde = self.net_delta(delta_hat, mode) if self.net_delta is not None else delta_hat
        return u_tilde, delta_tilde
