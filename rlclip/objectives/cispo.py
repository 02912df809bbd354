"""CISPO: clipped importance-sampling-weight policy optimisation (MiniMax-M1, arXiv 2506.13585)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


@register_objective("cispo")
class CISPO(Objective):
    """CISPO (MiniMax-M1, arXiv 2506.13585; ScaleRL, arXiv 2510.13786).

    rho = exp(clamp(logprobs - old_logprobs, -20, 20)),
    w = sg(clip(rho, 1 - eps_low, 1 + eps_high)) (no lower bound when eps_low is None),
    L = -w * A * logprobs, so dL/dlogprobs = -w * A.

    Unlike PPO's clip, no token loses its gradient when its ratio leaves the
    range: the importance weight is capped, not the update.

    ``eps_low`` / ``eps_high`` are clip ranges around 1, as in the paper's
    clip(r, 1 - eps_low, 1 + eps_high), verl's ``cispo`` (``clip_ratio_low`` /
    ``clip_ratio_high``) and ``ratio_clip``. TRL's ``epsilon_high`` for
    ``loss_type="cispo"`` is the cap itself (``clamp(coef_1, max=epsilon_high)``,
    no floor): TRL ``epsilon_high = c`` is ``eps_high = c - 1, eps_low = None`` here.

    Defaults: eps_high = 4.0, i.e. the cap 5.0 that TRL documents for CISPO
    (the ScaleRL paper's epsilon_max, arXiv 2510.13786); eps_low = None as
    MiniMax-M1 and TRL (no floor). Aggregation ``token_mean`` as MiniMax-M1
    and TRL (which normalise CISPO by the global token count, like ``dapo``).

    Args:
        eps_high: the weight is capped at 1 + eps_high (eps_high >= 0).
        eps_low: optional floor 1 - eps_low on the weight, eps_low in [0, 1]; None: no floor.

    Metrics: ``clip_frac_high`` (rho > 1 + eps_high with A > 0, TRL's ``cispo_clip_ratio``),
    ``clip_frac_weight`` (weight capped or floored, any advantage), ``is_weight_mean``,
    ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, eps_high: float = 4.0, eps_low: float | None = None, **shared: Any) -> None:
        super().__init__(**shared)
        if not eps_high >= 0:
            raise ConfigError(f"cispo: eps_high must be >= 0 (the weight cap is 1 + eps_high; TRL's "
                              f"epsilon_high = 5.0 is eps_high = 4.0), got {eps_high}")
        if eps_low is not None and not 0 <= eps_low <= 1:
            raise ConfigError(f"cispo: eps_low must be in [0, 1] (or null for no floor), got {eps_low}")
        self.eps_high = float(eps_high)
        self.eps_low = None if eps_low is None else float(eps_low)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T], no grad
        floor = None if self.eps_low is None else 1.0 - self.eps_low
        cap = 1.0 + self.eps_high
        weight = ratio.clamp(min=floor, max=cap)  # [B, T]
        loss = -weight * batch.advantages * batch.logprobs  # [B, T]
        active = {"high": (ratio > cap) & (batch.advantages > 0), "weight": weight != ratio}
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        metrics["is_weight_mean"] = masked_mean(weight, batch.mask)
        return loss, metrics
