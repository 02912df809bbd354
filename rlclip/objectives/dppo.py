"""DPPO: a trust region on the divergence of the sampled token's probability (arXiv 2602.04879)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

VARIANTS = {"tv": 0.15, "kl": 0.05}
"""The variants and their default thresholds (verl's examples/dppo_trainer/run_qwen3_30b_a3b_megatron.sh)."""
BINARY_KL_EPS = 1e-8


def binary_kl(p_old: Tensor, p: Tensor, logp_old: Tensor, logp: Tensor) -> Tensor:
    """KL(Bernoulli(p_old) || Bernoulli(p)) per token, as verl (1e-8 inside the log of the complement)."""
    return p_old * (logp_old - logp) + (1 - p_old) * torch.log((1 - p_old + BINARY_KL_EPS) / (1 - p + BINARY_KL_EPS))


@register_objective("dppo")
class DPPO(Objective):
    """DPPO, Binary-TV and Binary-KL (Qi et al. 2026, "Rethinking the Trust Region in LLM RL", arXiv 2602.04879).

    PPO's ratio clip over-restricts rare tokens (a tiny probability that
    doubles) and under-restricts likely ones (0.99 -> 0.8 is ratio 0.81).
    DPPO masks a token when the divergence between pi_old and pi_theta,
    reduced to the binary event "the sampled token or not", leaves the trust
    region in the direction its advantage pushes, and otherwise trains it with
    a truncated, stop-gradient importance weight. With p = pi_theta(a_t),
    p_old = pi_old(a_t) and rho = exp(clamp(logprobs - old_logprobs, -20, 20)):

        w_t = sg(min(rho_t, is_cap))
        variant "tv":  valid_t = p - p_old <= eps_high          where A_t > 0
                       valid_t = p - p_old >= -eps_low          where A_t <= 0
        variant "kl":  D_t = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))
                       valid_t = D_t <= eps_high or p <= p_old  where A_t > 0
                       valid_t = D_t <= eps_low  or p >= p_old  where A_t <= 0
        L_t = -A_t * w_t * logprobs_t * sg(valid_t),  so dL/dlogprobs = -A w valid

    (the TV between the two Bernoulli distributions is |p - p_old|). A
    masked token loses its gradient only in the direction that would leave
    the region further; with thresholds that never trigger and no cap the
    gradient is the plain importance-weighted policy gradient -A rho, the
    gradient of ``ratio_clip`` without clipping (a test).

    Peer: verl's ``compute_policy_loss_dppo_tv`` / ``compute_policy_loss_dppo_kl``
    (github.com/verl-project/verl, verl/trainer/ppo/core_algos.py lines 1379-1457
    and 1460-1542 at commit 1dda039b9c6311889a9c9a26040677e1254814f9: the cap at
    1427-1429, the masks at 1432-1437 and 1513-1521, the loss at 1439 / 1523).
    Names: verl's ``clip_ratio_low`` / ``clip_ratio_high`` (there the divergence
    thresholds) are ``eps_low`` / ``eps_high``; its TIS cap ``clip_ratio_c`` is
    ``is_cap``. Defaults: the thresholds of verl's DPPO example
    (examples/dppo_trainer/run_qwen3_30b_a3b_megatron.sh lines 17-19, the
    authors' setting): 0.15 for tv, 0.05 for kl; ``is_cap`` 20.0, the fallback
    written in verl's DPPO losses (``config.get("clip_ratio_c", 20.0)``; a
    default verl ActorConfig carries ``clip_ratio_c: 3.0``, which then applies,
    and the example sets 10000: the paper's section 5.4 asks for a large cap);
    aggregation ``token_mean`` (verl's default; the example uses
    ``seq-mean-token-sum-norm``, ``agg: seq_mean_token_sum_norm`` here).

    Other peers differ: SkyRL's ``dppo_policy_loss`` (NovaSky-AI/SkyRL,
    skyrl/backends/skyrl_train/utils/ppo_utils.py lines 866-935 at commit
    a9564572eb8e91076be43c1bd5e4615e3de17265) uses L = -A rho valid with rho
    carrying the gradient (same gradient, other loss value), no IS cap,
    thresholds ``delta_low`` / ``delta_high`` (default 0.2 for both variants)
    and the sampler's log-probs as pi_old when it has them (lines 889-890; here
    ``rollout.proximal: bypass`` does that). prime-rl's default loss
    (PrimeIntellect-ai/prime-rl, src/prime_rl/trainer/rl/loss.py lines 109-162 at
    commit 559b44772e471d1538537b8805cc77f3824a5e64) is Binary-TV only, with
    the same mask (lines 131-135; ``dppo_mask_low`` / ``dppo_mask_high`` = 0.2),
    L = -A rho keep without cap, against the inference engine's log-probs, plus
    ``kl_tau`` (1e-3) times (log rho)^2 on every token (line 145).

    Args:
        variant: ``"tv"`` (Binary-TV) or ``"kl"`` (Binary-KL).
        eps_low: threshold for tokens with A <= 0 (>= 0); None: the variant's default.
        eps_high: threshold for tokens with A > 0 (>= 0); None: the variant's default.
        is_cap: cap on the importance weight (> 0); None: no cap.

    Metrics: ``clip_frac_high`` / ``clip_frac_low`` (tokens masked with A > 0 / A < 0),
    ``masked_frac`` (all masked tokens, verl's ``pg_clipfrac``), ``clip_frac_is_cap``
    (valid tokens whose weight the cap bounds, verl's ``pg_clipfrac_lower``),
    ``divergence_mean`` (p - p_old for tv, D_t for kl), ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, variant: str = "tv", eps_low: float | None = None, eps_high: float | None = None,
                 is_cap: float | None = 20.0, **shared: Any) -> None:
        super().__init__(**shared)
        if variant not in VARIANTS:
            raise ConfigError(f"dppo: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        eps_low = VARIANTS[variant] if eps_low is None else eps_low
        eps_high = VARIANTS[variant] if eps_high is None else eps_high
        if not (eps_low >= 0 and eps_high >= 0):
            raise ConfigError(f"dppo: eps_low and eps_high (divergence thresholds) must be >= 0, "
                              f"got {eps_low}, {eps_high}")
        if is_cap is not None and not is_cap > 0:
            raise ConfigError(f"dppo: is_cap must be > 0 (or null for no cap; verl's DPPO uses 20), got {is_cap}")
        self.variant, self.eps_low, self.eps_high = variant, float(eps_low), float(eps_high)
        self.is_cap = None if is_cap is None else float(is_cap)

    def valid_mask(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """``(valid [B, T] bool, divergence [B, T])``: the tokens inside the trust region, detached."""
        logp, logp_old, adv = batch.logprobs.detach(), batch.old_logprobs, batch.advantages
        p, p_old = torch.exp(logp), torch.exp(logp_old)  # [B, T]
        if self.variant == "tv":
            divergence = p - p_old
            valid = torch.where(adv > 0, divergence <= self.eps_high, divergence >= -self.eps_low)
        else:
            divergence = binary_kl(p_old, p, logp_old, logp)
            valid = torch.where(adv > 0, (divergence <= self.eps_high) | (p <= p_old),
                                (divergence <= self.eps_low) | (p >= p_old))
        return valid, divergence

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T], no grad
        weight = ratio if self.is_cap is None else ratio.clamp(max=self.is_cap)
        valid, divergence = self.valid_mask(batch)
        loss = -batch.advantages * weight * batch.logprobs * valid.to(ratio.dtype)  # [B, T]
        adv = batch.advantages
        active = {"low": ~valid & (adv < 0), "high": ~valid & (adv > 0), "is_cap": valid & (weight != ratio)}
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        metrics["masked_frac"] = masked_mean((~valid).to(ratio.dtype), batch.mask)
        metrics["divergence_mean"] = masked_mean(torch.where(batch.mask.bool(), divergence, 0.0), batch.mask)
        return loss, metrics
