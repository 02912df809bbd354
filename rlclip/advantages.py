"""Advantage estimators: pure functions of rewards (and values, for GAE).

Rewards are ``[N]`` with the G completions of a prompt contiguous
(row i belongs to group i // G). Results are per-sequence ``[N]``; the
trainer broadcasts them over the response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlclip.errors import ConfigError


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)  # [N/G, G]


def grpo(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """GRPO (Shao et al. 2024, arXiv 2402.03300): A_i = (r_i - mean_g) / (std_g + eps).

    ``std`` is the unbiased sample standard deviation of the group (as TRL and
    verl); ``scale=False`` gives Dr. GRPO.
    """
    groups = _groups(rewards, group_size)  # [N/G, G]
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

    Equal to G / (G - 1) * (r_i - mean_g).
    """
    if group_size < 2:
        raise ConfigError("rloo needs rollout.group_size >= 2 (a leave-one-out baseline needs two samples)")
    groups = _groups(rewards, group_size)  # [N/G, G]
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)  # [N]


ESTIMATORS = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}
