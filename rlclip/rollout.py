"""Sampling G completions per prompt (rlclip/decoding.py's loop on the transformers model)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational, maybe_apply_chat_template

from rlclip.decoding import decode
from rlclip.fsdp import synced_generation
from rlclip.types import RolloutBatch

# transformers 5 deprecates a name that TRL's unwrap_model_for_generation still reads before every
# generation (rollouts and held-out evaluation); the warning says nothing to an rlclip user and splits
# the progress bar.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class SamplingSettings:
    """Decoding settings for one rollout."""

    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int | None = None
    min_new_tokens: int = 0


def prompt_texts(prompts: list[Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Render prompts to text: chat messages through the tokenizer's chat template."""
    return [maybe_apply_chat_template({"prompt": p}, tokenizer)["prompt"] for p in prompts]


def completion_mask_and_truncation(completion_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Mask of tokens up to and including the first EOS, and rows that never emitted EOS.

    Returns ``mask [B, T]`` (long) and ``truncated [B]`` (bool).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))  # [B, T]
    has_eos = is_eos.any(-1)  # [B]
    first_eos = torch.where(has_eos, is_eos.float().argmax(-1), completion_ids.shape[1])  # [B]
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # [T]
    mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()  # [B, T]
    return mask, ~has_eos


def eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion (generation config and tokenizer)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def sample_completions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
                       settings: SamplingSettings, device: torch.device) -> RolloutBatch:
    """Sample ``group_size`` completions for each record's ``prompt``.

    ``model`` must be the unwrapped model (see ``trl.models.unwrap_model_for_generation``).
    Prompts are left-padded; generation stops at EOS or ``max_new_tokens``;
    rows that hit the limit are flagged in ``truncated``. Other record fields
    are kept as ``columns`` for the reward functions. ``sampler_logprobs`` holds
    log mu(a_t) of the decoding loop (rlclip/decoding.py): each token's log-prob
    under the distribution it was sampled from, 0 off the completion mask.
    """
    group = settings.group_size
    prompts = [r["prompt"] for r in records]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompt_texts(prompts, tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]  # [n, P]
    overflow = 0
    if settings.max_prompt_length is not None and input_ids.shape[1] > settings.max_prompt_length:
        # left padding: the last columns hold every prompt's end, so this cuts long prompts from the left
        overflow = int((attention_mask.sum(-1) > settings.max_prompt_length).sum())
        input_ids = input_ids[:, -settings.max_prompt_length:]
        attention_mask = attention_mask[:, -settings.max_prompt_length:]
    stop_ids = eos_ids(model, tokenizer)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # [n, P]
    # one prefill per prompt, its cache repeated for the group (rlclip/decoding.py)
    completion_ids, sampler_logprobs = decode(
        model, input_ids, attention_mask, group, settings.max_new_tokens, stop_ids, tokenizer.pad_token_id,
        temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        min_new_tokens=settings.min_new_tokens, synced=synced_generation(model))  # [B, T]; FSDP: all step until all end
    prompt_ids = input_ids.repeat_interleave(group, dim=0)  # [B, P]
    prompt_mask = attention_mask.repeat_interleave(group, dim=0)  # [B, P]
    completion_mask, truncated = completion_mask_and_truncation(completion_ids, stop_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    sampler_logprobs = sampler_logprobs.masked_fill(completion_mask == 0, 0.0)  # [B, T] float32, log mu(a_t)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    chat = bool(prompts) and is_conversational({"prompt": prompts[0]})
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    columns = {k: [r[k] for r in records for _ in range(group)] for k in records[0] if k != "prompt"}
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, truncated=truncated,
        prompts=[p for p in prompts for _ in range(group)], completions=completions, columns=columns,
        prompts_truncated=overflow, sampler_logprobs=sampler_logprobs,
    )


def limit_prompts(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, model_config: Any,
                  rollout: Any, say: Any) -> tuple[int | None, list[dict[str, Any]]]:
    """The prompt-length limit, and the records kept under it.

    The limit is ``rollout.max_prompt_length`` or the model's context length
    minus ``max_new_tokens``. ``prompt_overflow="reject"`` drops longer
    prompts here, once, and says how many; ``truncate_left`` keeps them and
    each rollout cuts them from the left (counted in ``rollout/prompts_truncated``).
    """
    from rlclip.errors import ConfigError

    limit = rollout.max_prompt_length
    context = getattr(model_config, "max_position_embeddings", None)
    if limit is None and context:
        limit = context - rollout.max_new_tokens
        if limit < 1:
            raise ConfigError(f"rollout.max_new_tokens={rollout.max_new_tokens} leaves no room for a prompt in the "
                              f"model's context of {context} tokens; lower rollout.max_new_tokens")
    if limit is None or rollout.prompt_overflow != "reject":
        return limit, records
    texts = prompt_texts([r["prompt"] for r in records], tokenizer)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [r for r, n in zip(records, lengths) if n <= limit]
    if not kept:
        raise ConfigError(f"every prompt is longer than rollout.max_prompt_length={limit} tokens; raise it or set "
                          "rollout.prompt_overflow: truncate_left")
    if len(kept) < len(records):
        say(f"rejected {len(records) - len(kept)} of {len(records)} prompts longer than {limit} tokens "
            "(rollout.prompt_overflow: reject)")
    return limit, kept
