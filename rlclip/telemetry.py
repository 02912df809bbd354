"""Uniform trust-region telemetry, ``trust/...``, for every objective (shipped or user-written).

Each objective bounds the policy update its own way (a hard clip, a soft gate,
a smoothed ratio, a projection), and each logs its own statistics. These
metrics measure all of them with one yardstick: the per-token gradient weight
the objective actually applies,

    w_t = (d loss / d logprob_t) / (d loss_PG / d logprob_t),
    loss_PG = agg(-A_t * logprob_t)    (the plain policy gradient, same aggregation)

so w_t = 1 is an unmodified policy-gradient token, 0 a token the objective
switched off (clipped, filtered, masked), and w_t < 0 a token pushed against
its advantage. The numerator is one extra autograd call on the loss with
respect to the log-probs (no model pass); the denominator is -A_t times the
aggregation's per-token weight, also by autograd, so it matches every ``agg``.
Tokens whose plain weight is 0 (A_t = 0) have no defined w_t and are left out
of the w-fractions. With a sparse support (TROLL) the numerator is the
gradient reaching the sampled token's log-prob through the support's slot 0 and
through ``logprobs``. The KL penalty to a reference, when set, is part of the
loss and so of w_t.

Logged per optimizer step, over the counted tokens of all micro-batches and processes:

- ``trust/zeroed_frac`` (|w| < 1e-6), ``trust/attenuated_frac`` (1e-6 <= w < 0.5),
  ``trust/amplified_frac`` (w > 1.5), ``trust/reversed_frac`` (w <= -1e-6);
- ``trust/ratio_p05``, ``trust/ratio_p50``, ``trust/ratio_p95``: quantiles of pi_theta / pi_old;
- ``trust/kl_old_new``: KL(pi_old || pi_theta) by k3 on the sampled tokens,
  mean of (r - 1) - log r with r = pi_theta / pi_old;
- with entropy: ``trust/entropy_mean`` and ``trust/zeroed_frac_entropy_q1`` .. ``_q5``,
  the zeroed fraction in each entropy quintile of the step's tokens (q1 lowest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, Reducer, linear_quantile

if TYPE_CHECKING:
    from torch import Tensor

    from rlclip.types import PolicyBatch

ZERO = 1e-6
"""|w| below this counts as zeroed."""
QUINTILES = 5


def gradient_weights(loss: Tensor, batch: PolicyBatch, objective: Objective) -> tuple[Tensor, Tensor]:
    """``(w [B, T], defined [B, T] bool)``: the applied over the plain policy-gradient weight per token."""
    inputs = [batch.logprobs] + ([batch.support_logprobs] if batch.support_logprobs is not None else [])
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    applied = torch.zeros_like(batch.logprobs) if grads[0] is None else grads[0]  # [B, T]
    if len(grads) > 1 and grads[1] is not None:
        applied = applied + grads[1][..., 0]
    counted = objective.count_masked(batch)
    with torch.enable_grad():
        probe = torch.zeros_like(batch.logprobs, requires_grad=True)  # [B, T]
        (per_token_weight,) = torch.autograd.grad(objective.aggregate(probe, counted), probe)
    plain = -batch.advantages * per_token_weight  # [B, T]: d agg(-A logp) / d logp
    defined = (plain.abs() > 0) & counted.mask.bool()
    w = torch.where(defined, applied.detach() / torch.where(defined, plain, torch.ones_like(plain)),
                    torch.zeros_like(plain))
    return w, defined


class TrustTelemetry:
    """Collects one optimizer step's tokens micro-batch by micro-batch, then reduces them into ``trust/...``."""

    def __init__(self) -> None:
        self._parts: list[dict[str, Tensor]] = []

    def observe(self, loss: Tensor, batch: PolicyBatch, objective: Objective) -> None:
        """One micro-batch: its loss (before backward) and the batch the objective saw."""
        w, defined = gradient_weights(loss, batch, objective)
        counted = objective.count_masked(batch).mask.bool()  # [B, T]
        log_ratio = (batch.logprobs.detach() - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        part = {"w": w[defined], "log_ratio": log_ratio[counted]}
        if batch.entropy is not None:
            part["entropy_w"] = batch.entropy.detach()[defined]
            part["entropy"] = batch.entropy.detach()[counted]
        self._parts.append({k: v.double() for k, v in part.items()})

    def end_step(self, reduce: Reducer) -> dict[str, float]:
        """The step's metrics over all processes (every process must call it); resets the collection."""
        keys = self._parts[0].keys() if self._parts else ()
        pooled = {k: reduce.cat(torch.cat([p[k] for p in self._parts])) for k in keys}
        self._parts = []
        if not pooled:
            return {}
        w, log_ratio = pooled["w"], pooled["log_ratio"]
        out: dict[str, float] = {}
        if w.numel():
            zeroed = w.abs() < ZERO
            out.update({"trust/zeroed_frac": _mean(zeroed), "trust/attenuated_frac": _mean((w >= ZERO) & (w < 0.5)),
                        "trust/amplified_frac": _mean(w > 1.5), "trust/reversed_frac": _mean(w <= -ZERO)})
            if "entropy_w" in pooled:
                out.update(_by_quintile(pooled["entropy_w"], zeroed))
        if log_ratio.numel():
            ratio = log_ratio.exp()
            for q in (5, 50, 95):
                out[f"trust/ratio_p{q:02d}"] = float(linear_quantile(ratio, q / 100))
            out["trust/kl_old_new"] = float((ratio - 1 - log_ratio).mean())
            if "entropy" in pooled:
                out["trust/entropy_mean"] = float(pooled["entropy"].mean())
        return out


def _mean(flags: Tensor) -> float:
    return float(flags.double().mean())


def _by_quintile(entropy: Tensor, zeroed: Tensor) -> dict[str, Any]:
    """Zeroed fraction within each entropy quintile (edges: the 20/40/60/80% quantiles; q1 lowest)."""
    edges = [linear_quantile(entropy, k / QUINTILES) for k in range(1, QUINTILES)]
    bins = torch.bucketize(entropy, torch.stack(edges), right=True) if edges[0] is not None else None
    out = {}
    for k in range(QUINTILES):
        members = bins == k
        if bool(members.any()):
            out[f"trust/zeroed_frac_entropy_q{k + 1}"] = _mean(zeroed[members])
    return out
