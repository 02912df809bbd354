"""A user-defined objective: CISPO, a policy gradient with a clipped, stop-gradient importance weight.

CISPO (MiniMax-M1, arXiv 2506.13585; used by ScaleRL, arXiv 2510.13786). Per token,

    rho = exp(logprobs - old_logprobs)
    w   = sg(clip(rho, 1 - eps_low, eps_max))     (no lower bound when eps_low is None)
    L   = -w * A * logprobs                       so dL/dlogprobs = -w * A

Unlike PPO's clip, no token loses its gradient when its ratio leaves the
range: the importance weight is capped, not the update. Registered as
``custom_cispo``; select it in a recipe with
``imports: [recipes/custom_objective.py]`` and ``objective: {name: custom_cispo}``.
"""

from typing import Any

import torch

from rlclip.errors import ConfigError
from rlclip.objectives import Objective, PolicyBatch, masked_mean, register_objective


@register_objective("custom_cispo")
class CISPO(Objective):
    """CISPO: L = -sg(clip(rho, 1 - eps_low, eps_max)) * A * logprobs, aggregated by ``agg``.

    Args:
        eps_max: cap on the importance weight (5.0: TRL's documented CISPO value, from ScaleRL).
        eps_low: optional lower bound 1 - eps_low on the weight; None (MiniMax-M1) has none.
    """

    def __init__(self, *, eps_max: float = 5.0, eps_low: float | None = None, **shared: Any) -> None:
        super().__init__(**shared)  # agg, agg_norm_len, kl_coef, kl_estimator
        if not eps_max > 0 or (eps_low is not None and not 0 <= eps_low <= 1):
            raise ConfigError(f"custom_cispo: need eps_max > 0 and eps_low in [0, 1] or null, got {eps_max}, {eps_low}")
        self.eps_max, self.eps_low = float(eps_max), eps_low

    def surrogate(self, batch: PolicyBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        ratio = torch.exp((batch.logprobs - batch.old_logprobs).detach().clamp(-20, 20))  # [B, T], no grad
        weight = ratio.clamp(min=None if self.eps_low is None else 1 - self.eps_low, max=self.eps_max)
        loss = -weight * batch.advantages * batch.logprobs  # [B, T]
        metrics = {"is_weight_mean": masked_mean(weight, batch.mask), "ratio_mean": masked_mean(ratio, batch.mask),
                   "truncated_frac": masked_mean((ratio > self.eps_max).to(ratio.dtype), batch.mask)}
        return loss, metrics
