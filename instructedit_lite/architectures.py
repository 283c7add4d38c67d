"""Architecture profiles: where a model family keeps its blocks and MLPs (chapter 3).

Editing code never spells a module path itself.  It asks the model's :class:`Profile`, chosen from
``model.config.model_type``, for the block path, the MLP's input and output matrices, the MLP's
activation and whether prompts start with a BOS token; depth comes from the model.  So MEND's
default edited weights (the MLP matrices of the last three blocks, as in the paper), the
baselines' modules and the paper configurations resolve the same way for the embedded GPT-2, GPT2-XL
(48 blocks) or a LLaMA-family model of any depth.  A new family is one :func:`register_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Profile", "GPT2", "LLAMA", "MISTRAL", "QWEN2", "register_profile", "profile_for", "profile_named", "n_blocks"]


@dataclass(frozen=True)
class Profile:
    """Module names of one model family.

    ``blocks``: the ``ModuleList`` of transformer blocks; ``mlp``: the MLP inside a block;
    ``mlp_in``: its input matrices (GPT-2: ``c_fc``; LLaMA: ``gate_proj``, ``up_proj``);
    ``mlp_out``: its output matrix; ``activation``: the MLP's nonlinearity (``gelu_new``, ``silu``);
    ``gated``: ``act(gate(x)) * up(x)`` (LLaMA) rather than ``act(fc(x))``; ``bos``: whether the
    tokenizer's BOS token starts every input; ``model_types``: the ``config.model_type`` values;
    ``final_norm`` and ``head``: the norm after the last block and the LM head (the frozen-prefix
    engine runs them after the edited blocks).
    """

    name: str
    blocks: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    activation: str
    gated: bool
    bos: bool
    model_types: tuple[str, ...]
    final_norm: str = ""
    head: str = "lm_head"

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}"

    def mlp_module(self, i: int | str = "{layer}") -> str:
        """The MLP of block ``i`` (a ``{layer}`` template by default, as the baselines' configs take)."""
        return f"{self.blocks}.{i}.{self.mlp}"

    def mlp_out_module(self, i: int | str = "{layer}") -> str:
        return f"{self.mlp_module(i)}.{self.mlp_out}"

    def mlp_weights(self, i: int) -> list[str]:
        """The MLP's matrices of block ``i``, inputs first (module order of the model)."""
        return [f"{self.mlp_module(i)}.{m}.weight" for m in (*self.mlp_in, self.mlp_out)]

    def edited_weights(self, depth: int, n_last: int = 3) -> list[str]:
        """The paper's default edited weights: the MLP matrices of the last ``n_last`` of ``depth`` blocks."""
        if depth < 1:
            raise ValueError(f"{self.name}: a model needs at least one block, got depth {depth}")
        return [w for i in range(max(0, depth - n_last), depth) for w in self.mlp_weights(i)]


GPT2 = Profile("gpt2", blocks="transformer.h", mlp="mlp", mlp_in=("c_fc",), mlp_out="c_proj",
               activation="gelu_new", gated=False, bos=False, model_types=("gpt2",),
               final_norm="transformer.ln_f")
LLAMA = Profile("llama", blocks="model.layers", mlp="mlp", mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj",
                activation="silu", gated=True, bos=True, model_types=("llama",), final_norm="model.norm")
# Mistral and Qwen2 keep LLaMA's module names (Qwen2 adds biases to the attention's projections, which
# no method edits); Qwen2's tokenizer has no BOS token.
MISTRAL = Profile("mistral", blocks="model.layers", mlp="mlp", mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj",
                  activation="silu", gated=True, bos=True, model_types=("mistral",), final_norm="model.norm")
QWEN2 = Profile("qwen2", blocks="model.layers", mlp="mlp", mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj",
                activation="silu", gated=True, bos=False, model_types=("qwen2", "qwen3"), final_norm="model.norm")

_PROFILES: dict[str, Profile] = {}


def register_profile(profile: Profile) -> Profile:
    """Make ``profile`` the one chosen for its ``model_types``."""
    for model_type in profile.model_types:
        _PROFILES[model_type] = profile
    return profile


for _profile in (GPT2, LLAMA, MISTRAL, QWEN2):
    register_profile(_profile)


def profile_named(name: str) -> Profile:
    """A profile by family name (``"gpt2"``, ``"llama"``, ``"mistral"``, ``"qwen2"``) or model type."""
    for profile in _PROFILES.values():
        if profile.name == name:
            return profile
    if name in _PROFILES:
        return _PROFILES[name]
    raise ValueError(f"no architecture profile named {name!r}; known: {sorted({p.name for p in _PROFILES.values()})}")


def profile_for(model: nn.Module) -> Profile:
    """The profile of ``model`` (or of a ``transformers`` config), from its ``model_type``."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in _PROFILES:
        raise ValueError(f"no architecture profile for model_type {model_type!r}; known: {sorted(_PROFILES)} "
                         "(add one with instructedit_lite.architectures.register_profile)")
    return _PROFILES[model_type]


def n_blocks(model: nn.Module, profile: Profile | None = None) -> int:
    """How many transformer blocks ``model`` has (from its module list, not its config)."""
    profile = profile or profile_for(model)
    try:
        return len(model.get_submodule(profile.blocks))
    except AttributeError:
        raise ValueError(f"the model has no module {profile.blocks!r} ({profile.name} profile)") from None
