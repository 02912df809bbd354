"""The token filters of :class:`Objective`, as functions of tensors; the Objective methods call them.

- ``entropy_top_quantile``: :func:`entropy_statistics` (a step statistic) keeps the
  counted tokens whose entropy is at least the step's (1 - rho)-quantile
  (:func:`linear_quantile`).
- ``off_policy_mask``: :func:`off_policy_keep` drops the tokens with A < 0 of a
  sequence whose mean KL(old || new) estimate exceeds the threshold.
- ``mask_truncated``: :func:`drop_truncated` zeroes the rows of truncated completions.
- ``m2_threshold``: M2PO's second-moment filter, a step statistic (:func:`m2_statistics`), below.

M2PO (Zheng et al. 2025, "Prosperity before Collapse: How Far Can Off-Policy RL
Reach with Stale Data on LLMs?", arXiv 2510.01161) bounds the second moment of
the log importance weights instead of clipping the ratio: with
M2_t = (log r_t)^2, r_t = pi_theta(a_t) / pi_old(a_t) on the sampled token,
the tokens with the largest M2_t are masked until the mean of M2 over the
remaining tokens is below the threshold tau_M2.

The rule is AReaL's ``_get_m2po_loss_mask`` (github.com/inclusionAI/AReaL,
areal/trainer/ppo/actor.py lines 813-850 at commit
4aef98d8d818af55b43621aaadba047ae10f4e77; applied at lines 446-448, the
squared log ratio at 769-810): sort M2 of the counted tokens descending, take
the suffix means S_i = mean(M2_(i), ..., M2_(n-1)), and mask the first k tokens,
k the first index with S_k < tau (strict); k = 0 masks nothing. When no suffix
mean is below tau AReaL masks all but the smallest token.

Here, unlike AReaL (per micro-batch and process), the sort runs over the
counted tokens of the whole optimizer step on every process
(``Reducer.cat``), so micro-batching and the process count do not change the
mask. Ties at the cut, which AReaL's unstable sort breaks arbitrarily, are
decided by value: every token with M2 >= M2_(k-1) is masked (the remaining mean
stays below tau, since each extra token removed is the largest left); in the
fallback every token above the smallest M2 is masked (all of them when all are equal).

Other differences from AReaL: M2 is taken against the objective's ``old_logprobs``
(AReaL: behaviour against proximal policy, lines 790-791; the same with
``rollout.proximal: bypass`` on a rollout's first update); the log ratio is
clamped to [-20, 20] and a NaN one (a sampler without log-probs) counts as 0;
the masked tokens keep counting in the token-mean denominator like every rlclip
filter (AReaL drops them from its micro-batch's count).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.lazy import torch
from rlclip.objectives.kl import LOG_RATIO_CLAMP

if TYPE_CHECKING:
    from torch import Tensor

M2_KEEP = "filter_m2_keep"
M2_MASKED = "filter_m2_masked"
M2_COUNTED = "filter_m2_counted"
M2_MEAN = "filter_m2_mean"
ENTROPY_KEEP = "filter_entropy_keep"
ENTROPY_KEPT = "filter_entropy_kept"
FILTER_KEYS = frozenset({ENTROPY_KEEP, M2_KEEP})


def linear_quantile(values: Tensor, q: float) -> Tensor | None:
    """The q-quantile of a 1-D tensor with linear interpolation (as ``torch.quantile``); None when empty.

    With n values sorted ascending as v: p = q (n - 1), lerp(v[floor p], v[ceil p], p - floor p).
    Unlike ``torch.quantile`` it has no input-size limit.
    """
    n = values.numel()
    if n == 0:
        return None
    ordered = values.sort().values
    pos = q * (n - 1)
    below, above = int(pos), min(int(pos) + 1, n - 1)
    return torch.lerp(ordered[below], ordered[above], ordered.new_tensor(pos - int(pos)))


def entropy_statistics(entropy: Tensor, mask: Tensor, top_quantile: float, reduce: Any) -> dict[str, Tensor]:
    """The step statistics of ``entropy_top_quantile``: the keep mask ``[B, T]`` (bool), threshold and kept count.

    ``entropy`` ``[B, T]`` of the current policy, ``mask`` the counted tokens, ``reduce``
    a ``rlclip.objectives.reduce.Reducer`` (its ``cat`` pools the step's tokens over processes).
    """
    entropy, counted = entropy.detach(), mask.bool()  # [B, T]
    pooled = reduce.cat(entropy[counted])  # [n_step] over all processes
    threshold = linear_quantile(pooled, 1.0 - top_quantile)
    if threshold is None:  # no counted token anywhere: nothing trains
        return {ENTROPY_KEEP: torch.zeros_like(counted), "filter_entropy_threshold": entropy.new_zeros(()),
                ENTROPY_KEPT: entropy.new_zeros(())}
    return {ENTROPY_KEEP: (entropy >= threshold) & counted, "filter_entropy_threshold": threshold,
            ENTROPY_KEPT: (pooled >= threshold).sum().to(entropy.dtype)}


def off_policy_keep(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    """The keep multiplier ``[B, T]`` of ``off_policy_mask``: 0 where A < 0 and the sequence's mean
    KL(old || new) estimate, mean_t(old_logprobs - logprobs), exceeds ``threshold``."""
    mask = mask.to(logprobs.dtype)
    kl = torch.nan_to_num(old_logprobs - logprobs.detach(), nan=0.0)  # [B, T]
    seq_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    return ((advantages >= 0) | (seq_kl <= threshold)).to(mask.dtype)  # [B, T]


def drop_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """``mask`` ``[B, T]`` with the rows of truncated completions (``truncated [B]`` bool) zeroed."""
    return mask * (~truncated.bool()).unsqueeze(-1).to(mask.dtype)  # [B, T]


def second_moment(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    """M2 ``[B, T]`` float64 = (clamp(logprobs - old_logprobs, -20, 20))^2, detached; 0 where either is NaN."""
    log_ratio = torch.nan_to_num(logprobs.detach().double() - old_logprobs.detach().double(), nan=0.0)
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).square()


def m2_cut(values: Tensor, threshold: float) -> Tensor:
    """The cut c (0-d float64): tokens with M2 >= c are masked; inf masks nothing.

    ``values``: M2 of every counted token of the step (1-D, any order).
    """
    inf = values.new_tensor(float("inf"))
    n = values.numel()
    if n == 0:
        return inf
    ordered = values.sort(descending=True).values  # [n]
    suffix_mean = ordered.flip(0).cumsum(0).flip(0) / torch.arange(n, 0, -1, dtype=ordered.dtype,
                                                                   device=ordered.device)  # [n]
    below = torch.nonzero(suffix_mean < threshold).flatten()
    if below.numel() > 0:
        k = int(below[0])
        return inf if k == 0 else ordered[k - 1]
    above_min = ordered[ordered > ordered[-1]]  # fallback: keep only the tokens with the smallest M2
    return above_min.min() if above_min.numel() > 0 else inf


def m2_statistics(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, threshold: float,
                  reduce: Any) -> dict[str, Tensor]:
    """The step statistics of ``m2_threshold``: the keep mask ``[B, T]`` (bool) and 0-d counts.

    ``logprobs`` are the current policy's (detached), ``mask`` the counted tokens
    (``mask_truncated`` applied), ``reduce`` a ``rlclip.objectives.reduce.Reducer``
    (its ``cat`` pools the step's tokens over processes). Returns ``filter_m2_keep``
    (counted and not masked), ``filter_m2_masked`` and ``filter_m2_counted`` (token
    counts over the step) and ``filter_m2_mean`` (mean M2 over the step before masking).
    """
    m2 = second_moment(logprobs, old_logprobs)  # [B, T]
    counted = mask.bool()
    pooled = reduce.cat(m2[counted])  # [n_step] over all processes
    cut = m2_cut(pooled, threshold)
    n = pooled.new_tensor(float(pooled.numel()))
    return {M2_KEEP: counted & (m2 < cut), M2_MASKED: (pooled >= cut).sum().to(pooled.dtype), M2_COUNTED: n,
            M2_MEAN: pooled.sum() / n.clamp_min(1)}
