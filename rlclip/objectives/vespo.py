"""VESPO: sequence-level Gamma weighting of the policy gradient (arXiv 2602.10693)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_max, masked_mean, register_objective
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

LOG_W_MIN = math.log(1e-8)  # floor of log w, as TRL's get_gamma_weights (the authors' 1e-8 clamp of w)


def gamma_weights(log_ratio: Tensor, advantages: Tensor, mask: Tensor, k_pos: float, lambda_pos: float,
                  k_neg: float, lambda_neg: float) -> tuple[Tensor, Tensor]:
    """VESPO's per-sequence weight phi(w) broadcast over tokens, and log w; both ``[B, T]``, no grad.

    log w = clamp(sum over the response of clamp(log_ratio, -20, 20), log 1e-8, 20) (a sum,
    not GSPO's mean); with (k, lambda) = (k_pos, lambda_pos) where A >= 0, else the ``_neg`` pair,
    phi = exp(lambda + k log w - lambda w), so phi(1) = 1; non-finite phi becomes 0.
    """
    log_ratio = log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    mask = mask.to(log_ratio.dtype)
    log_w = (log_ratio * mask).sum(-1, keepdim=True).clamp(LOG_W_MIN, LOG_RATIO_CLAMP)  # [B, 1]
    nonneg = advantages.detach() >= 0  # [B, T]
    k = torch.where(nonneg, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))
    lam = torch.where(nonneg, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg)).clamp_min(1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))  # [B, T]
    phi = torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)
    return phi, log_w.expand_as(phi)


@register_objective("vespo")
class VESPO(Objective):
    """VESPO, variational sequence-level soft policy optimisation (arXiv 2602.10693).

    w = exp(clamp(sum_t clamp(logprobs_t - old_logprobs_t, -20, 20), log 1e-8, 20)) per response,
    phi(w) = exp(lambda) * w^k * exp(-lambda w) (a Gamma-shaped weight with phi(1) = 1),
    (k, lambda) = (k_pos, lambda_pos) for A >= 0 and (k_neg, lambda_neg) for A < 0,
    L = -sg(phi(w)) * A * logprobs, so dL/dlogprobs = -phi(w) * A.

    No hard clip: sequences whose ratio drifts far from 1 on either side
    get a smoothly vanishing weight (w^k below 1, exp(-lambda w) above).
    Same as TRL's ``loss_type="vespo"`` (``get_gamma_weights``; knobs
    ``vespo_k_pos``, ``vespo_lambda_pos``, ``vespo_k_neg``, ``vespo_lambda_neg``
    -> ``k_pos``, ``lambda_pos``, ``k_neg``, ``lambda_neg``), without vLLM's
    sampler correction. Defaults are TRL's GRPOConfig defaults (k_pos = 2,
    lambda_pos = 3, k_neg = 3, lambda_neg = 2) and its aggregation ``token_mean``
    (TRL normalises vespo by the global token count, like ``dapo``).

    Args:
        k_pos, lambda_pos: exponent and decay (lambda clamped to >= 1e-4) for A >= 0.
        k_neg, lambda_neg: the same for A < 0.

    Metrics: ``phi_mean`` (the weight averaged over counted tokens; TRL's
    ``vespo/phi_seq_mean`` averages it over sequences), ``phi_max``,
    ``seq_log_ratio_mean`` (log w, token-weighted).
    """

    def __init__(self, *, k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
                 lambda_neg: float = 2.0, **shared: Any) -> None:
        super().__init__(**shared)
        if not all(v >= 0 for v in (k_pos, lambda_pos, k_neg, lambda_neg)):
            raise ConfigError(f"vespo: k_pos, lambda_pos, k_neg, lambda_neg must be >= 0, "
                              f"got {k_pos}, {lambda_pos}, {k_neg}, {lambda_neg}")
        self.k_pos, self.lambda_pos = float(k_pos), float(lambda_pos)
        self.k_neg, self.lambda_neg = float(k_neg), float(lambda_neg)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        phi, log_w = gamma_weights(batch.logprobs - batch.old_logprobs, batch.advantages, batch.mask,
                                   self.k_pos, self.lambda_pos, self.k_neg, self.lambda_neg)
        loss = -phi * batch.advantages * batch.logprobs  # [B, T]
        metrics = {"phi_mean": masked_mean(phi, batch.mask), "phi_max": masked_max(phi, batch.mask),
                   "seq_log_ratio_mean": masked_mean(log_w, batch.mask)}
        return loss, metrics
