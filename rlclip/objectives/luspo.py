"""LUSPO: length-unbiased sequence policy optimisation, GSPO with a per-sequence token sum (arXiv 2602.05261)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import Objective, register_objective
from rlclip.objectives.ratio_clip import (
    check_delta,
    check_dual_clip,
    clipped_surrogate,
    ratio_metrics,
    sequence_log_ratio,
)
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor


@register_objective("luspo")
class LUSPO(Objective):
    """LUSPO, Length-Unbiased Sequence Policy Optimization (arXiv 2602.05261).

    GSPO's clipped sequence ratio with each sequence's loss scaled by its
    length: s_i = exp(mean over response i of (logprobs - old_logprobs)),
    L_i = |y_i| * max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)),
    loss = mean over sequences of L_i. GSPO averages L_i / |y_i| instead, so
    it under-weights long responses; LUSPO removes that length bias.

    Computed as ``ratio_clip`` with ``level="sequence"`` (the GSPO-token
    form, which has GSPO's value and gradient) and the aggregation
    ``seq_mean_token_sum``: the per-token loss is the sequence's loss on every
    token, summed over the response and averaged over sequences. That is
    TRL's ``loss_type="luspo"`` with ``importance_sampling_level="sequence"``
    (``(per_token_loss * mask).sum(-1).mean()``); TRL's ``delta`` carries
    over as ``delta``. (TRL's mean also counts rows without tokens; here the
    mean is over sequences with at least one counted token, or the trainer's
    global sequence count.)

    Defaults: eps_low = 3e-4, eps_high = 4e-4 are GSPO's (paper v2, section
    5.1, the values TRL's paper index gives for GSPO), as LUSPO modifies GSPO
    and keeps its clipping; ``agg = seq_mean_token_sum`` (LUSPO, TRL).

    Args:
        eps_low, eps_high: clip range of the sequence ratio.
        dual_clip, delta: as in ``ratio_clip`` (off by default).
    """

    def __init__(self, *, eps_low: float = 3e-4, eps_high: float = 4e-4, dual_clip: float | None = None,
                 delta: float | None = None, agg: str = "seq_mean_token_sum", **shared: Any) -> None:
        super().__init__(agg=agg, **shared)
        if eps_low < 0 or eps_high < 0:
            raise ConfigError(f"luspo: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
        check_dual_clip(dual_clip)
        check_delta(delta)
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)
        self.dual_clip = dual_clip
        self.delta = None if delta is None else float(delta)

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        log_ratio = sequence_log_ratio(batch.logprobs, batch.old_logprobs, batch.mask)  # [B, T], value log s_i
        ratio = torch.exp(log_ratio)  # [B, T]
        loss, active = clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, self.dual_clip,
                                         self.delta)
        return loss, ratio_metrics(ratio, log_ratio, batch.mask, active)
