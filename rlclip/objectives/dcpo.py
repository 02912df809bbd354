"""DCPO: dynamic clipping policy optimisation, per-token clip bounds from the old probability (arXiv 2509.02333)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.ratio_clip import check_dual_clip, clipped_surrogate, ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

MIN_BOUND_CAP = 10.0
"""The reference caps the upper bound at max(clip_ratio_c, 10) (``get_clip_low_high``: "minimum 10")."""


def dynamic_bounds(old_logprobs: Tensor, eps_low: float, eps_high: float, cap: float) -> tuple[Tensor, Tensor]:
    """DCPO's per-token ratio bounds ``(low [B, T], high [B, T])`` from q = pi_old(a_t).

    The ratio r may move until the change of probability, weighted by the
    probability itself, reaches eps: |r - 1| r q <= eps on each side, whose roots are
        low  = (1 + sqrt(max(0, 1 - 4 eps_low / q))) / 2   (in [0.5, 1])
        high = min((1 + sqrt(1 + 4 eps_high / q)) / 2, cap)
    so rare tokens get wide bounds and likely ones tight bounds. A q that underflows to 0
    gets [1, cap], as the reference.
    """
    q = torch.exp(old_logprobs)  # [B, T]
    zero = q == 0
    safe = torch.where(zero, torch.ones_like(q), q)  # no division by 0 in the branch torch.where drops
    low_disc = torch.where(zero, torch.ones_like(q), 1 - 4 * eps_low / safe).clamp_min(0)  # [B, T]
    high_disc = torch.where(zero, torch.full_like(q, float("inf")), 1 + 4 * eps_high / safe)  # [B, T]
    low = (1 + torch.sqrt(low_disc)) / 2
    high = ((1 + torch.sqrt(high_disc)) / 2).clamp(max=cap)
    return low, high


@register_objective("dcpo")
class DCPO(Objective):
    """DCPO's dynamic-clip surrogate (Yang et al. 2025, "DCPO: Dynamic Clipping Policy Optimization", arXiv 2509.02333).

    PPO's fixed range [1 - eps, 1 + eps] barely lets a rare token move (q = 1e-3
    may only reach 1.2e-3) while a likely one may change a lot in absolute terms.
    DCPO bounds the probability change weighted by the old probability q
    (:func:`dynamic_bounds`), then clips as PPO with dual clip:
        rho = exp(clamp(logprobs - old_logprobs, -20, 20))
        L = max(-A rho, -A clip(rho, low(q), high(q))),  and where A < 0: L = min(L, -c A)
    When every token has the same old probability q the bounds are constants and
    DCPO is ``ratio_clip`` with eps_low = 1 - low(q), eps_high = high(q) - 1 and
    dual_clip c (a test).

    Reference: ``get_clip_low_high`` and ``compute_policy_loss_dcpo`` with
    ``clip_type: dynamic`` (github.com/lime-RL/DCPO, verl/trainer/ppo/core_algos.py
    lines 978-991 and 995-1093 at commit 01787b0f61580961162faeb492defeb39f1eba53).
    Defaults from the authors' recipe/dcpo/run_dcpo.sh (lines 82-84: clip_ratio_c 10,
    clip_ratio_high 0.28, clip_type dynamic) and recipe/dcpo/run_base.sh (line 86:
    clip_ratio_low 0.2). The upper bound is capped at max(dual_clip, 10) as the
    reference. The reference does not clamp the log ratio (its clamp is commented
    out); here it is clamped at +/-20 like every objective, which changes nothing
    below a ratio of e^20. DCPO's other parts are not the loss: its step-smoothed
    advantage ("SAS") is not here (``advantage: grpo`` is its base) and its
    "only-token-mean" aggregation, a token mean per micro-batch, has no exact
    micro-batch-invariant twin (docs/objectives/dcpo.md).

    Args:
        eps_low: lower range constant (>= 0): |r - 1| r q <= eps_low below 1.
        eps_high: upper range constant (>= 0).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c A; also
            the upper bound's cap max(c, 10). None disables the dual clip (cap 10).

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` / ``clip_frac_dual``, ``bound_low_mean``
    / ``bound_high_mean`` (mean per-token bounds), ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = 10.0,
                 **shared: Any) -> None:
        super().__init__(**shared)
        if not (eps_low >= 0 and eps_high >= 0):
            raise ConfigError(f"dcpo: eps_low and eps_high must be >= 0 (the authors use 0.2 and 0.28), "
                              f"got {eps_low}, {eps_high}")
        check_dual_clip(dual_clip)
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)
        self.dual_clip = None if dual_clip is None else float(dual_clip)

    def bounds(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """The per-token ratio bounds ``(low, high)``, each ``[B, T]``, no grad."""
        cap = max(self.dual_clip or MIN_BOUND_CAP, MIN_BOUND_CAP)
        return dynamic_bounds(batch.old_logprobs.detach(), self.eps_low, self.eps_high, cap)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        low, high = self.bounds(batch)  # [B, T]
        loss, active = clipped_surrogate(ratio, batch.advantages, 1 - low, high - 1, self.dual_clip)
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        metrics.update(bound_low_mean=masked_mean(low, batch.mask), bound_high_mean=masked_mean(high, batch.mask))
        return loss, metrics
