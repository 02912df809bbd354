"""GPG: group policy gradient, the plain REINFORCE loss (arXiv 2504.02546; verl's ``gpg``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.objectives.base import Objective, register_objective
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


@register_objective("gpg")
class GPG(Objective):
    """GPG, Group Policy Gradient (Chu et al. 2025, arXiv 2504.02546).

    L = -A * logprobs per token: the policy gradient with no ratio, no clip and
    no trust region, as verl's ``compute_policy_loss_gpg`` (loss_mode ``gpg``,
    verl/trainer/ppo/core_algos.py), aggregated with ``agg`` (verl's default
    ``token-mean``). It ignores ``old_logprobs``: off-policy passes (mu > 1,
    several mini-batches) are not corrected.

    GPG's other half is its advantage (verl's ``adv_estimator: gpg``: reward
    minus the group mean, not divided by the std, times B / (number of
    responses with a nonzero reward)); that is an advantage estimator, not
    part of this objective. No settings beyond the shared ones; defaults are
    verl's (``token_mean``, no KL).

    Metrics: ``logprob_mean`` (mean log-prob of the counted tokens).
    """

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        mask = batch.mask.to(batch.logprobs.dtype)
        logprob_mean = (batch.logprobs.detach() * mask).sum() / mask.sum().clamp_min(1)
        return -batch.advantages * batch.logprobs, {"logprob_mean": logprob_mean}  # [B, T]
