"""ASPO: asymmetric importance sampling policy optimisation (arXiv 2510.06062)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.archer import masked_row_quantile
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


def check_soft_dual_clip(key: str, value: float | None) -> None:
    if value is not None and not value > 1:
        raise ConfigError(f"aspo: {key} must be > 1 (or null to disable; the ASPO authors use 3.0), got {value}")


@register_objective("aspo")
class ASPO(Objective):
    """ASPO (Wang et al. 2025, "ASPO: Asymmetric Importance Sampling Policy Optimization", arXiv 2510.06062).

    In PPO/GRPO a positive-advantage token that is already likely (rho > 1) gets
    a larger weight rho and grows further, while an unlikely one (rho < 1) is
    held back: the importance ratio works against positive tokens. ASPO flips
    it for them to 1 / rho, and bounds both signs' weights with a *soft* dual
    clip that keeps a gradient of c * A instead of cutting it. With
    rho = exp(clamp(logprobs - old_logprobs, -20, 20)) and the per-token range
    eps_t (``eps_knowledge`` for tokens whose entropy is at most the
    ``q``-quantile of their response, ``eps_reasoning`` above it, as ``archer``):

        A < 0:  L = -A max(rho, 1 - eps_t)                 dL/dlogp = -A rho (0 where rho < 1 - eps_t)
                where rho > c_neg:  L = -A c_neg logprobs  dL/dlogp = -A c_neg
        A >= 0: r = min(rho, 1 + eps_t);  L = -A (r / sg(r)) / sg(r)
                                                           dL/dlogp = -A / rho (0 where rho > 1 + eps_t)
                where 1 / r > c_pos:  L = -A c_pos logprobs  dL/dlogp = -A c_pos

    For A < 0 this is PPO's clipped loss (max(-A rho, -A clip(rho)) = -A max(rho, 1 - eps)
    when A < 0), so with all advantages negative, one range and no token above c_neg
    ASPO is ``ratio_clip`` (a test); on-policy (rho = 1) it is too.

    Reference: ``compute_policy_loss_archer`` (github.com/wizard-III/Archer2.0,
    verl/trainer/ppo/core_algos.py lines 537-583 at commit
    b08d963d5d65909ef1f24dba2f382006d0be33e1), called from
    verl/workers/actor/dp_actor.py lines 402-424, which fix the defaults here:
    ``token_entropy_quantile`` 0.8 (q, per response, ``torch.nanquantile``),
    clip range 0.2 for low-entropy and 0.4 for high-entropy tokens on both
    signs, ``negative_clip_ratio_c = positive_clip_ratio_c = 3.0``. The
    reference's loss value on soft-dual-clipped tokens is -A c logprobs, kept here.

    Args:
        q: entropy quantile in [0, 1] splitting knowledge (<=) from reasoning (>) tokens per response.
        eps_knowledge: clip range of low-entropy tokens (>= 0; < 1).
        eps_reasoning: clip range of high-entropy tokens (>= 0; < 1). Equal ranges need no entropy.
        dual_clip_neg: c_neg > 1, soft cap of the weight rho of negative-advantage tokens; None: off.
        dual_clip_pos: c_pos > 1, soft cap of the weight 1 / rho of positive-advantage tokens; None: off.

    Metrics: ``clip_frac_low`` (A < 0, rho < 1 - eps_t), ``clip_frac_high`` (A >= 0,
    rho > 1 + eps_t), ``clip_frac_dual_neg`` / ``clip_frac_dual_pos`` (soft dual clip
    active, as fractions of the negative / non-negative-advantage tokens, as the
    reference), ``is_weight_mean`` (the gradient weight |dL/dlogp| / |A|),
    ``reasoning_frac``, ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, q: float = 0.8, eps_knowledge: float = 0.2, eps_reasoning: float = 0.4,
                 dual_clip_neg: float | None = 3.0, dual_clip_pos: float | None = 3.0, **shared: Any) -> None:
        super().__init__(**shared)
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"aspo: q must be in [0, 1] (the authors use 0.8), got {q}")
        if not (0 <= eps_knowledge < 1 and 0 <= eps_reasoning < 1):
            raise ConfigError(f"aspo: eps_knowledge and eps_reasoning must be in [0, 1) (the authors use 0.2 and "
                              f"0.4), got {eps_knowledge}, {eps_reasoning}")
        check_soft_dual_clip("dual_clip_neg", dual_clip_neg)
        check_soft_dual_clip("dual_clip_pos", dual_clip_pos)
        self.q, self.eps_knowledge, self.eps_reasoning = float(q), float(eps_knowledge), float(eps_reasoning)
        self.dual_clip_neg = None if dual_clip_neg is None else float(dual_clip_neg)
        self.dual_clip_pos = None if dual_clip_pos is None else float(dual_clip_pos)
        # one range for every token: the split changes nothing, so the entropy is not needed for it (the
        # shared needs the base class set, the reference model for kl_coef > 0 or the entropy filter, stay)
        self.split = self.eps_knowledge != self.eps_reasoning
        if self.split:
            self.needs = self.needs | {"entropy"}

    def token_eps(self, batch: PolicyBatch, like: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token clip range ``[B, T]`` and the reasoning-token mask (entropy above its response's quantile)."""
        if not self.split:
            return torch.full_like(like, self.eps_knowledge), torch.zeros_like(batch.mask, dtype=torch.bool)
        counted = batch.mask.bool()
        tau, _ = masked_row_quantile(batch.entropy.detach(), counted, self.q)  # [B]
        reasoning = (batch.entropy.detach() > tau.unsqueeze(-1)) & counted  # [B, T]
        eps = torch.where(reasoning, like.new_tensor(self.eps_reasoning), like.new_tensor(self.eps_knowledge))
        return eps, reasoning

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        adv, logp = batch.advantages, batch.logprobs
        eps, reasoning = self.token_eps(batch, ratio)
        negative = adv < 0  # [B, T]; A = 0 takes the positive branch, as the reference (loss 0 either way)
        # a disabled cap is a mask of False with a finite stand-in (an inf in torch.where's other branch
        # would turn its zero gradient into NaN)
        c_neg = 0.0 if self.dual_clip_neg is None else self.dual_clip_neg
        c_pos = 0.0 if self.dual_clip_pos is None else self.dual_clip_pos
        # A < 0: PPO's one-sided lower clip; above c_neg a stop-gradient weight c_neg on logprobs
        neg_weight = torch.clamp(ratio, min=1 - eps)  # [B, T]
        dual_neg = neg_weight > c_neg if self.dual_clip_neg is not None else torch.zeros_like(negative)
        neg_loss = torch.where(dual_neg, -adv * c_neg * logp, -adv * neg_weight)  # [B, T]
        # A >= 0: the flipped weight 1 / rho, upper-clipped; below 1 / c_pos a stop-gradient weight c_pos
        pos_ratio = torch.clamp(ratio, max=1 + eps)  # [B, T]
        pos_detached = pos_ratio.detach()
        dual_pos = 1 / pos_detached > c_pos if self.dual_clip_pos is not None else torch.zeros_like(negative)
        pos_loss = torch.where(dual_pos, -adv * c_pos * logp, -adv * (pos_ratio / pos_detached) / pos_detached)
        loss = torch.where(negative, neg_loss, pos_loss)  # [B, T]

        clipped_low = negative & (ratio < 1 - eps)
        clipped_high = ~negative & (ratio > 1 + eps)
        weight = torch.where(negative, torch.where(dual_neg, c_neg, torch.where(clipped_low, 0.0, ratio)),
                             torch.where(dual_pos, c_pos, torch.where(clipped_high, 0.0, 1 / ratio))).detach()
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, {"low": clipped_low, "high": clipped_high})
        mask = batch.mask.bool()
        metrics.update(clip_frac_dual_neg=masked_mean((dual_neg & negative).to(ratio.dtype), mask & negative),
                       clip_frac_dual_pos=masked_mean((dual_pos & ~negative).to(ratio.dtype), mask & ~negative),
                       is_weight_mean=masked_mean(weight, mask),
                       reasoning_frac=masked_mean(reasoning.to(ratio.dtype), mask))
        return loss, metrics
