"""SPO: Simple Policy Optimization, a quadratic ratio penalty instead of PPO's clip (arXiv 2401.16025)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


@register_objective("spo")
class SPO(Objective):
    """Simple Policy Optimization (Xie, Zhang, Yang, Hutter, Xu; ICML 2025, arXiv 2401.16025).

    With rho = exp(clamp(logprobs - old_logprobs, -20, 20)) (carrying the gradient):

        L_t = -[A_t * rho_t - |A_t| * (rho_t - 1)^2 / (2 * eps)]

        dL/dlogprobs = -rho * (A - |A| (rho - 1) / eps)

    PPO's clip leaves a token with no gradient once its ratio is outside
    [1 - eps, 1 + eps], whatever it does next; SPO keeps every token's
    gradient and pulls the ratio back instead. Per token the objective is a
    concave parabola in rho whose maximum is at rho = 1 + eps for A > 0 and
    rho = 1 - eps for A < 0: the edge of PPO's trust region, where the
    gradient is zero (a test), and beyond which it points back inside. At
    rho = 1 the gradient is -A, the policy gradient (as ``ratio_clip``'s and
    ``gpg``'s); the penalty's gradient grows as |A| (rho - 1) / eps.

    Peer: the authors' code, github.com/MyRepositories-hub/Simple-Policy-Optimization
    at commit 9fdeda315b00cee82d1dc4e10c01db200c97e909, atari/trainer.py lines
    88-92 and mujoco/trainer.py lines 105-109 (``compute_policy_loss`` with
    ``algo == 'spo'``: the penalised ratio, averaged over the mini-batch, ratio
    from the unclamped log-ratio at lines 29-30 / 33-34). Default eps = 0.2:
    ``--epsilon`` in atari/main.py line 42 and mujoco/main.py line 35 (also
    PPO's clip range there). rlclip clamps the log-ratio to [-20, 20] before
    exp, as for every ratio objective (no difference unless a ratio passes
    e^20). Aggregation ``token_mean`` (the authors' plain ``.mean()`` over
    actions; for LLMs the token mean).

    Args:
        eps: trust-region radius eps > 0 of the penalty |A| (rho - 1)^2 / (2 eps).

    Metrics: ``outside_frac`` (tokens with |rho - 1| > eps, where PPO's clip would
    be active in some direction), ``penalty_mean`` (mean |A| (rho - 1)^2 / (2 eps)),
    ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, eps: float = 0.2, **shared: Any) -> None:
        super().__init__(**shared)
        if not eps > 0:
            raise ConfigError(f"spo: eps must be > 0 (the trust-region radius; the SPO authors use 0.2), got {eps}")
        self.eps = float(eps)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T], carries the gradient
        adv = batch.advantages
        penalty = adv.abs() * (ratio - 1) ** 2 / (2 * self.eps)  # [B, T]
        loss = -(adv * ratio - penalty)  # [B, T]
        outside = ((ratio.detach() - 1).abs() > self.eps)  # [B, T] bool
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, {})
        metrics["outside_frac"] = masked_mean(outside.to(ratio.dtype), batch.mask)
        metrics["penalty_mean"] = masked_mean(penalty.detach(), batch.mask)
        return loss, metrics
