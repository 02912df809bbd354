"""Sampling completions for evaluation: Hugging Face ``generate`` or vLLM.

Both backends take chat prompts (lists of messages) and return ``k`` completions
per prompt plus the number of generated tokens of each. ``--model`` may be a model
directory/hub name or a LoRA adapter directory (``adapter_config.json``), which is
applied to the base model it names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from rlclip.eval import EvalError

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class GenerationSettings:
    """How to sample: k samples per prompt, batch size in sequences, greedy when temperature is 0."""

    num_samples: int = 1
    batch_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    progress: bool = True


@dataclass
class Generated:
    """``completions[i][j]``: sample j of prompt i; ``num_tokens`` alike; model loading time."""

    completions: list[list[str]]
    num_tokens: list[list[int]]
    load_model_s: float = 0.0


def adapter_base(model_path: str) -> str | None:
    """The base model named by a LoRA adapter directory, or None for a plain model."""
    config_path = os.path.join(model_path, "adapter_config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base:
        raise EvalError(f"{config_path} names no base_model_name_or_path; cannot apply the adapter")
    return str(base)


def load_for_eval(model_path: str, settings: GenerationSettings) -> tuple[Any, Any]:
    """Model (adapter merged in) and tokenizer, ready for generation."""
    from rlclip.modeling import load_model_and_tokenizer, load_tokenizer

    base = adapter_base(model_path)
    model, tokenizer = load_model_and_tokenizer(
        base or model_path, settings.dtype, settings.gguf_file, settings.trust_remote_code
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
        if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")):
            tokenizer = load_tokenizer(model_path, None, settings.trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def render_prompt(tokenizer: Any, messages: Messages) -> tuple[str, bool]:
    """(prompt text, whether to add special tokens): the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    return "\n\n".join(str(m.get("content", "")) for m in messages) + "\n", True


def _generation_config(model: Any, tokenizer: Any, settings: GenerationSettings) -> Any:
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.temperature > 0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
    )
    if settings.temperature > 0:
        config.temperature = settings.temperature
        config.top_p = settings.top_p
        config.top_k = 0  # plain nucleus sampling: no top-k cut unless asked for
    return config


def _stop_length(row: list[int], stop_ids: set[int]) -> int:
    """Generated length: up to and including the first stop token."""
    for position, token in enumerate(row):
        if token in stop_ids:
            return position + 1
    return len(row)


def _stop_ids(config: Any) -> set[int]:
    eos = config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.add(config.pad_token_id)
    return {i for i in ids if i is not None}


class _DecodeProgress:
    """A ``generate`` streamer that moves the bar by ``batch / max_new_tokens`` per decoding step.

    So a long batch shows progress while it decodes instead of jumping when it
    ends; the batch's remainder is added when it finishes (early stops).
    """

    def __init__(self, bar: Any, batch: int, max_new_tokens: int) -> None:
        self.bar, self.step, self.done, self.prompt_seen = bar, batch / max_new_tokens, 0.0, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate passes the prompt ids first
            self.prompt_seen = True
            return
        self.done += self.step
        self.bar.update(self.step)

    def end(self) -> None:
        pass

    def finish(self, batch: int) -> None:
        self.bar.update(batch - self.done)
        self.bar.n = round(self.bar.n)  # whole sequences once a batch is done
        self.bar.refresh()


def generate_hf(model_path: str, prompts: list[Messages], settings: GenerationSettings) -> Generated:
    """Batched ``model.generate`` with left padding, longest prompts first, seeded.

    Greedy decoding (temperature 0) generates each prompt once and repeats it k times.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    started = time.perf_counter()
    model, tokenizer = load_for_eval(model_path, settings)
    load_model_s = time.perf_counter() - started
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rendered = [render_prompt(tokenizer, messages) for messages in prompts]
    k = settings.num_samples
    draws = 1 if settings.temperature == 0 else k
    pairs = sorted(((i, j) for i in range(len(prompts)) for j in range(draws)), key=lambda p: -len(rendered[p[0]][0]))
    config = _generation_config(model, tokenizer, settings)
    stop_ids = _stop_ids(config)
    completions = [[""] * k for _ in prompts]
    num_tokens = [[0] * k for _ in prompts]
    set_seed(settings.seed)
    with tqdm(total=len(pairs), desc="generate", unit="seq", disable=not settings.progress, file=sys.stderr,
              bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}]") as bar:
        for start in range(0, len(pairs), settings.batch_size):
            chunk = pairs[start : start + settings.batch_size]
            texts = [rendered[i][0] for i, _ in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=rendered[chunk[0][0]][1])
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            progress = _DecodeProgress(bar, len(chunk), settings.max_new_tokens)
            with torch.inference_mode():
                output = model.generate(**batch, generation_config=config,
                                        streamer=progress if settings.progress else None)
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            for (i, j), row in zip(chunk, new_tokens):
                length = _stop_length(row, stop_ids)
                text = tokenizer.decode(row[:length], skip_special_tokens=True)
                targets = range(k) if draws == 1 else [j]
                for target in targets:
                    completions[i][target], num_tokens[i][target] = text, length
            progress.finish(len(chunk))
    return Generated(completions, num_tokens, load_model_s)


def _lora_rank(adapter_dir: str) -> int:
    """vLLM's max_lora_rank for an adapter: a supported size >= its rank."""
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as handle:
        rank = int(json.load(handle).get("r", 16))
    size = 8
    while size < rank:
        size *= 2
    return max(size, 16)


def generate_vllm(model_path: str, prompts: list[Messages], settings: GenerationSettings) -> Generated:
    """k samples per prompt with vLLM's ``LLM.chat`` (LoRA adapters through ``LoRARequest``)."""
    try:
        import vllm
    except ImportError:
        raise EvalError("--backend vllm needs the vllm package (pip install vllm); or use --backend hf") from None
    if settings.gguf_file:
        raise EvalError("--gguf-file works with --backend hf only; drop --backend vllm or convert the model")
    base = adapter_base(model_path)
    lora_kwargs: dict[str, Any] = {"enable_lora": True, "max_lora_rank": _lora_rank(model_path)} if base else {}
    llm = vllm.LLM(
        model=base or model_path,
        dtype=settings.dtype,
        seed=settings.seed,
        trust_remote_code=settings.trust_remote_code,
        **lora_kwargs,
    )
    params = vllm.SamplingParams(
        n=settings.num_samples,
        temperature=settings.temperature,
        top_p=settings.top_p if settings.temperature > 0 else 1.0,
        max_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    lora = None
    if base:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, model_path)
    outputs = llm.chat(prompts, params, use_tqdm=settings.progress, lora_request=lora)
    return Generated(
        [[sample.text for sample in out.outputs] for out in outputs],
        [[len(sample.token_ids) for sample in out.outputs] for out in outputs],
    )
