"""PSPO: probability smoothing instead of ratio clipping (arXiv 2509.21282)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import (
    LOG_RATIO_CLAMP,
    Objective,
    masked_max,
    masked_mean,
    masked_min,
    register_objective,
)
from rlclip.objectives.ratio_clip import clipped_surrogate, ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


@register_objective("pspo")
class PSPO(Objective):
    """Probability Smoothing Policy Optimisation (Dwyer, Sobey, Chapman 2025, arXiv 2509.21282).

    The current probability is smoothed toward the behaviour policy,
    p_s = (1 - alpha) p_theta + alpha p_old, so the ratio to p_old is
    r_s = (1 - alpha) * rho + alpha with rho = exp(clamp(logprobs - old_logprobs, -20, 20)).
    L = -A * r_s: no min and no clip, as the authors' code
    (github.com/MCDwyer/GR-PSPO, grpotrainer.patch: ``trust_region_method="pspo"``).

    Its gradient is exactly (1 - alpha) times the gradient of the unclipped
    ratio loss -A * rho: without ``eps`` the smoothing scales the step like
    a smaller learning rate and bounds nothing (tests/test_pspo.py).

    Args:
        alpha: smoothing strength in [0, 1]; the default 0.1 is the authors'
            (``smoothing_alpha`` in grpoconfig.patch and in their GSM8K runs).
            0 is the unclipped ratio loss, 1 has no gradient.
        eps: optional PPO clip on the smoothed ratio,
            L = max(-A r_s, -A clip(r_s, 1 - eps, 1 + eps)); None (default) disables.
    """

    def __init__(self, *, alpha: float = 0.1, eps: float | None = None, **shared: Any) -> None:
        super().__init__(**shared)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"pspo: alpha must be in [0, 1], got {alpha}")
        if eps is not None and not eps >= 0:
            raise ConfigError(f"pspo: eps must be >= 0 (or null to disable), got {eps}")
        self.alpha = float(alpha)
        self.eps = None if eps is None else float(eps)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        smoothed = (1.0 - self.alpha) * ratio + self.alpha  # [B, T]
        if self.eps is None:
            loss, active = -batch.advantages * smoothed, {}
        else:
            loss, active = clipped_surrogate(smoothed, batch.advantages, self.eps, self.eps, None)
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        s = smoothed.detach()
        metrics.update(smoothed_ratio_mean=masked_mean(s, batch.mask), smoothed_ratio_min=masked_min(s, batch.mask),
                       smoothed_ratio_max=masked_max(s, batch.mask))
        return loss, metrics
