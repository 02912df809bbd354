"""GMPO: geometric-mean policy optimisation (arXiv 2507.20673; verl's ``geo_mean``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


@register_objective("gmpo")
class GMPO(Objective):
    """Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv 2507.20673).

    GRPO maximises the arithmetic mean of the token terms rho_t A; GMPO the
    geometric mean, which one outlier ratio cannot dominate. Per response i,
    with l_t = clamp(logprobs_t - old_logprobs_t, -20, 20) and sign sigma = sign(A_t):

        c_t  = sigma * min(sigma * l_t, sigma * clamp(l_t, -eps_low, eps_high))   (clip in log space,
               only on the side that the advantage pushes: upper for A > 0, lower for A < 0)
        s_i  = exp(mean_t c_t)          (geometric mean of the clipped token ratios)
        L_i  = -mean_t(A_t) * s_i

    and the loss is the mean of L_i over sequences: as verl's
    ``compute_policy_loss_geo_mean`` (verl/trainer/ppo/core_algos.py), which
    ignores ``loss_agg_mode``. Here every token of response i carries L_i and
    the default ``agg = seq_mean_token_mean`` averages it back to L_i per
    sequence (``token_mean`` would weight sequences by length instead).
    The gradient w.r.t. logprobs_t is -mean(A) * s_i / |y_i| where c_t is
    unclipped, 0 where clipped. With one token per response GMPO is
    ``ratio_clip`` with eps_low' = 1 - exp(-eps_low), eps_high' = exp(eps_high) - 1.

    Defaults: eps_low = eps_high = 0.4 in log space, i.e. the ratio range
    (e^-0.4, e^0.4), from the GMPO paper and verl's examples/gmpo_trainer
    (``clip_ratio_low = clip_ratio_high = 0.4``, loss_mode ``geo_mean``).
    verl divides the sums by |y_i| + 1e-8, this code by max(|y_i|, 1).

    Args:
        eps_low: log-space lower clip (negative advantages).
        eps_high: log-space upper clip (positive advantages).

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` (a clip binds), ``seq_ratio_mean``
    (s_i over counted tokens), token ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, eps_low: float = 0.4, eps_high: float = 0.4, agg: str = "seq_mean_token_mean",
                 **shared: Any) -> None:
        super().__init__(agg=agg, **shared)
        if not (eps_low >= 0 and eps_high >= 0):
            raise ConfigError(f"gmpo: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        mask = batch.mask.to(batch.logprobs.dtype)
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
        sign = torch.sign(batch.advantages)
        clamped = log_ratio.clamp(-self.eps_low, self.eps_high)
        clipped = sign * torch.minimum(sign * log_ratio, sign * clamped)  # [B, T]
        count = mask.sum(-1).clamp_min(1)  # [B]
        seq_ratio = torch.exp((clipped * mask).sum(-1) / count)  # [B]
        seq_adv = (batch.advantages * mask).sum(-1) / count  # [B]
        loss = (-seq_adv * seq_ratio).unsqueeze(-1).expand_as(log_ratio)  # [B, T]: L_i on each token
        active = {"low": (batch.advantages < 0) & (log_ratio < -self.eps_low),
                  "high": (batch.advantages > 0) & (log_ratio > self.eps_high)}
        metrics = ratio_metrics(torch.exp(log_ratio), log_ratio, batch.mask, active)
        metrics["seq_ratio_mean"] = masked_mean(seq_ratio.detach().unsqueeze(-1).expand_as(mask), mask)
        return loss, metrics
