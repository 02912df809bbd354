"""DPPO's Binary-TV mask plus Kimi K2.5's squared log-ratio penalty: prime-rl's default loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.objectives.base import masked_mean, register_objective
from rlclip.objectives.dppo import DPPO
from rlclip.objectives.dro import squared_log_ratio
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

PRIME_RL_THRESHOLD = 0.2
"""prime-rl's ``dppo_mask_low`` / ``dppo_mask_high`` default (Binary-TV)."""


@register_objective("dppo_kimi")
class DPPOKimi(DPPO):
    """prime-rl's default RL loss: DPPO Binary-TV (arXiv 2602.04879) + Kimi K2.5's penalty (arXiv 2602.02276).

    The ``dppo`` surrogate (its mask, weight and loss, rlclip/objectives/dppo.py)
    plus ``kl_tau`` times the squared log-ratio on every counted token, masked
    or not:

        L_t = -A_t * w_t * logprobs_t * sg(valid_t) + kl_tau * (logprobs_t - old_logprobs_t)^2
        dL/dlogprobs = -A w valid + 2 kl_tau (logprobs - old_logprobs)

    The mask stops a token's advantage from pushing it further out of the
    trust region; the penalty pulls every token back toward pi_old with a
    force linear in its log-ratio, so masked tokens are not left to drift.

    Peer: prime-rl's ``default_loss_fn`` (github.com/PrimeIntellect-ai/prime-rl at
    commit 559b44772e471d1538537b8805cc77f3824a5e64, src/prime_rl/trainer/rl/loss.py
    lines 109-161: the Binary-TV mask at 130-135, the policy term
    ``keep * A * ratio`` at 144, ``kl_tau * log_ratio**2`` on the whole loss mask
    at 145-146, summed and divided by the step's token count in ``compute_loss``,
    line 394). Defaults from its ``DefaultLossConfig``
    (packages/prime-rl-configs/src/prime_rl/configs/trainer.py lines 494-507):
    ``dppo_mask_low`` = ``dppo_mask_high`` = 0.2 (``eps_low`` / ``eps_high`` here),
    ``kl_tau`` = 1e-3, ``adv_tau`` = 1.0. prime-rl keeps the gradient in the
    ratio (L = -A rho keep) and has no cap: with ``is_cap`` None (the default
    here) the gradient is prime-rl's exactly and the loss value differs by the
    policy term (-A rho vs -A sg(rho) logprobs, a test). Its ``adv_tau`` is not
    offered: a factor a on the advantages is the same update as ``kl_tau / a``
    with the loss, and so the learning rate under SGD, scaled by a.

    Name: prime-rl calls this loss ``default`` (``trainer.loss.type``), which says
    nothing here; it is DPPO's mask with Kimi's penalty, so ``dppo_kimi``.

    Args:
        kl_tau: weight >= 0 of (logprobs - old_logprobs)^2; 0 is ``dppo`` with these thresholds.
        variant, eps_low, eps_high, is_cap: as ``dppo``; thresholds default to 0.2 for ``tv``
            (prime-rl, which has Binary-TV only) and ``dppo``'s 0.05 for ``kl``; ``is_cap`` None.

    Metrics: those of ``dppo`` plus ``penalty_mean`` (mean kl_tau * (log-ratio)^2).
    """

    def __init__(self, *, variant: str = "tv", eps_low: float | None = None, eps_high: float | None = None,
                 is_cap: float | None = None, kl_tau: float = 1e-3, **shared: Any) -> None:
        if variant == "tv":  # prime-rl's thresholds; other variants keep dppo's defaults
            eps_low = PRIME_RL_THRESHOLD if eps_low is None else eps_low
            eps_high = PRIME_RL_THRESHOLD if eps_high is None else eps_high
        super().__init__(variant=variant, eps_low=eps_low, eps_high=eps_high, is_cap=is_cap, **shared)
        if not kl_tau >= 0:
            raise ConfigError(f"dppo_kimi: kl_tau must be >= 0 (prime-rl's default is 1e-3), got {kl_tau}")
        self.kl_tau = float(kl_tau)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        loss, metrics = super().surrogate(batch)  # [B, T], dppo's masked, weighted policy gradient
        penalty = self.kl_tau * squared_log_ratio(batch.logprobs, batch.old_logprobs)  # [B, T]
        metrics["penalty_mean"] = masked_mean(penalty.detach(), batch.mask)
        return loss + penalty, metrics
