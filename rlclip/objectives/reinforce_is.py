"""REINFORCE with truncated importance-sampling weights, for stale data (verl's bypass-mode REINFORCE)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_mean, register_objective
from rlclip.objectives.importance import IS_MODES, capped_weights, log_ratios, unit_ratios
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

def importance_weight(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, mode: str, cap: float,
                      floor: float | None) -> tuple[Tensor, Tensor]:
    """``(w [B, T], rho [B, T])``, both detached: the capped weight of pi_theta / pi_old and the ratio it came
    from (rlclip/objectives/importance.py, the same modes as ``rollout.is_mode``)."""
    rho = unit_ratios(log_ratios(logprobs, old_logprobs, mask), mode)  # [B, T]
    return capped_weights(rho, mode, cap, floor), rho


@register_objective("reinforce_is")
class ReinforceIS(Objective):
    """REINFORCE with a truncated importance-sampling weight of the current over the old policy.

    For stale data: the rollout was sampled by an older policy, and the update
    is a plain policy gradient reweighted by the importance ratio, with no
    ratio clip. With rho = pi_theta / pi_old of the sampled token (or of the
    response, product over its tokens) and the weight w = sg(cap(rho)):

        L_t = -A_t * w_t * logprobs_t,    so dL/dlogprobs = -A w

    cap(rho) by ``is_mode`` (the modes and bounds of ``rollout.is_mode`` /
    ``is_cap`` / ``is_floor``, rlclip/is_correction.py): ``*_truncate`` clamps
    rho to [is_floor, is_cap] (TIS), ``*_mask`` zeroes it outside (IcePop),
    ``none`` is w = 1. Log ratios are clamped to [-20, 20] before exp, as verl.

    Peer: verl's bypass mode with ``loss_type: reinforce`` (github.com/verl-project/verl
    at commit 1dda039b9c6311889a9c9a26040677e1254814f9: verl/trainer/ppo/core_algos.py
    ``compute_policy_loss_bypass_mode`` lines 2412-2547, which sets pi_old := the
    sampler, computes the weights from the current log-probs under no_grad at
    lines 2495-2507 and calls ``compute_policy_loss_reinforce``, lines 2332-2409:
    pg_losses = -A * log_prob * rollout_is_weights, line 2388; the weights are
    verl/trainer/ppo/rollout_corr_helper.py ``compute_rollout_correction_weights``,
    lines 522-657). verl's ``rollout_is: token | sequence`` with a single
    ``rollout_is_threshold`` C is ``is_mode: token_truncate | sequence_truncate``,
    ``is_cap: C``; its IcePop threshold "L_U" is ``*_mask`` with ``is_floor: L``,
    ``is_cap: U``; ``rollout_is: null`` is ``none``. Defaults are verl's
    RolloutCorrectionConfig (verl/trainer/config/algorithm.py lines 178-179, also
    its ``bypass_pg_is`` preset): sequence level, threshold 2.0. Aggregation
    ``token_mean``: verl's actor ``loss_agg_mode`` default, which bypass mode
    passes on (``compute_policy_loss_reinforce``'s own signature default is
    ``seq-mean-token-sum``). verl's ``rollout_is_batch_normalize`` is not offered here.

    Why the weight is inside the surrogate: rlclip multiplies the per-token loss
    by ``PolicyBatch.token_weights`` after the surrogate, total = agg(L_t * tau_t),
    where tau is ``rollout.is_mode``'s correction of pi_prox / mu (the
    proximal policy over the sampler), fixed before the update. With
    ``rollout.proximal: bypass``, pi_old = pi_prox = mu, so tau = 1 and
    agg(L) must itself be verl's agg(-A * w(pi_theta / mu) * log pi_theta): the
    weight depends on the current policy, which tau cannot see. With
    ``recompute`` (pi_old = pi_prox), w * tau = (pi_theta / pi_prox) * (pi_prox / mu)
    is the decoupled weight, each factor under its own cap. With ``is_mode: none``
    the surrogate is plain REINFORCE, -A logprobs (``gpg``), and tau carries the
    weights: verl's ``compute_policy_loss_reinforce`` with ``rollout_is_weights = tau``.

    Args:
        is_mode: ``sequence_truncate`` (default), ``token_truncate``, ``sequence_mask``,
            ``token_mask`` or ``none``.
        is_cap: upper bound C > 0 of rho.
        is_floor: lower bound in [0, is_cap] of rho; None: none.

    Metrics: ``is_weight_mean`` (mean w over counted tokens), ``clip_frac_is_cap``
    (tokens whose weight the bounds changed), ratio mean/min/max of the token
    ratio, ``approx_kl``.
    """

    def __init__(self, *, is_mode: str = "sequence_truncate", is_cap: float = 2.0, is_floor: float | None = None,
                 **shared: Any) -> None:
        super().__init__(**shared)
        if is_mode not in IS_MODES:
            raise ConfigError(f"reinforce_is: is_mode must be one of {', '.join(IS_MODES)}, got {is_mode!r}")
        if not is_cap > 0:
            raise ConfigError(f"reinforce_is: is_cap must be > 0 (verl's rollout_is_threshold default is 2.0), "
                              f"got {is_cap}")
        if is_floor is not None and not 0 <= is_floor <= is_cap:
            raise ConfigError(f"reinforce_is: is_floor must be in [0, is_cap={is_cap}] (or null), got {is_floor}")
        self.is_mode, self.is_cap = is_mode, float(is_cap)
        self.is_floor = None if is_floor is None else float(is_floor)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        weight, rho = importance_weight(batch.logprobs, batch.old_logprobs, batch.mask, self.is_mode, self.is_cap,
                                        self.is_floor)  # [B, T] each, no grad
        loss = -batch.advantages * weight * batch.logprobs  # [B, T]
        log_ratio = (batch.logprobs - batch.old_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        capped = (weight != rho) if self.is_mode != "none" else torch.zeros_like(rho, dtype=torch.bool)
        metrics = ratio_metrics(torch.exp(log_ratio), log_ratio, batch.mask, {"is_cap": capped})
        metrics["is_weight_mean"] = masked_mean(weight, batch.mask)
        return loss, metrics
