"""KL-Cov: a KL penalty on the highest-covariance tokens (arXiv 2505.22617)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, Reducer, masked_mean, register_objective
from rlclip.objectives.clip_cov import token_covariance
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

SELECTED = "kl_cov_selected"


@register_objective("kl_cov")
class KLCov(Objective):
    """KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

    The unclipped ratio loss, plus a penalty on |log rho| for the top
    fraction of tokens by covariance of log-prob and advantage, as verl's
    ``compute_policy_loss_kl_cov`` (verl/trainer/ppo/core_algos.py):

        rho_t = exp(clamp(logprobs_t - old_logprobs_t, -20, 20))
        cov_t = (A_t - mean A)(logprobs_t - mean logprobs)    (means over the counted tokens)
        selected: the k = max(1, int(kl_cov_ratio * N)) counted tokens with the largest cov_t
        L_t = -A_t rho_t + ppo_kl_coef * |log rho_t|    on selected tokens,  -A_t rho_t elsewhere

    There is no PPO clip: the penalty is the only trust region. Unlike verl
    (per micro-batch and process), the means, N and the top-k are step
    statistics over the whole optimizer step on all processes
    (:meth:`step_statistics`), so the update does not depend on
    micro-batching; tokens tied with the k-th largest covariance are all selected.

    Defaults are verl's ActorConfig / PolicyLossConfig (verl/workers/config/actor.py):
    kl_cov_ratio = 0.0002, ppo_kl_coef = 0.1 (the function's own fallback is 1.0),
    aggregation ``token_mean``.

    Args:
        kl_cov_ratio: fraction (> 0) of the step's counted tokens that get the penalty.
        ppo_kl_coef: weight of |log rho| on them.

    Metrics: ``cov_kl_frac`` (tokens penalised), ``abs_kl`` (mean |log rho|, verl's
    ``ppo_kl``), ratio mean/min/max, ``approx_kl``.
    """

    step_needs = frozenset({"logprobs"})

    def __init__(self, *, kl_cov_ratio: float = 0.0002, ppo_kl_coef: float = 0.1, **shared: Any) -> None:
        super().__init__(**shared)
        if not 0 < kl_cov_ratio <= 1:
            raise ConfigError(f"kl_cov: kl_cov_ratio must be in (0, 1], got {kl_cov_ratio}")
        if not ppo_kl_coef >= 0:
            raise ConfigError(f"kl_cov: ppo_kl_coef must be >= 0, got {ppo_kl_coef}")
        self.kl_cov_ratio, self.ppo_kl_coef = float(kl_cov_ratio), float(ppo_kl_coef)

    def step_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        """The penalised tokens ``kl_cov_selected [B, T]`` (bool), chosen once per optimizer step."""
        cov, n = token_covariance(batch, reduce)
        counted = batch.mask.bool()
        pooled = reduce.cat(cov[counted])  # [n_step]
        count = min(max(int(float(n) * self.kl_cov_ratio), 1), pooled.numel())
        if count == 0:
            return {SELECTED: torch.zeros_like(counted)}
        threshold = pooled.topk(count).values[-1]
        return {SELECTED: counted & (cov >= threshold)}

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        selected = batch.step_stats[SELECTED]  # [B, T] bool, set by Objective.__call__ or the trainer
        penalty = torch.where(selected, self.ppo_kl_coef * log_ratio.abs(), torch.zeros_like(log_ratio))
        loss = -batch.advantages * ratio + penalty  # [B, T]
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, {})
        metrics["cov_kl_frac"] = masked_mean(selected.to(ratio.dtype), batch.mask)
        metrics["abs_kl"] = masked_mean(log_ratio.detach().abs(), batch.mask)
        return loss, metrics
