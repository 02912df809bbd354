"""PPO / GRPO ratio clipping, with clip-higher, dual clip and the GSPO sequence ratio."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import (
    LOG_RATIO_CLAMP,
    Objective,
    masked_max,
    masked_mean,
    masked_min,
    register_objective,
)
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

GSPO_AGG = "seq_mean_token_mean"
"""Default aggregation of ``level="sequence"`` (GSPO) when ``agg`` is not given."""


def sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's per-token log ratio (arXiv 2507.18071, "GSPO-token").

    log s_i = mean over response i of (logprobs - old_logprobs); per token the
    log ratio is sg(log s_i) + logprobs_t - sg(logprobs_t): its value is
    log s_i everywhere and its gradient w.r.t. logprobs_t is 1.
    """
    mask = mask.to(logprobs.dtype)
    seq = ((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
    seq = seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return seq.detach().unsqueeze(-1) + logprobs - logprobs.detach()  # [B, T]


def clipped_surrogate(ratio: Tensor, advantages: Tensor, eps_low: Tensor | float, eps_high: Tensor | float,
                      dual_clip: float | None, delta: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic clipped loss per token, with optional dual clip and two-sided clip.

    L = max(-A * rho', -A * clip(rho, 1 - eps_low, 1 + eps_high)) with rho' = rho, or
    rho' = min(rho, delta) with the two-sided clip (INTELLECT-2, arXiv 2505.07291; TRL's
    ``delta``); with dual clip c (Ye et al. 2020, arXiv 1912.09729), where A < 0:
    L = min(L, -c * A). ``eps_low`` / ``eps_high`` may be per-token tensors (Archer).
    Returns the loss ``[B, T]`` and boolean masks of where each clip is active.
    """
    clipped_ratio = torch.minimum(torch.maximum(ratio, 1 - torch.as_tensor(eps_low, dtype=ratio.dtype)),
                                  1 + torch.as_tensor(eps_high, dtype=ratio.dtype))
    unclipped = ratio if delta is None else ratio.clamp(max=delta)
    loss = torch.maximum(-advantages * unclipped, -advantages * clipped_ratio)  # [B, T]
    active = {
        "low": (advantages < 0) & (ratio < 1 - torch.as_tensor(eps_low)),
        "high": (advantages > 0) & (ratio > 1 + torch.as_tensor(eps_high)),
    }
    if delta is not None:  # tokens whose loss the cap on rho changed
        plain = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
        active["delta"] = (loss != plain).detach()
    if dual_clip is not None:
        bound = -dual_clip * advantages
        active["dual"] = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, active


def ratio_metrics(ratio: Tensor, log_ratio: Tensor, mask: Tensor, active: dict[str, Tensor]) -> dict[str, Any]:
    """Clip fractions, ratio statistics and approx KL(old || new) = E_old[(rho - 1) - log rho]."""
    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    metrics: dict[str, Any] = {f"clip_frac_{side}": masked_mean(hit.to(ratio.dtype), mask)
                               for side, hit in active.items()}
    metrics.update(ratio_mean=masked_mean(ratio, mask), ratio_min=masked_min(ratio, mask),
                   ratio_max=masked_max(ratio, mask),
                   approx_kl=masked_mean(torch.expm1(log_ratio) - log_ratio, mask))
    return metrics


def check_dual_clip(dual_clip: float | None) -> None:
    if dual_clip is not None and dual_clip <= 1:
        raise ConfigError(f"dual_clip must be > 1 (or null to disable), got {dual_clip}")


def check_delta(delta: float | None) -> None:
    if delta is not None and not delta > 1:
        raise ConfigError(f"delta must be > 1 (or null to disable; INTELLECT-2 uses 4), got {delta}")


@register_objective("ratio_clip")
class RatioClip(Objective):
    """PPO/GRPO clipped ratio objective (Schulman et al. 2017, arXiv 1707.06347).

    rho = exp(clamp(logprobs - old_logprobs, -20, 20));
    L = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high)).

    Two ways to bound the loss of a token whose ratio ran far away, both off by default:

    - ``dual_clip = c`` (dual-clip PPO, Ye et al. 2020, arXiv 1912.09729; verl's
      ``clip_ratio_c``): after PPO's max, where A < 0, L = min(L, -c * A).
    - ``delta`` (two-sided clip, INTELLECT-2, arXiv 2505.07291; TRL's ``delta``):
      inside the max, the unclipped ratio is capped, L = max(-A * min(rho, delta),
      -A * clip(rho, 1 - eps_low, 1 + eps_high)), as TRL's grpo/dapo/bnpo/dr_grpo losses.

    They differ in where the bound acts. The dual clip bounds the loss, and
    only of negative-advantage tokens. ``delta`` caps the ratio for every
    token: for A > 0 the clipped branch (at most 1 + eps_high) already wins,
    so with delta > 1 + eps_high (TRL and INTELLECT-2's recommendation; they
    use 4) it too changes only negative-advantage tokens with rho > delta,
    whose loss becomes -A * delta without gradient: then ``delta = d`` and
    ``dual_clip = d`` give the same loss and gradient (tests/test_ratio_clip.py).
    With delta <= 1 + eps_high the cap also binds for positive advantages
    (their upper clip becomes delta) and negative-advantage tokens are
    bounded at -A * (1 + eps_high), which no dual clip (c > 1 on the loss) does.
    Both may be set; the dual clip then applies after the capped max.

    Args:
        eps_low: lower clip range.
        eps_high: upper clip range; > eps_low is DAPO's clip-higher (arXiv 2503.14476).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A; None disables.
        delta: cap > 1 on the unclipped ratio (two-sided clip); None disables.
        level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO, arXiv 2507.18071): the
            ratio is the length-normalised sequence ratio s_i, clipped as above.
            With ``level="sequence"`` and no explicit ``agg``, the aggregation is
            ``seq_mean_token_mean`` (the sequence mean of the GSPO paper's eq. 5,
            TRL's GSPO recipe ``loss_type="grpo"`` and verl's ``compute_policy_loss_gspo``,
            which hard-codes "seq-mean-token-mean"); an explicit ``agg`` is kept.
            See docs/conventions.md.

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` (PPO clip active),
    ``clip_frac_dual``, ``clip_frac_delta`` (tokens whose loss the bound changed),
    ratio mean/min/max, ``approx_kl``.
    """

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
                 delta: float | None = None, level: str = "token", **shared: Any) -> None:
        if level == "sequence":
            shared.setdefault("agg", GSPO_AGG)
        super().__init__(**shared)
        if eps_low < 0 or eps_high < 0:
            raise ConfigError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
        if level not in ("token", "sequence"):
            raise ConfigError(f"level must be 'token' or 'sequence', got {level!r}")
        check_dual_clip(dual_clip)
        check_delta(delta)
        self.eps_low, self.eps_high, self.dual_clip, self.level = eps_low, eps_high, dual_clip, level
        self.delta = None if delta is None else float(delta)

    def kl_weight(self, batch: PolicyBatch) -> Tensor:
        """The KL's importance weight under ``kl_bias_correction``: rho_t, or at sequence level
        s_i = exp(mean over response i of (logprobs - old_logprobs)) broadcast ``[B, 1]`` with grad
        through every token of the response, as TRL's ``coef_1`` with ``importance_sampling_level="sequence"``."""
        if self.level != "sequence":
            return super().kl_weight(batch)
        mask = batch.mask.to(batch.logprobs.dtype)
        seq = ((batch.logprobs - batch.old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # [B]
        return torch.exp(seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).unsqueeze(-1)  # [B, 1]

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        if self.level == "sequence":
            log_ratio = sequence_log_ratio(batch.logprobs, batch.old_logprobs, batch.mask)  # [B, T]
        else:
            log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # [B, T]
        loss, active = clipped_surrogate(ratio, batch.advantages, self.eps_low, self.eps_high, self.dual_clip,
                                         self.delta)
        return loss, ratio_metrics(ratio, log_ratio, batch.mask, active)
