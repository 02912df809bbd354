"""Importance ratios and their capped weights: one implementation for the rollout correction and the objectives.

``rollout.is_mode`` (rlclip/is_correction.py: pi_prox / mu before the update) and
``reinforce_is``'s ``is_mode`` (pi_theta / pi_old inside the surrogate) share
the modes and bounds: with d_t the log-ratio on counted tokens (0 elsewhere and
where it is NaN), a unit's ratio is exp(clamp(d_t, -20, 20)) (token modes) or
exp(clamp(sum_s d_s, -20, 20)) broadcast over the response (sequence modes);
``*_truncate`` clamps it to [floor, cap] (TIS), ``*_mask`` zeroes it outside
(IcePop's band), ``none`` weighs 1. This module imports no objective, so both
sides can import it without a circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlclip.lazy import torch
from rlclip.objectives.kl import LOG_RATIO_CLAMP

if TYPE_CHECKING:
    from torch import Tensor

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none")


def log_ratios(logprobs: Tensor, reference_logprobs: Tensor, mask: Tensor) -> Tensor:
    """d ``[B, T]`` = logprobs - reference_logprobs, detached, on counted tokens; 0 on the others and where NaN."""
    counted = mask.bool()  # [B, T]
    diff = logprobs.detach() - reference_logprobs.detach()  # [B, T]
    return torch.where(counted & ~torch.isnan(diff), diff, torch.zeros_like(diff))


def unit_ratios(d: Tensor, mode: str) -> Tensor:
    """Each token's unit ratio ``[B, T]`` from ``d``: its own (token modes) or its response's (sequence modes)."""
    log_r = d.sum(-1, keepdim=True).expand_as(d) if mode.startswith("sequence") else d  # [B, T]
    return torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def capped_weights(ratio: Tensor, mode: str, cap: float, floor: float | None) -> Tensor:
    """The weight of each unit from its ratio: clamped to [floor, cap], zeroed outside it, or 1 (``none``)."""
    if mode.endswith("truncate"):
        return ratio.clamp(min=floor, max=cap)
    if mode.endswith("mask"):
        outside = (ratio > cap) | (ratio < floor) if floor is not None else ratio > cap
        return ratio.masked_fill(outside, 0.0)
    return torch.ones_like(ratio)
