"""Rejection masks of the rollout correction: drop tokens or whole responses whose sampler mismatch is too large.

Each criterion ``{metric, lower, upper}`` of ``rollout.rejection`` measures the
mismatch between the sampler mu and the proximal policy pi_prox (the policy
the objective's ratio is taken against) on the sampled tokens and removes the
tokens (``token_*``) or whole responses (``seq_*``) that fall outside
[lower, upper] from the completion mask, so that they leave the loss and its
token counts. Metric names, statistics and bound semantics are those of verl's
``rollout_rs`` (volcengine/verl, commit b178a3cd56f58b2d502255daba591e92833930a7,
verl/trainer/ppo/rollout_corr_helper.py lines 77-89 for the names, 221-224 for
the per-token estimators, 232-243 for the sequence reductions, 271-331 for the
bounds); the sequence-max criteria are Trust Region Masking (Li et al.,
arXiv 2512.23075), which masks a response when any of its tokens leaves the
trust region.

Statistics, with log r_t = clamp(log pi_prox(a_t) - log mu(a_t), -20, 20) on a
counted token (0 where the sampler gave no log-prob, NaN: ratio 1):

- k1_t = -log r_t = log mu - log pi_prox; k2_t = (log r_t)^2 / 2;
  k3_t = r_t - 1 - log r_t. Averaged under mu all three estimate KL(mu || pi_prox).
- ``token_kX``: k_t itself; ``seq_sum_kX``: sum of k_t over the response's
  counted tokens; ``seq_mean_kX``: that sum over their number; ``seq_max_kX``:
  their maximum (k2, k3 only: k1 has no sign).

Bounds are in the statistic's own units and inclusive (a value equal to a
bound is kept, as verl's ``>=`` / ``<=``). ``upper`` is required. k1 takes a
lower bound, which defaults to -upper (verl's reciprocal ratio default
1/upper, line 125, in log units); k2 and k3 are >= 0 and take only ``upper``
(> 0), as verl. verl states k1 bounds as ratios a_b and takes their logs
(lines 259-260): ``rollout_rs_threshold: "a_b"`` is ``lower: log a, upper:
log b`` here. Every criterion is evaluated on the original counted tokens
(verl's statistics all use the unmodified response mask), so the order of the
list does not change the result; a token survives when it passes them all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, kl_estimate

if TYPE_CHECKING:
    from torch import Tensor

REJECTION_METRICS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                     "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
CRITERION_KEYS = ("metric", "lower", "upper")


@dataclass(frozen=True)
class Criterion:
    """One resolved rejection criterion: keep where lower <= statistic <= upper (lower None: no lower bound)."""

    metric: str
    upper: float
    lower: float | None = None

    @property
    def estimator(self) -> str:
        """``k1``, ``k2`` or ``k3``."""
        return self.metric[-2:]

    @property
    def reduction(self) -> str:
        """``token``, ``sum``, ``mean`` or ``max``."""
        return "token" if self.metric.startswith("token") else self.metric.split("_")[1]


def _bound(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{where} must be a number, got {value!r}; e.g. 0.01")
    return float(value)


def parse_criteria(rejection: Sequence[Any] | None) -> list[Criterion]:
    """Check ``rollout.rejection`` and resolve its defaults; one-line ConfigError naming the entry and the fix."""
    if rejection is None:
        return []
    if isinstance(rejection, (str, bytes, Mapping)) or not isinstance(rejection, Sequence):
        raise ConfigError(f"rollout.rejection must be a list of {{metric, lower, upper}}, got {rejection!r}; "
                          "e.g. [{metric: seq_max_k3, upper: 0.01}]")
    criteria: list[Criterion] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(rejection):
        where = f"rollout.rejection[{i}]"
        if isinstance(item, Criterion):
            item = {"metric": item.metric, "lower": item.lower, "upper": item.upper}
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} must be a mapping {{metric, lower, upper}}, got {item!r}; "
                              "e.g. {metric: seq_max_k3, upper: 0.01}")
        unknown = [str(k) for k in item if k not in CRITERION_KEYS]
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"use {', '.join(CRITERION_KEYS)}")
        metric = item.get("metric")
        if metric not in REJECTION_METRICS:
            raise ConfigError(f"unknown {where}.metric {metric!r}; choose one of {', '.join(REJECTION_METRICS)}")
        if metric in seen:
            raise ConfigError(f"rollout.rejection lists {metric} twice (entries {seen[metric]} and {i}); "
                              "keep one criterion per metric")
        seen[metric] = i
        lower, upper = _bound(item.get("lower"), f"{where}.lower"), _bound(item.get("upper"), f"{where}.upper")
        if upper is None:
            raise ConfigError(f"{where} ({metric}) needs an upper bound; set {where}.upper")
        if metric.endswith("k1"):
            lower = -upper if lower is None else lower
            if lower > upper:
                raise ConfigError(f"{where} ({metric}): lower={lower} is above upper={upper}; swap them")
        else:
            if lower is not None:
                raise ConfigError(f"{where}.lower is not allowed for {metric} (k2 and k3 are >= 0: only an upper "
                                  "bound applies, as verl's rollout_rs_threshold); remove lower")
            if upper <= 0:
                raise ConfigError(f"{where}.upper must be > 0 for {metric}, got {upper}; e.g. 0.01")
        criteria.append(Criterion(metric=metric, upper=upper, lower=lower))
    return criteria


def divergences(log_r: Tensor, estimator: str) -> Tensor:
    """Per-token k1, k2 or k3 of KL(mu || pi_prox) from log r = log pi_prox - log mu, clamped to [-20, 20].

    The estimators are ``rlclip.objectives.kl.kl_estimate``'s with its d = log r.
    """
    clamped = log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [N, T]
    return kl_estimate(torch.zeros_like(clamped), clamped, estimator)


def criterion_statistic(criterion: Criterion, log_r: Tensor, counted: Tensor) -> Tensor:
    """The statistic a criterion bounds: ``[N, T]`` per token, or ``[N, 1]`` per response.

    Args:
        log_r: ``[N, T]`` log pi_prox - log mu, 0 off the counted tokens.
        counted: ``[N, T]`` bool, the counted completion tokens.
    """
    k = torch.where(counted, divergences(log_r, criterion.estimator), torch.zeros_like(log_r))  # [N, T]
    if criterion.reduction == "token":
        return k
    if criterion.reduction == "sum":
        return k.sum(-1, keepdim=True)  # [N, 1]
    if criterion.reduction == "mean":
        return k.sum(-1, keepdim=True) / counted.sum(-1, keepdim=True).clamp_min(1)  # [N, 1]
    peak = k.masked_fill(~counted, float("-inf")).amax(-1, keepdim=True)  # [N, 1]
    return torch.where(counted.any(-1, keepdim=True), peak, torch.zeros_like(peak))  # no counted token: 0


def rejected_tokens(criterion: Criterion, log_r: Tensor, counted: Tensor) -> Tensor:
    """``[N, T]`` bool: the counted tokens this criterion rejects (a ``seq_*`` verdict covers the whole response)."""
    stat = criterion_statistic(criterion, log_r, counted)  # [N, T] or [N, 1]
    inside = stat <= criterion.upper
    if criterion.lower is not None:
        inside = inside & (stat >= criterion.lower)
    return counted & ~inside  # [N, T]


def rejection_masks(log_r: Tensor, counted: Tensor, criteria: Sequence[Criterion]) -> list[Tensor]:
    """Each criterion's rejected counted tokens ``[N, T]`` (bool), in the order given."""
    return [rejected_tokens(c, log_r, counted) for c in criteria]
