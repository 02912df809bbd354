"""BAPO: clip bounds searched each optimizer step to balance positive and negative contributions (arXiv 2510.18927)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, Reducer, register_objective
from rlclip.objectives.ratio_clip import check_dual_clip, clipped_surrogate, ratio_metrics
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

LOW, HIGH, SHARE = "bapo_ratio_low", "bapo_ratio_high", "bapo_pos_share"


def bound_candidates(start: float, stop: float, step: float) -> list[float]:
    """start, then min(previous + step, stop) until ``stop`` is reached (just ``[start]`` when step is 0).

    The same float additions as the authors' loop, so the chosen bounds are bit-identical to theirs.
    """
    values = [start]
    while step > 0 and values[-1] < stop:
        values.append(min(values[-1] + step, stop))
    return values


def search_bounds(pos: list[float], neg: list[float], lows: list[float], highs: list[float], target: float,
                  eps: float) -> tuple[int, int, float]:
    """The authors' search over precomputed sums: indices of the chosen lower / upper bound and the ratio.

    ``pos[j]``: the positive contribution with upper bound ``highs[j]``; ``neg[i]``: the negative one with
    lower bound ``lows[i]``. The lower bound rises first, one step at a time, until pos/neg >= target or it
    reaches its maximum; then the upper bound does the same.
    """

    def ratio(i: int, j: int) -> float:
        return float("inf") if neg[i] <= 0 else pos[j] / (neg[i] + eps)

    i = j = 0
    while ratio(i, j) < target and i + 1 < len(lows):
        i += 1
    while ratio(i, j) < target and j + 1 < len(highs):
        j += 1
    return i, j, ratio(i, j)


@register_objective("bapo")
class BAPO(Objective):
    """BAPO (Xi et al. 2025, "BAPO: Stabilizing Off-Policy RL for LLMs via Balanced Policy Optimization
    with Adaptive Clipping", arXiv 2510.18927), as the authors' ``compute_policy_loss_bapo``
    (WooooDyy/BAPO 7287044444d5d578529ea464b45f090a36e8da3a, recipe/bapo/policy_loss.py lines 21-185).

    The clip bounds are explicit ratio bounds c_low < 1 < c_high (not 1 -/+ eps). With
    rho = exp(clamp(logprobs - old_logprobs, -20, 20)) and the counted tokens of the whole
    optimizer step on every process:

        P(c_high) = sum over A >= 0 of min(rho, c_high) * A        (positive contribution)
        N(c_low)  = sum over A < 0  of max(rho, c_low) * |A|        (negative contribution)
        r = P / (N + eps), or inf when N = 0

    Starting from (``ratio_lower_start``, ``ratio_upper_start``), while r < ``adv_ratio_target``
    c_low rises by ``ratio_lower_step`` up to ``ratio_lower_max``; then, while still short,
    c_high rises by ``ratio_upper_step`` up to ``ratio_upper_max``. The search restarts from the
    start values every step (as the authors' code). The loss is PPO's with those bounds and the
    dual clip: L = max(-A rho, -A clip(rho, c_low, c_high)); where A < 0, L = min(L, -c A).

    Unlike the authors' code, which searches once per micro-batch call (its sums all-reduced over
    data-parallel ranks in float32), the search runs once per optimizer step over all its
    micro-batches and processes (a step statistic, sums in float64), so the bounds do not depend on
    micro-batching. The chosen bounds are state (``ratio_low`` / ``ratio_high``, the last step's,
    saved in checkpoints); since every search restarts from the start values they do not change
    later updates.

    Defaults are the authors' recipe/bapo/config/bapo_trainer.yaml (lines 15-22): target 1.0,
    c_low 0.6 -> 0.8 and c_high 1.2 -> 2.0 in steps of 0.05, eps 1e-8; dual clip 3.0 is verl's
    ``clip_ratio_c`` default, which the authors' loss reads.

    Args:
        adv_ratio_target: the positive / negative contribution ratio to reach (>= 0).
        ratio_lower_start, ratio_lower_max, ratio_lower_step: range and step of c_low.
        ratio_upper_start, ratio_upper_max, ratio_upper_step: range and step of c_high.
        eps: added to the negative contribution.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A; None disables.

    Metrics: ``clip_low`` / ``clip_high`` (the bounds chosen), ``pos_share`` = P / (P + N) at those
    bounds, PPO's clip fractions, ratio mean/min/max, ``approx_kl``.
    """

    step_needs = frozenset({"logprobs"})

    def __init__(self, *, adv_ratio_target: float = 1.0, ratio_lower_start: float = 0.6,
                 ratio_lower_max: float = 0.8, ratio_lower_step: float = 0.05, ratio_upper_start: float = 1.2,
                 ratio_upper_max: float = 2.0, ratio_upper_step: float = 0.05, eps: float = 1e-8,
                 dual_clip: float | None = 3.0, **shared: Any) -> None:
        super().__init__(**shared)
        if not 0 <= ratio_lower_start <= ratio_lower_max <= 1:
            raise ConfigError(f"bapo: need 0 <= ratio_lower_start <= ratio_lower_max <= 1, got "
                              f"{ratio_lower_start}, {ratio_lower_max} (the authors use 0.6 and 0.8)")
        if not 1 <= ratio_upper_start <= ratio_upper_max:
            raise ConfigError(f"bapo: need 1 <= ratio_upper_start <= ratio_upper_max, got "
                              f"{ratio_upper_start}, {ratio_upper_max} (the authors use 1.2 and 2.0)")
        if not (ratio_lower_step >= 0 and ratio_upper_step >= 0):
            raise ConfigError(f"bapo: ratio_lower_step and ratio_upper_step must be >= 0 (0 freezes that bound), "
                              f"got {ratio_lower_step}, {ratio_upper_step}")
        if not (adv_ratio_target >= 0 and eps >= 0):
            raise ConfigError(f"bapo: adv_ratio_target and eps must be >= 0, got {adv_ratio_target}, {eps}")
        check_dual_clip(dual_clip)
        self.adv_ratio_target, self.eps, self.dual_clip = float(adv_ratio_target), float(eps), dual_clip
        self.ratio_lower_start, self.ratio_lower_max = float(ratio_lower_start), float(ratio_lower_max)
        self.ratio_lower_step = float(ratio_lower_step)
        self.ratio_upper_start, self.ratio_upper_max = float(ratio_upper_start), float(ratio_upper_max)
        self.ratio_upper_step = float(ratio_upper_step)
        self.ratio_low, self.ratio_high = self.ratio_lower_start, self.ratio_upper_start  # state: the last step's bounds

    @property
    def lows(self) -> list[float]:
        """The candidate lower bounds, in the order the search tries them."""
        return bound_candidates(self.ratio_lower_start, self.ratio_lower_max, self.ratio_lower_step)

    @property
    def highs(self) -> list[float]:
        """The candidate upper bounds, in the order the search tries them."""
        return bound_candidates(self.ratio_upper_start, self.ratio_upper_max, self.ratio_upper_step)

    def _ratio(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_ratio), log_ratio  # [B, T]

    def step_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        """The bounds of this step: P for every c_high candidate and N for every c_low candidate are
        summed over the step's tokens on all processes in one reduction, then searched."""
        ratio, _ = self._ratio(batch)
        ratio, adv = ratio.detach().double(), batch.advantages.detach().double()  # [B, T]
        mask = batch.mask.detach().double()  # [B, T]
        pos_w = torch.where(adv >= 0, adv, torch.zeros_like(adv)) * mask  # [B, T]
        neg_w = torch.where(adv < 0, -adv, torch.zeros_like(adv)) * mask  # [B, T]
        candidate_lows, candidate_highs = self.lows, self.highs
        highs = ratio.new_tensor(candidate_highs)  # [H]
        lows = ratio.new_tensor(candidate_lows)  # [L]
        pos = (torch.minimum(ratio.unsqueeze(-1), highs) * pos_w.unsqueeze(-1)).sum((0, 1))  # [H]
        neg = (torch.maximum(ratio.unsqueeze(-1), lows) * neg_w.unsqueeze(-1)).sum((0, 1))  # [L]
        sums = reduce.sum(torch.cat([pos, neg]))  # [H + L]
        pos, neg = sums[:len(candidate_highs)], sums[len(candidate_highs):]
        i, j, _ = search_bounds(pos.tolist(), neg.tolist(), candidate_lows, candidate_highs, self.adv_ratio_target,
                                self.eps)
        total = pos[j] + neg[i]
        share = pos[j] / total if total > 0 else total  # 0 when no token has a nonzero advantage
        return {LOW: ratio.new_tensor(candidate_lows[i]), HIGH: ratio.new_tensor(candidate_highs[j]), SHARE: share}

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        ratio, log_ratio = self._ratio(batch)
        stats = batch.step_stats  # set by Objective.__call__ or the trainer
        low, high = float(stats[LOW]), float(stats[HIGH])
        loss, active = clipped_surrogate(ratio, batch.advantages, 1.0 - low, high - 1.0, self.dual_clip)  # [B, T]
        metrics = ratio_metrics(ratio, log_ratio, batch.mask, active)
        metrics.update(clip_low=low, clip_high=high, pos_share=float(stats[SHARE]))
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ratio_low": self.ratio_low, "ratio_high": self.ratio_high}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ratio_low = float(state.get("ratio_low", self.ratio_low))
        self.ratio_high = float(state.get("ratio_high", self.ratio_high))

    def end_step(self, metrics: dict[str, float], num_sequences: float) -> None:
        super().end_step(metrics, num_sequences)
        if "clip_low" in metrics:
            # nearest candidate: the token-weighted mean of equal values may be off by an ulp
            self.ratio_low = min(self.lows, key=lambda b: abs(b - metrics["clip_low"]))
            self.ratio_high = min(self.highs, key=lambda b: abs(b - metrics["clip_high"]))
