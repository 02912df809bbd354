"""TOPR: Tapered Off-Policy REINFORCE, no IS weight on positive examples, truncated on negative (arXiv 2503.14286)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.objectives.reinforce_is import importance_weight
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

LEVELS = ("sequence", "token")


@register_objective("topr")
class TOPR(Objective):
    """Tapered Off-Policy REINFORCE (Le Roux, Bellemare et al. 2025, arXiv 2503.14286).

    REINFORCE whose importance weight depends on the sign of the advantage:

        w_t = 1                                  where A_t >= 0
        w_t = sg(clamp(rho, 0, is_cap))          where A_t < 0
        L_t = -A_t * w_t * logprobs_t,  so dL/dlogprobs = -A w

    rho is the response's ratio pi_theta(y|x) / pi_old(y|x) = exp(sum of the
    token log-ratios) with ``level="sequence"`` (the paper's trajectory ratio),
    or the token's own with ``level="token"``; log-ratios clamped to [-20, 20]
    (rlclip/objectives/importance.py, as ``reinforce_is``). Positive examples
    train as supervised fine-tuning, at full strength however unlikely the
    current policy finds them; a negative example's push down fades once the
    policy has made it less likely than the sampler did (rho < 1), so its
    probability is not driven to zero (the paper's collapse of naive
    off-policy REINFORCE), and never exceeds the on-policy push (the cap 1).
    On-policy (rho = 1) every weight is 1: plain REINFORCE, ``gpg`` (a test).

    Sources: the paper's gradient (section 3: sum over R >= 0 of mu R grad log pi,
    plus sum over R < 0 of mu [pi / mu]_0^1 R grad log pi, trajectory ratios);
    the authors released no code that we found. Public implementations, both
    token-level: Trinity-RFT's ``topr`` policy loss (github.com/yanxi-chen/Trinity-RFT,
    a fork of agentscope-ai/Trinity-RFT, at commit 5b77c089fe79a4e24308bfb9a99aa6641960f613,
    trinity/algorithm/policy_loss_fn/topr_policy_loss.py lines 43-58: ratio clamped
    to [0, 1] where A <= ``advantage_threshold`` (0), else 1, detached,
    ``-alpha * A * logprob``, token-mean), equal to ``level="token"`` here (a test;
    A = 0 contributes nothing either way); and ROLL's ``use_topr_neg_loss_coef``
    (github.com/alibaba/ROLL at commit 4dc7f5b3b26eee91eef8153894ebf3806fde1ca8,
    roll/pipeline/rlvr/actor_worker.py), which splits by the sign of the reward
    score rather than the advantage and aggregates the two halves apart.
    Defaults: ``level="sequence"`` and ``is_cap`` 1.0 (the paper's [.]_0^1);
    aggregation ``token_mean`` (Trinity-RFT's default; the paper's sum of
    log pi(y|x) over a response is ``agg: seq_mean_token_sum``). The paper uses
    no KL penalty (``kl_coef`` 0).

    Args:
        level: ``sequence`` (default, the paper) or ``token`` (Trinity-RFT, ROLL).
        is_cap: upper truncation > 0 of the negative examples' ratio (1.0 in the paper).

    Metrics: ``is_weight_mean`` (mean w over counted tokens), ``clip_frac_is_cap``
    (negative-advantage tokens whose ratio the cap bounds), ``negative_frac``
    (tokens with A < 0), token ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, level: str = "sequence", is_cap: float = 1.0, **shared: Any) -> None:
        super().__init__(**shared)
        if level not in LEVELS:
            raise ConfigError(f"topr: level must be one of {', '.join(LEVELS)} (the paper: sequence), got {level!r}")
        if not is_cap > 0:
            raise ConfigError(f"topr: is_cap must be > 0 (the paper truncates the ratio to [0, 1]), got {is_cap}")
        self.level, self.is_cap = level, float(is_cap)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        capped, rho = importance_weight(batch.logprobs, batch.old_logprobs, batch.mask, f"{self.level}_truncate",
                                        self.is_cap, 0.0)  # [B, T] each, no grad
        negative = batch.advantages < 0  # [B, T]
        weight = torch.where(negative, capped, torch.ones_like(capped))  # [B, T]
        loss = -batch.advantages * weight * batch.logprobs  # [B, T]
        log_ratio = (batch.logprobs - batch.old_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        metrics = ratio_metrics(torch.exp(log_ratio), log_ratio, batch.mask, {"is_cap": negative & (rho > self.is_cap)})
        metrics["is_weight_mean"] = masked_mean(weight, batch.mask)
        metrics["negative_frac"] = masked_mean(negative.to(weight.dtype), batch.mask)
        return loss, metrics
