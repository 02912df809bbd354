"""Importance-sampling (IS) correction of the sampler / trainer mismatch (vLLM backends).

A vLLM engine samples with its own kernels and numerics, so the probability
mu(a_t) it gave a sampled token differs from the trainer's pi_old(a_t) for the
same weights: the rollout is slightly off-policy even at the first pass. The
policy gradient is an expectation under pi_old; estimated from samples of mu
it is reweighted by the importance ratio

    r_t = pi_old(a_t) / mu(a_t) = exp(old_logprobs_t - sampler_logprobs_t),

with the ratio capped at C so that a rare token the sampler under-rates cannot
blow up the update (truncated importance sampling, TIS: Yao et al. 2025, "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training",
https://fengyao.notion.site/off-policy-rl; TRL's source names it "TIS" in
trl/generation/vllm_generation.py line 360 but does not cite the post).

Modes (``rollout.is_mode``), as TRL 1.16's ``vllm_importance_sampling_mode``
(trl/trainer/grpo_trainer.py lines 2660-2706; default ``sequence_mask`` and
cap 3.0 from trl/trainer/grpo_config.py lines 934-953), with
d_t = old_logprobs_t - sampler_logprobs_t on counted tokens (0 elsewhere, and 0
where the sampler gave no log-prob, i.e. NaN: such a token gets ratio 1):

- ``token_truncate``: w_t = min(exp(d_t), C)
- ``token_mask``:     w_t = exp(d_t) if exp(d_t) <= C else 0
- ``sequence_truncate``: w_t = min(exp(sum_s d_s), C) for every token of the response
- ``sequence_mask``:     w_t = exp(sum_s d_s) if it is <= C else 0 (the response drops out)
- ``none``: w_t = 1 (the statistics are still reported).

TRL's optional lower bound (``vllm_importance_sampling_clip_min``) is not
offered. The weights multiply each objective's per-token loss before
aggregation (``PolicyBatch.token_weights``); the KL penalty to the reference is
not weighted, as in TRL (grpo_trainer.py lines 3146-3150).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Reducer, kl_estimate

if TYPE_CHECKING:
    from torch import Tensor

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none")


def check_is_settings(mode: str, cap: float) -> None:
    """One-line ConfigError for an unknown mode or a cap that is not a positive number."""
    if mode not in IS_MODES:
        raise ConfigError(f"unknown rollout.is_mode {mode!r}; choose one of {', '.join(IS_MODES)}")
    if not (isinstance(cap, (int, float)) and cap > 0 and cap == cap):
        raise ConfigError(f"rollout.is_cap must be > 0, got {cap}; e.g. 3.0 (TRL's default)")


def log_ratios(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> Tensor:
    """d ``[B, T]`` = old_logprobs - sampler_logprobs on counted tokens; 0 on the others and where either is NaN."""
    counted = mask.bool()  # [B, T]
    diff = old_logprobs.detach() - sampler_logprobs.detach()  # [B, T]
    return torch.where(counted & ~torch.isnan(diff), diff, torch.zeros_like(diff))


def importance_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str, cap: float,
                       reduce: Reducer | None = None) -> tuple[Tensor, dict[str, float]]:
    """Per-token IS weights ``[B, T]`` (detached) and their ``rollout/...`` statistics.

    Args:
        old_logprobs: ``[B, T]`` the trainer's behaviour log-probs of the sampled tokens.
        sampler_logprobs: ``[B, T]`` the sampler's (vLLM's) log-probs of the same tokens.
        mask: ``[B, T]`` 1 on counted completion tokens.
        mode: one of ``IS_MODES`` (see the module docstring for the formulas).
        cap: C > 0, the cap of the ratio.
        reduce: sums / minima / maxima across processes for the statistics
            (``rlclip.utils.ProcessReducer``); None: this process alone.

    Sequence modes broadcast the response's weight over all its positions;
    token modes give weight 1 off the mask. The statistics are in
    :func:`is_statistics`.
    """
    check_is_settings(mode, cap)
    d = log_ratios(old_logprobs, sampler_logprobs, mask)  # [B, T]
    sequence = mode.startswith("sequence")
    log_r = d.sum(-1, keepdim=True).expand_as(d) if sequence else d  # [B, T]
    ratio = torch.exp(log_r)  # [B, T], before the cap
    if mode.endswith("truncate"):
        weights = ratio.clamp(max=cap)  # [B, T]
    elif mode.endswith("mask"):
        weights = ratio.masked_fill(ratio > cap, 0.0)  # [B, T]
    else:
        weights = torch.ones_like(ratio)  # [B, T]
    metrics = is_statistics(old_logprobs, sampler_logprobs, mask, log_r, weights, cap, sequence,
                            reduce or Reducer())
    return weights.detach().contiguous(), metrics


def is_statistics(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, log_r: Tensor, weights: Tensor,
                  cap: float, sequence: bool, reduce: Reducer) -> dict[str, float]:
    """The correction's statistics over all processes.

    Units are counted tokens (token modes and ``none``) or responses with a
    counted token (sequence modes):

    - ``rollout/is_ratio_mean``, ``_min``, ``_max``: the ratio before the cap
      (its log clamped at 20 here only, so that the statistics stay finite);
    - ``rollout/is_capped_frac``: units whose ratio exceeds C (clipped or
      zeroed by the mode; with ``none`` left as they are);
    - ``rollout/is_weight_mean``: the applied weight averaged over counted tokens;
    - ``rollout/sampler_kl``: KL(sampler || trainer) by k3 on the sampled
      tokens, mean of exp(d) - 1 - d (d clamped to [-20, 20]);
    - ``rollout/sampler_logp_diff_mean``, ``_max``: |old - sampler| log-prob
      over counted tokens (TRL's ``sampling/sampling_logp_difference``).

    Tokens whose sampler log-prob is NaN are left out of the last three.
    """
    counted = mask.bool()  # [B, T]
    units = counted.any(-1, keepdim=True) if sequence else counted  # [B, 1] or [B, T]
    log_r = log_r[:, :1] if sequence else log_r  # [B, 1] or [B, T]
    ratio = torch.exp(log_r.clamp(max=LOG_RATIO_CLAMP)).double()  # [B, 1] or [B, T]
    diff = (old_logprobs.detach() - sampler_logprobs.detach()).double()  # [B, T]
    scored = counted & ~torch.isnan(diff)  # [B, T] tokens with both log-probs
    k3 = kl_estimate(sampler_logprobs.detach().double(), old_logprobs.detach().double(), "k3")  # [B, T]
    zero = diff.new_zeros(())
    sums = reduce.sum(torch.stack([
        (ratio * units).sum(), units.sum().double(), ((ratio > cap) & units).sum().double(),
        (weights.double() * counted).sum(), counted.sum().double(),
        torch.where(scored, k3, zero).sum(), torch.where(scored, diff.abs(), zero).sum(), scored.sum().double(),
    ]))
    n_units, n_tokens, n_scored = sums[1].clamp_min(1), sums[4].clamp_min(1), sums[7].clamp_min(1)
    lowest = reduce.min(ratio[units].min() if bool(units.any()) else ratio.new_tensor(float("inf")))
    highest = reduce.max(ratio[units].max() if bool(units.any()) else ratio.new_tensor(float("-inf")))
    diff_max = reduce.max(diff.abs()[scored].max() if bool(scored.any()) else diff.new_tensor(float("-inf")))
    return {
        "rollout/is_ratio_mean": float(sums[0] / n_units),
        "rollout/is_ratio_min": float(lowest) if sums[1] > 0 else 0.0,
        "rollout/is_ratio_max": float(highest) if sums[1] > 0 else 0.0,
        "rollout/is_capped_frac": float(sums[2] / n_units),
        "rollout/is_weight_mean": float(sums[3] / n_tokens),
        "rollout/sampler_kl": float(sums[5] / n_scored),
        "rollout/sampler_logp_diff_mean": float(sums[6] / n_scored),
        "rollout/sampler_logp_diff_max": float(diff_max) if sums[7] > 0 else 0.0,
    }
