"""A user-defined objective: REINFORCE with a baseline, optionally importance-weighted.

Per token, with A the advantage (GRPO's group baseline is already subtracted in it),

    is_weight: none    L = -A * logprobs                      (on-policy REINFORCE; dL/dlogprobs = -A)
    is_weight: ratio   L = -sg(rho) * A * logprobs            (off-policy correction; dL/dlogprobs = -rho A)

with rho = exp(logprobs - old_logprobs). No clip and no trust region: it is the
baseline every shipped objective improves on. Registered as ``custom_reinforce``;
select it in a recipe with ``imports: [recipes/custom_objective.py]`` and
``objective: {name: custom_reinforce}``.
"""

from typing import Any

import torch

from rlclip.errors import ConfigError
from rlclip.objectives import Objective, PolicyBatch, masked_mean, register_objective

IS_WEIGHTS = ("none", "ratio")


@register_objective("custom_reinforce")
class Reinforce(Objective):
    """REINFORCE with baseline: L = -w * A * logprobs, w = 1 or sg(rho), aggregated by ``agg``.

    Args:
        is_weight: ``none`` (plain policy gradient) or ``ratio`` (weight each token by its
            importance ratio to the behaviour policy, without a gradient through it).
    """

    def __init__(self, *, is_weight: str = "none", **shared: Any) -> None:
        super().__init__(**shared)  # agg, kl_coef, token filters, ...
        if is_weight not in IS_WEIGHTS:
            raise ConfigError(f"custom_reinforce: is_weight must be one of {', '.join(IS_WEIGHTS)}, got {is_weight!r}")
        self.is_weight = is_weight

    def surrogate(self, batch: PolicyBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        ratio = torch.exp((batch.logprobs - batch.old_logprobs).detach().clamp(-20, 20))  # [B, T], no grad
        weight = ratio if self.is_weight == "ratio" else torch.ones_like(ratio)
        loss = -weight * batch.advantages * batch.logprobs  # [B, T]
        metrics = {"is_weight_mean": masked_mean(weight, batch.mask), "ratio_mean": masked_mean(ratio, batch.mask),
                   "logprob_mean": masked_mean(batch.logprobs.detach(), batch.mask)}
        return loss, metrics
