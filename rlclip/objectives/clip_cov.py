"""Clip-Cov: detach a few high-covariance tokens from the clipped surrogate (arXiv 2505.22617)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, Reducer, masked_mean, register_objective
from rlclip.objectives.ratio_clip import clipped_surrogate, ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

SELECTED = "clip_cov_selected"


def token_covariance(batch: PolicyBatch, reduce: Reducer) -> tuple[Tensor, Tensor]:
    """Per-token centred product (A_t - mean A)(logprobs_t - mean logprobs), and the token count.

    The means are over the counted tokens of the whole optimizer step on every
    process (``reduce.sum``), in float64. Returns ``(cov [B, T] float64, n 0-d)``;
    cov is meaningful only where ``batch.mask`` is 1.
    """
    mask = batch.mask.detach().to(torch.float64)
    adv = batch.advantages.detach().to(torch.float64)
    logp = batch.logprobs.detach().to(torch.float64)
    n, adv_sum, logp_sum = reduce.sum(torch.stack([mask.sum(), (adv * mask).sum(), (logp * mask).sum()]))
    count = n.clamp_min(1)
    return (adv - adv_sum / count) * (logp - logp_sum / count), n  # [B, T]


def selection_seed(seed: int, batch: PolicyBatch) -> int:
    """A generator seed from ``seed`` and a fingerprint of the step's batch (old log-probs, advantages).

    The same batch gives the same seed in every run and whatever the micro-batching;
    different steps give different seeds.
    """
    mask = batch.mask.detach().to(torch.float64)
    old = float((batch.old_logprobs.detach().to(torch.float64) * mask).sum())
    adv = float((batch.advantages.detach().to(torch.float64) * mask).sum())
    return hash((int(seed), old, adv)) & (2**63 - 1)


@register_objective("clip_cov")
class ClipCov(Objective):
    """Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

    Entropy collapses because the policy keeps raising tokens whose log-prob
    and advantage covary. Clip-Cov takes the PPO/GRPO clipped loss
    L_t = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) and removes a
    few such tokens from it (loss and gradient 0; they still count in the
    token-mean denominator), as verl's ``compute_policy_loss_clip_cov``
    (verl/trainer/ppo/core_algos.py):

        cov_t = (A_t - mean A)(logprobs_t - mean logprobs)    (means over the counted tokens)
        candidates: counted tokens where PPO's clip does not bind and clip_cov_lb < cov_t < clip_cov_ub
        removed: max(1, int(clip_cov_ratio * N)) candidates drawn uniformly at random (or all when fewer)

    Unlike verl, which computes the means, N and the draw per micro-batch
    and process, here they are step statistics: computed once over the
    whole optimizer step on all processes (:meth:`step_statistics`), so the
    update does not depend on micro-batching. The draw gives each counted
    token a uniform key from a generator seeded with ``seed`` and a
    fingerprint of the step's batch, and removes the candidates with the
    smallest keys across processes: reproducible, and the same whatever the
    micro-batching.

    Defaults are verl's ActorConfig / PolicyLossConfig (verl/workers/config/actor.py):
    clip_cov_ratio = 0.0002, clip_cov_lb = 1.0, clip_cov_ub = 5.0, clip_ratio = 0.2
    (eps_low = eps_high = 0.2), aggregation ``token_mean``.

    Args:
        eps_low, eps_high: PPO clip range.
        clip_cov_ratio: fraction (> 0) of the step's counted tokens to remove.
        clip_cov_lb, clip_cov_ub: open covariance interval of the candidates.
        seed: seed of the random draw.

    Metrics: ``cov_clip_frac`` (tokens removed; verl's ``pg_clipfrac``),
    ``clip_frac_low`` / ``clip_frac_high``, ratio mean/min/max, ``approx_kl``.
    """

    step_needs = frozenset({"logprobs"})

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.2, clip_cov_ratio: float = 0.0002,
                 clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0, seed: int = 0, **shared: Any) -> None:
        super().__init__(**shared)
        if not (eps_low >= 0 and eps_high >= 0):
            raise ConfigError(f"clip_cov: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
        if not 0 < clip_cov_ratio <= 1:
            raise ConfigError(f"clip_cov: clip_cov_ratio must be in (0, 1], got {clip_cov_ratio}")
        if not clip_cov_lb < clip_cov_ub:
            raise ConfigError(f"clip_cov: need clip_cov_lb < clip_cov_ub, got {clip_cov_lb}, {clip_cov_ub}")
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)
        self.clip_cov_ratio, self.clip_cov_lb, self.clip_cov_ub = float(clip_cov_ratio), clip_cov_lb, clip_cov_ub
        self.seed = int(seed)

    def _ratio(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_ratio), log_ratio  # [B, T]

    def step_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        """The removed tokens ``clip_cov_selected [B, T]`` (bool), drawn once per optimizer step."""
        cov, n = token_covariance(batch, reduce)
        counted = batch.mask.bool()
        ratio, _ = self._ratio(batch)
        adv = batch.advantages.detach()
        clipped_ratio = ratio.clamp(1 - self.eps_low, 1 + self.eps_high)
        clip_binds = -adv * clipped_ratio > -adv * ratio  # [B, T]
        candidates = counted & ~clip_binds & (cov > self.clip_cov_lb) & (cov < self.clip_cov_ub)
        generator = torch.Generator().manual_seed(selection_seed(self.seed, batch))
        keys = torch.rand(cov.shape, generator=generator, dtype=torch.float64).to(cov.device)  # [B, T]
        pooled = reduce.cat(keys[candidates])  # [n_candidates over the step]
        count = min(max(int(float(n) * self.clip_cov_ratio), 1), pooled.numel())
        if count == 0:
            return {SELECTED: torch.zeros_like(counted)}
        threshold = pooled.kthvalue(count).values
        return {SELECTED: candidates & (keys <= threshold)}

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        ratio, log_ratio = self._ratio(batch)
        loss, active = clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, None)
        selected = batch.step_stats[SELECTED]  # [B, T] bool, set by Objective.__call__ or the trainer
        loss = torch.where(selected, torch.zeros_like(loss), loss)  # [B, T]
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        metrics["cov_clip_frac"] = masked_mean(selected.to(ratio.dtype), batch.mask)
        return loss, metrics
