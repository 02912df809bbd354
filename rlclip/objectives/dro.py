"""DRO: the policy gradient with a quadratic log-ratio penalty, no clip (verl's ``dro`` policy loss)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


def squared_log_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """(log pi_theta - log pi_old)^2 ``[B, T]``, with the gradient 2 (log pi_theta - log pi_old).

    The penalty of DRO (``beta / 2`` times this) and of prime-rl's default loss
    (``kl_tau`` times this): zero with zero gradient on-policy, a pull back to
    pi_old growing linearly in the log-ratio. Not clamped (a polynomial cannot
    overflow; verl and prime-rl do not clamp it either).
    """
    return (logprobs - old_logprobs) ** 2  # [B, T]


@register_objective("dro")
class DRO(Objective):
    """DRO, Direct Reward Optimization's policy loss (Richemond et al. 2024, arXiv 2405.19107), as verl's ``dro``.

    L_t = -[logprobs_t * A_t - beta / 2 * (logprobs_t - old_logprobs_t)^2]

    dL/dlogprobs = -A + beta * (logprobs - old_logprobs)

    No importance ratio and no clip: the plain policy gradient (``gpg``) plus a
    quadratic penalty on the log-ratio to the behaviour policy, which is zero
    with zero gradient on-policy (so on-policy DRO is REINFORCE, a test) and
    otherwise pulls each token back toward pi_old. (The DRO paper's penalty
    is to a fixed reference policy in an offline setting; verl, and this
    objective, take the policy that sampled the batch.)

    Peer: verl's ``compute_policy_loss_dro`` (github.com/verl-project/verl at
    commit 1dda039b9c6311889a9c9a26040677e1254814f9, verl/trainer/ppo/core_algos.py
    lines 2013-2043: the loss at lines 2031-2032, the rollout-correction weights
    multiplying the whole per-token loss at 2034-2035, ``agg_loss`` at 2037;
    added in verl PR #7245, commit ddfbf4ea01b27ab47ac9de50514a9c9dcb631e7a).
    ``beta`` is verl's ``policy_loss.dro_beta``; verl has no default (null, and
    it raises unless beta > 0, lines 2028-2029): 0.05 here is the value of the
    PR's usage example. Aggregation ``token_mean``, verl's ``loss_agg_mode`` default.

    Args:
        beta: weight > 0 of the penalty beta / 2 * (log-ratio)^2.

    Metrics: ``penalty_mean`` (mean beta / 2 * (log-ratio)^2), ``log_ratio_mean``
    (mean logprobs - old_logprobs; verl logs its negative as ``ppo_kl``),
    ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, beta: float = 0.05, **shared: Any) -> None:
        super().__init__(**shared)
        if not beta > 0:
            raise ConfigError(f"dro: beta must be > 0 (verl's dro_beta; its usage example sets 0.05), got {beta}")
        self.beta = float(beta)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        penalty = 0.5 * self.beta * squared_log_ratio(batch.logprobs, batch.old_logprobs)  # [B, T]
        loss = -(batch.logprobs * batch.advantages - penalty)  # [B, T]
        log_ratio = (batch.logprobs - batch.old_logprobs).detach()  # [B, T]
        clamped = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        metrics = ratio_metrics(clamped.exp(), clamped, batch.mask, {})
        metrics["penalty_mean"] = masked_mean(penalty.detach(), batch.mask)
        metrics["log_ratio_mean"] = masked_mean(log_ratio, batch.mask)
        return loss, metrics
