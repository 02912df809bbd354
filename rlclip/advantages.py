"""Advantage estimators: pure functions of rewards (and values, for GAE).

Rewards are ``[N]`` with the G completions of a prompt contiguous
(row i belongs to group i // G). Results are per-sequence ``[N]``; the
trainer broadcasts them over the response tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rlclip.errors import ConfigError


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)  # [N/G, G]


def _masked_groups(groups: Tensor, scale: bool, eps: float) -> Tensor:
    """GRPO over the scored members of each group (NaN = no score): those get 0, as do groups of < 2."""
    scored = ~groups.isnan()  # [N/G, G]
    n = scored.sum(-1, keepdim=True)  # [N/G, 1]
    filled = groups.nan_to_num(0.0)
    centred = torch.where(scored, filled - filled.sum(-1, keepdim=True) / n.clamp_min(1), 0.0)
    if scale:
        std = (centred.square().sum(-1, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
        centred = centred / (std + eps).clamp_min(torch.finfo(groups.dtype).tiny)
    return torch.where(n >= 2, centred, 0.0)


def grpo(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """GRPO (Shao et al. 2024, arXiv 2402.03300): A_i = (r_i - mean_g) / (std_g + eps).

    ``std`` is the unbiased sample standard deviation of the group (as TRL and
    verl); ``scale=False`` gives Dr. GRPO. A NaN reward means "no score": the
    group statistics use the scored members only, unscored members get 0, and
    a group with fewer than two scored members gets 0 everywhere (not NaN).
    """
    groups = _groups(rewards, group_size)  # [N/G, G]
    if bool(groups.isnan().any()):
        return _masked_groups(groups, scale, eps).reshape(-1)  # [N]
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        # clamp: an all-equal group has centred == 0 and must stay 0 even with eps = 0
        centred = centred / (groups.std(-1, keepdim=True) + eps).clamp_min(torch.finfo(groups.dtype).tiny)
    return centred.reshape(-1)  # [N]


def dr_grpo(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): A_i = r_i - mean_g, no std scaling."""
    return grpo(rewards, group_size, scale=False)


def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv 2402.14740): A_i = r_i - mean of the other G - 1 rewards.

    Equal to G / (G - 1) * (r_i - mean_g). NaN rewards (no score) are left
    out of the baseline and get 0, as does a group with fewer than two scored members.
    """
    if group_size < 2:
        raise ConfigError("rloo needs rollout.group_size >= 2 (a leave-one-out baseline needs two samples)")
    groups = _groups(rewards, group_size)  # [N/G, G]
    if bool(groups.isnan().any()):
        n = (~groups.isnan()).sum(-1, keepdim=True)  # [N/G, 1]
        return (n / (n - 1).clamp_min(1) * _masked_groups(groups, False, 0.0)).reshape(-1)  # [N]
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)  # [N]


GROUP_ESTIMATORS = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}
MULTI_REWARD = ("sum_then_normalize", "normalize_then_sum")


def group_advantages(rewards: Tensor, group_size: int, cfg: Any, rewards_per_func: Tensor | None = None,
                     weights: Sequence[float] | None = None,
                     all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Sequence advantages ``[N]`` of the group estimator ``cfg.name`` under ``cfg.multi_reward``.

    ``sum_then_normalize`` (default): the estimator on the weighted reward sum ``rewards [N]``.
    ``normalize_then_sum``: :func:`normalize_then_sum` on ``rewards_per_func [N, F]`` and ``weights``;
    rows whose ``rewards`` is NaN (unscored) take no part. ``all_sum`` sums a tensor over processes.
    """
    kwargs = {"eps": cfg.eps} if cfg.name == "grpo" else {}
    multi = getattr(cfg, "multi_reward", "sum_then_normalize")
    if multi == "sum_then_normalize":
        return GROUP_ESTIMATORS[cfg.name](rewards, group_size, **kwargs)
    if multi != "normalize_then_sum":
        raise ConfigError(f"unknown advantage.multi_reward {multi!r}; choose {' or '.join(MULTI_REWARD)}")
    if rewards_per_func is None or weights is None:
        raise ValueError("advantage.multi_reward=normalize_then_sum needs each reward function's scores "
                         "(RolloutBatch.rewards_per_func) and the reward weights")
    per_func = rewards_per_func.float().masked_fill(rewards.isnan().unsqueeze(-1), math.nan)  # [N, F]
    return normalize_then_sum(per_func, weights, group_size, cfg.name, cfg.eps, all_sum)


def normalize_then_sum(rewards_per_func: Tensor, weights: Sequence[float], group_size: int,
                       estimator: str = "grpo", eps: float = 1e-4,
                       all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """GDPO (Liu et al. 2026, arXiv 2601.05242; TRL 1.16's ``multi_objective_aggregation="normalize_then_sum"``).

    Each reward function k is normalised within its groups first, A_k = estimator(r_k) (GRPO:
    (r_k - mean_g) / (std_g + eps)), then summed with the reward weights, s = sum_k w_k A_k, then
    whitened over the batch: A = (s - mean(s)) / (std(s) + eps), std unbiased. A NaN score (a reward
    function returned None) leaves its function's group statistics and adds 0 to the sum; a row with
    no score at all leaves the batch statistics and gets 0, as does everything when fewer than two rows
    are scored. The batch is global: ``all_sum`` sums over processes (None: this process alone).
    """
    if rewards_per_func.ndim != 2 or rewards_per_func.shape[1] != len(weights):
        raise ValueError(f"rewards_per_func of shape {tuple(rewards_per_func.shape)} does not have one column "
                         f"per reward weight ({len(weights)})")
    kwargs = {"eps": eps} if estimator == "grpo" else {}
    per_func = torch.stack([GROUP_ESTIMATORS[estimator](rewards_per_func[:, k].contiguous(), group_size, **kwargs)
                            for k in range(len(weights))], dim=1)  # [N, F], 0 where unscored
    w = torch.tensor(list(weights), dtype=per_func.dtype, device=per_func.device)  # [F]
    summed = (per_func * w).sum(-1)  # [N]
    return batch_normalize(summed, ~rewards_per_func.isnan().all(-1), eps, all_sum)


def batch_normalize(values: Tensor, valid: Tensor, eps: float = 1e-4,
                    all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x - mean) / (std + eps) over the ``valid [N]`` rows of the global batch (unbiased std); 0 elsewhere.

    Two passes (the mean, then the squared deviations), each summed over processes by ``all_sum``.
    Fewer than two valid rows in all: 0 everywhere.
    """
    all_sum = all_sum or (lambda t: t)
    valid_f = valid.to(values.dtype)  # [N]
    totals = all_sum(torch.stack([valid_f.sum(), (values * valid_f).sum()]).double())  # [2]
    n, mean = totals[0], totals[1] / totals[0].clamp_min(1)
    squares = all_sum((((values.double() - mean) * valid_f.double()).square()).sum())
    std = (squares / (n - 1).clamp_min(1)).sqrt()
    normalized = ((values.double() - mean) / (std + eps)).to(values.dtype)  # [N]
    return torch.where(valid & (n >= 2), normalized, torch.zeros_like(values))


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438).

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last counted token is 0),
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t.
    All inputs ``[B, T]`` with right padding; padded positions get 0 and do
    not affect counted ones. gamma = lam = 1 gives R_t = sum_{k >= t} r_k;
    lam = 0 gives the one-step TD error.
    """
    mask = mask.to(values.dtype)
    rewards, values = token_rewards * mask, values * mask  # [B, T]
    advantages = torch.zeros_like(values)  # [B, T]
    next_value = torch.zeros_like(values[:, 0])  # [B]
    running = torch.zeros_like(values[:, 0])  # [B]
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def outcome_token_rewards(rewards: Tensor, mask: Tensor, kl: Tensor | None = None,
                          kl_coef: float = 0.0) -> Tensor:
    """Token-level rewards: the outcome reward on each response's last counted token,
    minus ``kl_coef * kl`` on every token when a KL penalty is folded into the reward.
    """
    mask = mask.to(torch.float32)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # [B, T]: the final counted token
    token_rewards = last.float() * rewards.unsqueeze(-1).float()  # [B, T]
    if kl is not None and kl_coef:
        token_rewards = token_rewards - kl_coef * kl.float() * mask
    return token_rewards


def whiten(values: Tensor, mask: Tensor, mean: Tensor, var: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) on counted tokens, 0 elsewhere.

    ``mean`` and ``var`` are those of the counted values of the *global*
    batch (the trainer all-reduces them), so every process whitens alike.
    """
    return (values - mean) * torch.rsqrt(var + eps) * mask.to(values.dtype)
