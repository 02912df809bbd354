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


def gradient_preserving_term(ratio: Tensor, advantages: Tensor, active: dict[str, Tensor], eps_low: float,
                             eps_high: float, beta_low: float | None, beta_high: float | None) -> Tensor:
    """GPPO's kept gradient on clipped tokens, as a per-token term of value 0 (arXiv 2508.07629, 2509.20712).

    With kept = rho / sg(rho) - 1 (value 0, gradient d log pi_t), the term is
    -beta_low (1 - eps_low) A kept on ``active["low"]`` and -beta_high (1 + eps_high) A kept on
    ``active["high"]``, 0 elsewhere: added to PPO's loss it leaves the value unchanged and gives
    each clipped token the gradient -beta (1 +/- eps) A d log pi_t instead of zero.
    """
    kept = ratio / ratio.detach() - 1  # [B, T], zero-valued, d kept / d logprobs = 1
    term = torch.zeros_like(ratio)  # [B, T]
    for beta, side, bound in ((beta_low, "low", 1 - eps_low), (beta_high, "high", 1 + eps_high)):
        if beta:
            term = term + torch.where(active[side], -beta * bound * advantages * kept, 0.0)  # [B, T]
    return term


def check_gppo(beta_low: float | None, beta_high: float | None, eps_low: float, dual_clip: float | None,
               delta: float | None, level: str) -> None:
    """GPPO's settings, and the combinations the reference (Kwai-Klear/CE-GPPO) does not define."""
    for key, beta in (("gppo_beta_low", beta_low), ("gppo_beta_high", beta_high)):
        if beta is not None and not beta >= 0:
            raise ConfigError(f"{key} must be >= 0 (or null for PPO's zero gradient; CE-GPPO uses 0.25-1), got {beta}")
    if beta_low is None and beta_high is None:
        return
    if delta is not None:
        raise ConfigError("gppo_beta_low / gppo_beta_high cannot be combined with delta (CE-GPPO has no two-sided "
                          "clip); use dual_clip or set delta: null")
    if level != "token":
        raise ConfigError("gppo_beta_low / gppo_beta_high need level: token (CE-GPPO clips token ratios; "
                          "GSPO's sequence ratio with kept gradients is undefined there)")
    if dual_clip is not None and beta_low and beta_low * (1 - eps_low) >= dual_clip:
        raise ConfigError(f"gppo_beta_low * (1 - eps_low) = {beta_low * (1 - eps_low)} must be < dual_clip = "
                          f"{dual_clip} (CE-GPPO's dual clip would cancel the kept gradient); lower gppo_beta_low")


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

    Gradient-preserving clipping (GPPO, Klear-Reasoner, arXiv 2508.07629; CE-GPPO,
    arXiv 2509.20712), off by default: with ``gppo_beta_low`` / ``gppo_beta_high``
    a clipped token keeps a bounded gradient instead of none. Where A < 0 and
    rho < 1 - eps_low the gradient is -beta_low (1 - eps_low) A d log pi_t; where
    A > 0 and rho > 1 + eps_high it is -beta_high (1 + eps_high) A d log pi_t
    (the reference's -beta (1 +/- eps) A rho / sg(rho)). GPPO is beta = 1 on both
    sides; CE-GPPO's code defaults are beta_low 0.25, beta_high 1.0. The loss
    value stays PPO's (the reference's value is beta times the clipped value on
    clipped tokens; the gradient is the same), so beta = 0 is exactly
    ``ratio_clip``. A side left None keeps PPO's zero gradient (GPPO's
    ``only_high`` is ``gppo_beta_high: 1``). Works with ``dual_clip`` (as the
    reference, applied after); refused with ``delta`` and ``level="sequence"``.

    Args:
        eps_low: lower clip range.
        eps_high: upper clip range; > eps_low is DAPO's clip-higher (arXiv 2503.14476).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A; None disables.
        delta: cap > 1 on the unclipped ratio (two-sided clip); None disables.
        gppo_beta_low: GPPO's gradient scale (>= 0) on tokens clipped low; None: zero gradient (PPO).
        gppo_beta_high: GPPO's gradient scale (>= 0) on tokens clipped high; None: zero gradient (PPO).
        level: ``token`` (PPO/GRPO) or ``sequence`` (GSPO, arXiv 2507.18071): the
            ratio is the length-normalised sequence ratio s_i, clipped as above.
            With ``level="sequence"`` and no explicit ``agg``, the aggregation is
            ``seq_mean_token_mean`` (the sequence mean of the GSPO paper's eq. 5,
            TRL's GSPO recipe ``loss_type="grpo"`` and verl's ``compute_policy_loss_gspo``,
            which hard-codes "seq-mean-token-mean"); an explicit ``agg`` is kept.
            See docs/conventions.md.

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` (PPO clip active),
    ``clip_frac_dual``, ``clip_frac_delta`` (tokens whose loss the bound changed),
    ratio mean/min/max, ``approx_kl``; with GPPO ``gppo_frac_low`` / ``gppo_frac_high``
    (clipped tokens that keep a gradient).
    """

    def __init__(self, *, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
                 delta: float | None = None, level: str = "token", gppo_beta_low: float | None = None,
                 gppo_beta_high: float | None = None, **shared: Any) -> None:
        if level == "sequence":
            shared.setdefault("agg", GSPO_AGG)
        super().__init__(**shared)
        if eps_low < 0 or eps_high < 0:
            raise ConfigError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
        if level not in ("token", "sequence"):
            raise ConfigError(f"level must be 'token' or 'sequence', got {level!r}")
        check_dual_clip(dual_clip)
        check_delta(delta)
        check_gppo(gppo_beta_low, gppo_beta_high, eps_low, dual_clip, delta, level)
        self.eps_low, self.eps_high, self.dual_clip, self.level = eps_low, eps_high, dual_clip, level
        self.gppo_beta_low = None if gppo_beta_low is None else float(gppo_beta_low)
        self.gppo_beta_high = None if gppo_beta_high is None else float(gppo_beta_high)
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
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        if self.gppo_beta_low is not None or self.gppo_beta_high is not None:
            # after the dual clip, as the reference: a token clipped low (loss (1 - eps_low) |A| < c |A|) is never
            # dual-clipped, and a token clipped high has A > 0, so the order leaves every value unchanged
            loss = loss + gradient_preserving_term(ratio, batch.advantages, active, self.eps_low, self.eps_high,
                                                   self.gppo_beta_low, self.gppo_beta_high)  # [B, T]
            for side, beta in (("low", self.gppo_beta_low), ("high", self.gppo_beta_high)):
                kept = active[side] if beta else torch.zeros_like(active[side])
                metrics[f"gppo_frac_{side}"] = masked_mean(kept.to(ratio.dtype), batch.mask)
        return loss, metrics
