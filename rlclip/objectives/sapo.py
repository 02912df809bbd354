"""SAPO: soft adaptive policy optimisation, a sigmoid gate instead of a hard clip (arXiv 2511.20347)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics, sequence_log_ratio
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

LEVELS = ("token", "sequence")


@register_objective("sapo")
class SAPO(Objective):
    """Soft Adaptive Policy Optimisation (Gao et al. 2025, arXiv 2511.20347).

    rho = exp(clamp(logprobs - old_logprobs, -20, 20)) (or GSPO's sequence
    ratio with ``level="sequence"``), tau = tau_pos where A > 0 else tau_neg,
    f(rho) = sigmoid(tau (rho - 1)) * 4 / tau, L = -A * f(rho).

    dL/dlogprobs = -A * 4 sigmoid(x)(1 - sigmoid(x)) * rho with x = tau (rho - 1):
    at rho = 1 it is the policy gradient -A; as rho leaves 1 the weight decays
    smoothly (faster for larger tau) instead of dropping to 0 at a hard clip.
    As tau -> 0 the gate tends to the unclipped ratio loss -A * rho (up to a
    constant); a larger tau_neg damps negative-advantage updates more.

    Same as TRL's ``loss_type="sapo"`` (``sapo_temperature_pos`` /
    ``sapo_temperature_neg`` -> ``tau_pos`` / ``tau_neg``, its ``grpo``
    aggregation = ``seq_mean_token_mean``) and verl's ``sapo`` (``tau_pos`` /
    ``tau_neg``, token level, forced ``seq-mean-token-mean``).

    Defaults: tau_pos = 1.0, tau_neg = 1.05 (TRL's GRPOConfig defaults, from
    the paper), ``agg = seq_mean_token_mean`` (TRL and verl), ``level = token``.

    Args:
        tau_pos: gate temperature (> 0) of tokens with A > 0.
        tau_neg: gate temperature (> 0) of tokens with A <= 0.
        level: ``token`` or ``sequence`` (TRL's importance_sampling_level).

    Metrics: ``gate_weight_mean`` (the gradient weight 4 s(1 - s) rho over the
    counted tokens), ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, tau_pos: float = 1.0, tau_neg: float = 1.05, level: str = "token",
                 agg: str = "seq_mean_token_mean", **shared: Any) -> None:
        super().__init__(agg=agg, **shared)
        if not (tau_pos > 0 and tau_neg > 0):
            raise ConfigError(f"sapo: tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
        if level not in LEVELS:
            raise ConfigError(f"sapo: level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.tau_pos, self.tau_neg, self.level = float(tau_pos), float(tau_neg), level

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        if self.level == "sequence":
            log_ratio = sequence_log_ratio(batch.logprobs, batch.old_logprobs, batch.mask)  # [B, T]
        else:
            log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        tau = torch.where(batch.advantages > 0, ratio.new_tensor(self.tau_pos), ratio.new_tensor(self.tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau)  # [B, T]
        loss = -batch.advantages * gate
        s = torch.sigmoid(tau * (ratio.detach() - 1))
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, {})
        metrics["gate_weight_mean"] = masked_mean(4 * s * (1 - s) * ratio.detach(), batch.mask)
        return loss, metrics
