"""Rollout correction: importance weights pi_prox / mu and rejection masks for an off-policy sampler.

Three policies meet in an off-policy update: the sampler mu that drew the
tokens (a vLLM engine, or an older policy version), the proximal policy
pi_prox the objective's ratio is taken against (``old_logprobs``) and the
trained policy pi_theta. The objective corrects pi_theta / pi_prox itself;
this module corrects the rest, pi_prox / mu, with a weight on each token's
loss (``PolicyBatch.token_weights``) and a rejection mask removed from the
completion mask. With d_t = log pi_prox(a_t) - log mu(a_t) on counted tokens
(0 elsewhere, and 0 where the sampler gave no log-prob, NaN: ratio 1), the
ratio of a unit is r = exp(clamp(d_t, -20, 20)) per token, or
r = exp(clamp(sum_s d_s, -20, 20)) per response (verl's SAFETY_BOUND,
volcengine/verl b178a3cd56f58b2d502255daba591e92833930a7,
verl/trainer/ppo/rollout_corr_helper.py lines 75, 530-544). With cap C
(``rollout.is_cap``) and floor F (``rollout.is_floor``, None: 0):

- ``token_truncate`` / ``sequence_truncate``: w = clamp(r, F, C)
  (truncated IS, TIS: Yao et al. 2025, "Your Efficient RL Framework Secretly
  Brings You Off-Policy RL Training", https://fengyao.notion.site/off-policy-rl);
- ``token_mask`` / ``sequence_mask``: w = r if F <= r <= C else 0, both bounds
  kept; with a floor this is IcePop's band (Ring-1T, arXiv 2510.18855);
- ``none``: w = 1 (the statistics are still reported).

The modes, the default (``sequence_mask``, C = 3) and the floor are TRL 1.16's
``vllm_importance_sampling_mode`` / ``_clip_max`` / ``_clip_min``
(trl/trainer/grpo_trainer.py lines 2660-2706: truncate modes clamp to
[clip_min, clip_max], lines 2680-2685; mask modes zero ratios below clip_min
or above clip_max, lines 2686-2702; trl/trainer/grpo_config.py lines 947-962).
verl differs on the floor: its first version (commit 21271aabb,
verl/trainer/ppo/mismatch_helper.py lines 82 and 183-204) applied
``rollout_is_threshold_lower`` in its mask ("clip") mode only, and at
b178a3cd its IS weights are upper-truncated only (rollout_corr_helper.py line
562), masking having moved to rejection. rlclip follows TRL: a floor raises
truncated ratios.

Self-normalised IS (``rollout.is_batch_normalize``, verl's
``rollout_is_batch_normalize``, rollout_corr_helper.py lines 568-596): after
the cap, floor and mask, the weights are divided by their mean over the global
batch, over counted tokens in token modes and over responses (with a counted
token) in sequence modes, unless that mean is <= 1e-8. The mean runs over the
counted tokens before rejection, as verl computes the weights on the
unmodified response mask (lines 784-808).

Rejection (``rollout.rejection``) is in rlclip/rejection.py. The KL penalty to
the reference is not weighted, as in TRL (grpo_trainer.py lines 3146-3150).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import Reducer
from rlclip.objectives.importance import IS_MODES, capped_weights, log_ratios, unit_ratios
from rlclip.rejection import Criterion, divergences, parse_criteria, rejection_masks

if TYPE_CHECKING:
    from torch import Tensor

SNIS_MIN_MEAN = 1e-8  # verl normalises only above this mean (rollout_corr_helper.py line 592)


def check_is_settings(mode: str, cap: float) -> None:
    """One-line ConfigError for an unknown mode or a cap that is not a positive number."""
    if mode not in IS_MODES:
        raise ConfigError(f"unknown rollout.is_mode {mode!r}; choose one of {', '.join(IS_MODES)}")
    if not (isinstance(cap, (int, float)) and cap > 0 and cap == cap):
        raise ConfigError(f"rollout.is_cap must be > 0, got {cap}; e.g. 3.0 (TRL's default)")


def check_correction_settings(mode: str, cap: float, floor: float | None = None, batch_normalize: bool = False,
                              rejection: Sequence[Any] | None = ()) -> list[Criterion]:
    """Every rollout-correction setting; one-line ConfigError naming the bad value and the fix.

    Returns the resolved rejection criteria (rlclip/rejection.py).
    """
    check_is_settings(mode, cap)
    if floor is not None:
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor >= 0:
            raise ConfigError(f"rollout.is_floor must be >= 0, got {floor}; e.g. 0.5 (IcePop's lower bound), "
                              "or null for none")
        if mode == "none":
            raise ConfigError(f"rollout.is_floor={floor} has no effect with rollout.is_mode=none; "
                              "set is_floor: null or choose a truncate or mask mode")
        if floor >= cap:
            raise ConfigError(f"rollout.is_floor={floor} must be below rollout.is_cap={cap}; "
                              "lower is_floor or raise is_cap")
    if not isinstance(batch_normalize, bool):
        raise ConfigError(f"rollout.is_batch_normalize must be true or false, got {batch_normalize!r}")
    if batch_normalize and mode == "none":
        raise ConfigError("rollout.is_batch_normalize=true has no effect with rollout.is_mode=none (every weight "
                          "is 1); set is_batch_normalize: false or choose a truncate or mask mode")
    return parse_criteria(rejection)


def rollout_correction(prox_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, *, mode: str, cap: float,
                       floor: float | None = None, batch_normalize: bool = False,
                       rejection: Sequence[Any] = (), reduce: Reducer | None = None,
                       ) -> tuple[Tensor, Tensor, dict[str, float]]:
    """The weights pi_prox / mu, the rejection mask and their ``rollout/...`` statistics.

    Args:
        prox_logprobs: ``[N, T]`` log pi_prox of the sampled tokens (the rollout's ``old_logprobs``).
        sampler_logprobs: ``[N, T]`` log mu of the same tokens; NaN where the sampler gave none (ratio 1).
        mask: ``[N, T]`` 1 on counted completion tokens.
        mode, cap, floor, batch_normalize: see the module docstring.
        rejection: ``{metric, lower, upper}`` mappings (or ``Criterion``), rlclip/rejection.py.
        reduce: sums / minima / maxima across processes (``rlclip.utils.ProcessReducer``); None: this
            process alone. Every batch quantity (the SNIS mean, the statistics) goes through it, so splitting
            the rows over processes or calls with a reducer that combines them changes nothing.

    Returns:
        ``weights`` ``[N, T]`` detached (sequence modes broadcast the response's weight over all its positions;
        token modes give 1 off the mask), ``keep`` ``[N, T]`` float, 0 exactly on the counted tokens that a
        rejection criterion drops (multiply it into the completion mask), and the statistics
        (:func:`correction_statistics`).
    """
    criteria = check_correction_settings(mode, cap, floor, batch_normalize, rejection)
    reduce = reduce or Reducer()
    counted = mask.bool()  # [N, T]
    d = log_ratios(prox_logprobs, sampler_logprobs, mask)  # [N, T]
    sequence = mode.startswith("sequence")
    ratio = unit_ratios(d, mode)  # [N, T], before cap and floor
    weights = capped_weights(ratio, mode, cap, floor)  # [N, T]
    units = counted.any(-1, keepdim=True) if sequence else counted  # [N, 1] or [N, T]
    norm = None
    if batch_normalize:
        unit_w = weights[:, :1] if sequence else weights  # [N, 1] or [N, T]
        total = reduce.sum(torch.stack([(unit_w.double() * units).sum(), units.sum().double()]))
        mean = total[0] / total[1] if total[1] > 0 else total[0].new_zeros(())
        norm = float(mean) if mean > SNIS_MIN_MEAN else 1.0
        weights = weights / norm
    if not sequence:
        weights = torch.where(counted, weights, torch.ones_like(weights))  # [N, T]
    rejected = rejection_masks(d, counted, criteria)  # each [N, T] bool
    dropped = torch.zeros_like(counted)
    for r in rejected:
        dropped = dropped | r
    keep = (~dropped).to(weights.dtype)  # [N, T]
    scored = counted & ~torch.isnan(prox_logprobs.detach() - sampler_logprobs.detach())  # [N, T] both log-probs
    metrics = correction_statistics(d, counted, scored, ratio, weights, units, cap, floor, sequence, criteria,
                                    rejected, dropped, reduce)
    if norm is not None:
        metrics["rollout/is_batch_norm_factor"] = norm
    return weights.detach().contiguous(), keep.detach(), metrics


def importance_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str, cap: float,
                       reduce: Reducer | None = None) -> tuple[Tensor, dict[str, float]]:
    """Per-token IS weights ``[B, T]`` (detached) and their statistics: :func:`rollout_correction` with no
    floor, no SNIS and no rejection."""
    weights, _, metrics = rollout_correction(old_logprobs, sampler_logprobs, mask, mode=mode, cap=cap, reduce=reduce)
    return weights, metrics


def correction_statistics(d: Tensor, counted: Tensor, scored: Tensor, ratio: Tensor, weights: Tensor,
                          units: Tensor, cap: float, floor: float | None, sequence: bool,
                          criteria: Sequence[Criterion], rejected: Sequence[Tensor], dropped: Tensor,
                          reduce: Reducer) -> dict[str, float]:
    """The correction's statistics over all processes.

    Units are counted tokens (token modes and ``none``) or responses with a
    counted token (sequence modes). Before the correction:

    - ``rollout/is_ratio_mean``, ``_min``, ``_max``: the ratio r per unit;
    - ``rollout/is_capped_frac``, ``rollout/is_floored_frac``: units with r > C, r < F (clipped or zeroed by
      the mode; with ``none`` left as they are; 0 without a floor).

    After it, over counted tokens (before rejection, as the SNIS mean):

    - ``rollout/is_weight_mean``, ``_min``, ``_max``: the applied weight;
    - ``rollout/is_ess_frac``: (sum w)^2 / (n sum w^2), the effective sample size as a fraction of the
      tokens (verl's ``rollout_is_eff_sample_size``, rollout_corr_helper.py lines 688-694, without its clamp);
    - ``rollout/is_batch_norm_factor``: the SNIS mean divided out (only with ``is_batch_normalize``).

    The sampler mismatch, on tokens with both log-probs (NaN sampler log-probs left out):

    - ``rollout/sampler_kl_k1``, ``_k2``, ``_k3``: KL(mu || pi_prox) by k1 = -d, k2 = d^2 / 2,
      k3 = e^d - 1 - d (d clamped to [-20, 20]); ``rollout/sampler_kl`` = k3 (kept for compatibility);
    - ``rollout/sampler_logp_diff_mean``, ``_max``: |d| (TRL's ``sampling/sampling_logp_difference``).

    Rejection (only with criteria): ``rollout/rejected_frac/<metric>``, the fraction of counted tokens each
    criterion drops on its own; ``rollout/rejected_frac/total``, by all together;
    ``rollout/rejected_seq_frac``, responses that lost every counted token.
    """
    unit_ratio = (ratio[:, :1] if sequence else ratio).double()  # [N, 1] or [N, T]
    w = weights.double()  # [N, T]
    diff = d.double()  # [N, T]
    zero = diff.new_zeros(())
    kls = [torch.where(scored, divergences(diff, k), zero).sum() for k in ("k1", "k2", "k3")]
    responses = counted.any(-1)  # [N]
    lost = responses & ~(counted & ~dropped).any(-1)  # [N] every counted token dropped
    low = floor if floor is not None else float("-inf")
    sums = reduce.sum(torch.stack([
        (unit_ratio * units).sum(), units.sum().double(), ((unit_ratio > cap) & units).sum().double(),
        ((unit_ratio < low) & units).sum().double(),
        torch.where(counted, w, zero).sum(), torch.where(counted, w.square(), zero).sum(), counted.sum().double(),
        *kls, torch.where(scored, diff.abs(), zero).sum(), scored.sum().double(),
        dropped.sum().double(), responses.sum().double(), lost.sum().double(),
        *[r.sum().double() for r in rejected],
    ]))
    inf = diff.new_tensor(float("inf"))
    has_units, has_tokens, has_scored = bool(units.any()), bool(counted.any()), bool(scored.any())
    lowest = reduce.min(torch.stack([unit_ratio[units].min() if has_units else inf,
                                     w[counted].min() if has_tokens else inf]))
    highest = reduce.max(torch.stack([unit_ratio[units].max() if has_units else -inf,
                                      w[counted].max() if has_tokens else -inf,
                                      diff.abs()[scored].max() if has_scored else -inf]))
    n_units, n_tokens, n_scored = sums[1].clamp_min(1), sums[6].clamp_min(1), sums[11].clamp_min(1)
    any_units, any_tokens, any_scored = bool(sums[1] > 0), bool(sums[6] > 0), bool(sums[11] > 0)
    metrics = {
        "rollout/is_ratio_mean": float(sums[0] / n_units),
        "rollout/is_ratio_min": float(lowest[0]) if any_units else 0.0,
        "rollout/is_ratio_max": float(highest[0]) if any_units else 0.0,
        "rollout/is_capped_frac": float(sums[2] / n_units),
        "rollout/is_floored_frac": float(sums[3] / n_units),
        "rollout/is_weight_mean": float(sums[4] / n_tokens),
        "rollout/is_weight_min": float(lowest[1]) if any_tokens else 0.0,
        "rollout/is_weight_max": float(highest[1]) if any_tokens else 0.0,
        "rollout/is_ess_frac": float(sums[4].square() / (sums[6] * sums[5])) if sums[5] > 0 else 0.0,
        "rollout/sampler_kl_k1": float(sums[7] / n_scored),
        "rollout/sampler_kl_k2": float(sums[8] / n_scored),
        "rollout/sampler_kl_k3": float(sums[9] / n_scored),
        "rollout/sampler_kl": float(sums[9] / n_scored),
        "rollout/sampler_logp_diff_mean": float(sums[10] / n_scored),
        "rollout/sampler_logp_diff_max": float(highest[2]) if any_scored else 0.0,
    }
    if criteria:
        metrics["rollout/rejected_frac/total"] = float(sums[12] / n_tokens)
        metrics["rollout/rejected_seq_frac"] = float(sums[14] / sums[13].clamp_min(1))
        for i, criterion in enumerate(criteria):
            metrics[f"rollout/rejected_frac/{criterion.metric}"] = float(sums[15 + i] / n_tokens)
    return metrics
