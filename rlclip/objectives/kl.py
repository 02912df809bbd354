"""KL estimators to the reference model, the log-ratio clamp and the token importance ratio.

:meth:`Objective.kl_terms` applies :func:`kl_estimate` with the objective's
``kl_estimator``, weighted by :func:`token_ratio` under ``kl_bias_correction``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlclip.errors import ConfigError
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl", "k3_plus", "abs")
LOW_VAR_KL_CLAMP = 10.0
LOG_RATIO_CLAMP = 20.0
"""Bound of the clamp [-20, 20] applied to log ratios (log pi / pi_old, log pi_ref / pi) across rlclip."""


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta.

    With d = ref_logprobs - logprobs (Schulman, "Approximating KL divergence"):
    k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 with d clamped to [-20, 20];
    ``low_var_kl`` = k3 with the value then clamped to [-10, 10], as verl's
    ``kl_penalty_forward`` (verl/trainer/ppo/core_algos.py, branch "low_var_kl"
    / "k3", which verl treats as the same estimator).
    ``abs`` = |d| (verl's "abs"). ``k3_plus`` (verl's "k3+", ``kl_penalty``): the value of k3 with the
    gradient of k2, by the straight-through form k2 - sg(k2) + sg(k3): k3's value is an unbiased
    estimate of the KL, k2's gradient d(d^2/2)/d logprobs = -d is the unbiased gradient of the KL
    (Schulman's note; verl PR #2953). The value is rlclip's k3 (verl's "k3+" also clamps it to
    [-10, 10], as its "k3"); the gradient is unclamped, as verl's.
    """
    d = ref_logprobs - logprobs  # [B, T]
    if estimator == "k1":
        return -d
    if estimator == "abs":
        return d.abs()
    if estimator == "k3_plus":
        k2 = 0.5 * d.square()  # [B, T], carries the gradient
        return k2 - k2.detach() + kl_estimate(logprobs.detach(), ref_logprobs, "k3")
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator in ("k3", "low_var_kl"):
        d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        k3 = torch.expm1(d) - d  # [B, T]
        return k3 if estimator == "k3" else k3.clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ConfigError(f"unknown kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def token_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """Per-token importance ratio exp(clamp(logprobs - old_logprobs, -20, 20)) ``[B, T]``, with grad."""
    return torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
