"""PPO mode's critic: a value model, its clipped loss and explained variance.

The critic is the policy's architecture with a scalar head
(``AutoModelForTokenClassification`` with one label), initialised from the
policy checkpoint or a reward model. Objectives never see it: they get
advantages only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from rlclip.errors import ConfigError
from rlclip.modeling import DTYPES
from rlclip.objectives.base import aggregate, masked_mean
from rlclip.policy import position_ids_from_mask
from rlclip.types import ObjectiveOutput


def load_critic(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                lora_r: int = 0, lora_alpha: int = 32) -> nn.Module:
    """A one-output token-classification model; its head is new unless the checkpoint has one."""
    from transformers import AutoModelForTokenClassification

    try:
        critic = AutoModelForTokenClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load critic from {name_or_path!r}: {str(err).splitlines()[0]}; "
                          "set critic.name_or_path to a causal LM or reward model directory") from None
    if critic.config.pad_token_id is None:
        critic.config.pad_token_id = critic.config.eos_token_id
    if lora_r:
        from peft import LoraConfig, get_peft_model

        # Adapters on the body's linear layers; the new value head is trained in full (modules_to_save).
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in critic.named_modules()
                          if isinstance(module, nn.Linear) and ".layers." in name})
        critic = get_peft_model(critic, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=targets,
                                                   modules_to_save=["score"], task_type="TOKEN_CLS"))
    return critic


def completion_values(critic: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor) -> Tensor:
    """V(s_t) ``[B, T]``: the value at the position that emits completion token t."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # [B, P+T]
    out = critic(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    start = prompt_ids.shape[1] - 1
    return out.logits[:, start:start + completion_ids.shape[1], 0].float()  # [B, T]


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor,
                       value_clip: float | None) -> tuple[Tensor, Tensor]:
    """Per-token PPO value loss 0.5 * max((V - R)^2, (V_clip - R)^2).

    V_clip = V_old + clamp(V - V_old, -value_clip, value_clip); no clipping when
    ``value_clip`` is None. Returns the loss ``[B, T]`` and where the clipped
    branch is the larger one (it then carries the gradient, which is zero).
    """
    plain = (values - returns).square()  # [B, T]
    if value_clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped = (clipped_values - returns).square()  # [B, T]
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def explained_variance(returns_var: Tensor, residual_var: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] (1: perfect, 0: no better than a constant).

    Takes the variances so the caller can pass global ones (``utils.global_moments``). Undefined
    (NaN, logged as null) when the returns do not vary, e.g. every reward 0: dividing by a clamped
    zero would log values like -2e10 that mean nothing.
    """
    returns_var = torch.as_tensor(returns_var)
    defined = returns_var > 1e-10
    return torch.where(defined, 1 - residual_var / returns_var.clamp_min(1e-10), torch.full_like(returns_var, math.nan))


def value_loss(critic: nn.Module, micro: Any, num_tokens: Tensor, value_clip: float | None) -> ObjectiveOutput:
    """The clipped value loss of a micro-batch (a ``RolloutBatch``), token mean over the global token count."""
    values = completion_values(critic, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                               micro.completion_mask)  # [b, T]
    per_token, clipped = clipped_value_loss(values, micro.old_values, micro.returns, value_clip)  # [b, T]
    mask = micro.completion_mask.to(values.dtype)  # [b, T]
    return ObjectiveOutput(loss=aggregate(per_token, mask, "token_mean", num_tokens),
                           metrics={"value_clip_frac": masked_mean(clipped.to(values.dtype), mask),
                                    "values_mean": masked_mean(values.detach(), mask)})


def gae_advantages(rollout: Any, cfg: Any, accelerator: Any) -> dict[str, float]:
    """PPO mode's advantage stage: GAE over the rollout's outcome rewards (plus the KL to the reference folded
    in with ``kl_in_reward``) and the critic's values, whitened over all processes; sets ``rollout.advantages``
    and ``rollout.returns`` and returns ``critic/...`` metrics. ``cfg``: the ``advantage`` config section."""
    from rlclip import advantages as adv_lib
    from rlclip.utils import global_moments

    mask = rollout.completion_mask  # [N, T]
    kl = rollout.old_logprobs - rollout.ref_logprobs if cfg.kl_in_reward > 0 else None  # [N, T]
    token_rewards = adv_lib.outcome_token_rewards(rollout.rewards, mask, kl, cfg.kl_in_reward)  # [N, T]
    advantages, rollout.returns = adv_lib.gae(token_rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten:
        advantages = adv_lib.whiten(advantages, mask, *global_moments(accelerator, advantages, mask))
    rollout.advantages = advantages.float()  # [N, T]
    ret_mean, ret_var = global_moments(accelerator, rollout.returns, mask)
    _, residual_var = global_moments(accelerator, rollout.returns - rollout.old_values, mask)
    return {"critic/returns_mean": float(ret_mean), "critic/returns_std": float(ret_var.sqrt()),
            "critic/explained_variance": float(explained_variance(ret_var, residual_var))}
