"""The reward stage of a rollout: weighted reward functions, masking of unscored completions, metrics.

``score_rollout`` sets ``rollout.rewards`` (``[N]``, NaN where no reward function gave a score),
each function's scores ``rollout.rewards_per_func`` and the prompt groups ``rollout.group_ids``,
zeroes the completion mask of unscored completions so they leave the loss, and returns the
rollout's reward and completion metrics over all processes (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator

from rlclip.errors import ConfigError
from rlclip.rewards import compute_reward_table, resolve_reward_func
from rlclip.types import RolloutBatch
from rlclip.utils import all_reduce


def score_rollout(rollout: RolloutBatch, reward_funcs: Sequence[Callable[..., Any]], reward_weights: Sequence[float],
                  on_error: str, group_size: int, acc: Accelerator) -> tuple[dict[str, float], bool]:
    """Score ``rollout`` in place; returns its metrics and whether any completion on any process was scored."""
    ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.completion_ids, rollout.completion_mask)]
    rewards, per_func, reward_metrics = compute_reward_table(reward_funcs, reward_weights, rollout.prompts,
                                                             rollout.completions, rollout.columns, on_error,
                                                             completion_ids=ids)
    rollout.rewards = rewards.to(acc.device)  # [N], NaN: no score
    rollout.rewards_per_func = per_func.to(acc.device)  # [N, F], for advantage.multi_reward
    rollout.group_ids = torch.arange(len(rollout), device=acc.device) // group_size  # [N], for agg: prompt_mean
    all_rewards = acc.gather(rollout.rewards)  # [N * processes]
    lengths = acc.gather(rollout.completion_mask.sum(-1).float())
    truncated = acc.gather(rollout.truncated.float())
    scored = ~all_rewards.isnan()
    group_std = all_rewards.view(-1, group_size).std(-1) if group_size > 1 else torch.zeros(1)
    counts = {k: reward_metrics.pop(k) for k in ("reward/errors", "reward/unscored")}
    metrics = {k: all_reduce(acc, torch.tensor(v, device=acc.device), "mean").item() for k, v in reward_metrics.items()}
    metrics.update({k: all_reduce(acc, torch.tensor(v, device=acc.device), "sum").item() for k, v in counts.items()})
    metrics.update({
        "reward/mean": all_rewards[scored].mean().item() if bool(scored.any()) else 0.0,
        "reward/std": all_rewards[scored].std().item() if int(scored.sum()) > 1 else 0.0,
        "reward/zero_std_frac": (group_std.nan_to_num(0.0) == 0).float().mean().item(),
        "completions/mean_length": lengths.mean().item(), "completions/truncated_frac": truncated.mean().item(),
    })
    unscored = rollout.rewards.isnan()  # [N]
    rollout.completion_mask = rollout.completion_mask * (~unscored).unsqueeze(1).to(rollout.completion_mask.dtype)
    return metrics, bool(scored.any())


def reward_functions(specs: Sequence[Any], funcs: Sequence[Callable[..., Any]] | None,
                     weights: Sequence[float] | None) -> tuple[list[Callable[..., Any]], list[float]]:
    """The run's reward functions and weights: Python ``funcs`` when given (weights default to 1), else the
    config's ``reward.funcs`` ``specs`` resolved by name."""
    if funcs is None:
        return [resolve_reward_func(s.name, s.kwargs) for s in specs], [s.weight for s in specs]
    funcs = list(funcs)
    weights = list(weights) if weights is not None else [1.0] * len(funcs)
    if not funcs or len(weights) != len(funcs) or not all(callable(f) for f in funcs):
        raise ConfigError("reward_funcs must be a non-empty list of callables with one weight each")
    return funcs, weights
