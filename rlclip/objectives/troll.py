"""TROLL (Becker, Freymuth et al., arXiv 2510.03817): a per-token KL trust-region projection.

Per completion token, over the categories of a sparse support (``rlclip/policy/support.py``:
the sampled token, the old policy's and the current policy's top sets) plus
one *tail* bucket holding the rest of the mass, with q = pi_theta (grad) and
p = pi_old, the projection is

    pi~ = argmin_pi KL(pi || q)  s.t.  KL(pi || p) <= kl_bound.

If KL(q || p) <= kl_bound, pi~ = q. Otherwise the minimiser is the geometric
interpolation

    log pi~ = (log q + eta * log p) / (1 + eta) - log Z(eta),

with eta > 0 the root of KL(pi~_eta || p) = kl_bound, monotone decreasing in
eta. With s = 1 / (1 + eta) the constraint is KL(s) = s E[d] - log Z with
d = log q - log p, and dKL/ds = s Var_pi~(d) > 0; the root is found by a
safeguarded Newton iteration on log KL against log s (bisection inside the
bracket as fall-back), in float64, vectorised over all projected tokens.

Gradient: ``eta_grad="implicit"`` differentiates through eta by the
implicit-function theorem, d eta / d log q = -(dg/dlog q) / (dg/deta) with
g = KL(pi~_eta || p) - kl_bound, implemented as the value-preserving
correction eta = eta* - (g - sg(g)) / sg(dg/deta), dg/deta = -s^3 Var(d);
``"stop"`` treats eta as a constant.

Loss per token: -A * exp(log pi~(a) - log p(a)) + reg_coef * KL(q || sg(pi~)),
aggregated by the base class. No ratio clip.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch
from rlclip.objectives.base import LOG_RATIO_CLAMP, Objective, masked_max, masked_mean, register_objective
from rlclip.objectives.ratio_clip import ratio_metrics
from rlclip.types import PolicyBatch, SupportSpec

if TYPE_CHECKING:
    from torch import Tensor

ETA_GRADS = ("implicit", "stop")
NEG_LOG = -1e4
"""Finite stand-in for log 0 of unused slots: exp() underflows to exactly 0 and no NaN reaches a gradient."""
TAIL_FLOOR = 1e-30
"""Smallest tail mass; a support that covers the vocabulary leaves rounding noise, clamped here."""


def with_tail(support_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Categorical log-probs ``[..., S + 1]``: the used support slots, then the tail bucket.

    Unused slots get ``NEG_LOG`` (zero mass). The tail is log(1 - sum of the
    support probabilities), computed as log(-expm1(logsumexp)) and clamped at
    ``TAIL_FLOOR``, so its gradient reaches every support log-prob.
    """
    logp = support_logprobs.masked_fill(~mask, NEG_LOG)
    lse = torch.logsumexp(logp, dim=-1)
    tail = torch.log((-torch.expm1(lse)).clamp_min(TAIL_FLOOR))
    return torch.cat([logp, tail.unsqueeze(-1)], dim=-1)


def categorical_kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dimension, from log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def interpolate(log_q: Tensor, log_p: Tensor, eta: Tensor) -> Tensor:
    """log pi~_eta = (log q + eta log p) / (1 + eta) - log Z(eta); ``eta`` has the batch shape."""
    eta = eta.unsqueeze(-1)
    logits = (log_q + eta * log_p) / (1 + eta)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def _kl_and_var(s: Tensor, d: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    """KL(pi_s || p) and Var_{pi_s}(d) for log pi_s = log p + s d - log Z(s)."""
    a = log_p + s.unsqueeze(-1) * d
    log_z = torch.logsumexp(a, dim=-1)
    w = torch.exp(a - log_z.unsqueeze(-1))
    m1 = (w * d).sum(-1)
    var = ((w * d * d).sum(-1) - m1 * m1).clamp_min(0)
    return s * m1 - log_z, var


def solve_interpolation(log_q: Tensor, log_p: Tensor, bound: float, max_iter: int = 60,
                        tol: float = 1e-13) -> Tensor:
    """s in (0, 1] with KL(pi_s || p) = bound, for rows ``[N, C]`` with KL(q || p) > bound (no grad).

    Safeguarded Newton on log KL(s) against log s (slope s^2 Var / KL): near
    s = 0, KL ~ s^2 Var / 2 so the step is nearly exact; a step leaving the
    bracket [lo, hi] (KL(lo) <= bound < KL(hi)) is replaced by bisection.
    Stops when every row has |log KL - log bound| < tol or a bracket at
    rounding level (about 5 iterations from s = 1 in practice).
    """
    with torch.no_grad():
        return _newton_interpolation(log_q, log_p, bound, max_iter, tol)


def _newton_interpolation(log_q: Tensor, log_p: Tensor, bound: float, max_iter: int, tol: float) -> Tensor:
    d = log_q - log_p
    s = torch.ones(d.shape[0], dtype=d.dtype, device=d.device)
    lo, hi = torch.zeros_like(s), torch.ones_like(s)
    log_bound = math.log(bound)
    for _ in range(max_iter):
        kl, var = _kl_and_var(s, d, log_p)
        above = kl > bound
        hi, lo = torch.where(above, s, hi), torch.where(above, lo, s)
        err = torch.log(kl.clamp_min(1e-300)) - log_bound
        done = (err.abs() < tol) | (hi - lo <= 4 * torch.finfo(s.dtype).eps * hi)
        if bool(done.all()):
            break
        slope = s * s * var / kl.clamp_min(1e-300)
        s_new = s * torch.exp(-err / slope)
        bad = ~torch.isfinite(s_new) | (s_new <= lo) | (s_new >= hi)
        s = torch.where(done, s, torch.where(bad, 0.5 * (lo + hi), s_new))
    return s


def _implicit_eta(log_q: Tensor, log_p: Tensor, eta_star: Tensor, bound: float) -> Tensor:
    """eta with the value eta* and the implicit-function gradient d eta / d log q."""
    log_pt = interpolate(log_q, log_p, eta_star)
    g = categorical_kl(log_pt, log_p) - bound
    with torch.no_grad():
        s = 1 / (1 + eta_star)
        _, var = _kl_and_var(s, log_q - log_p, log_p)
        dg_deta = -(s ** 3) * var.clamp_min(1e-300)
    return eta_star - (g - g.detach()) / dg_deta


def trust_region_projection(log_q: Tensor, log_p: Tensor, bound: float,
                            eta_grad: str = "implicit") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project q onto {pi : KL(pi || p) <= bound}, minimising KL(pi || q).

    ``log_q`` (grad) and ``log_p`` are full categorical log-probs ``[..., C]``
    (float64 recommended). Returns log pi~ ``[..., C]``, eta (0 where not
    projected; with grad under ``"implicit"``), KL(q || p) and the boolean
    projected mask, the last three of the batch shape.
    """
    shape = log_q.shape[:-1]
    lq, lp = log_q.reshape(-1, log_q.shape[-1]), log_p.reshape(-1, log_p.shape[-1])
    with torch.no_grad():
        kl0 = categorical_kl(lq, lp)
        projected = kl0 > bound
    rows = projected.nonzero().squeeze(-1)
    eta = lq.new_zeros(lq.shape[0])
    log_pt = lq
    if rows.numel():
        lq_p, lp_p = lq[rows], lp[rows]
        eta_p = 1 / solve_interpolation(lq_p.detach(), lp_p, bound) - 1
        if eta_grad == "implicit":
            eta_p = _implicit_eta(lq_p, lp_p, eta_p, bound)
        eta = eta.index_put((rows,), eta_p)
        log_pt = lq.index_put((rows,), interpolate(lq_p, lp_p, eta_p))
    return log_pt.view(log_q.shape), eta.view(shape), kl0.view(shape), projected.view(shape)


@register_objective("troll")
class Troll(Objective):
    """TROLL: trust-region projection of pi_theta onto a KL ball around pi_old (arXiv 2510.03817).

    See the module docstring for the projection and its gradient; the support
    comes from ``rlclip.policy`` (``support_spec`` below).

    Args:
        kl_bound: per-token bound on KL(pi~ || pi_old) (paper: 0.05).
        top_k: cap on each policy's top set (paper: 64).
        tail_mass: each top set is the smallest set reaching 1 - tail_mass of
            probability (paper: 1e-5).
        reg_coef: weight of the regression term KL(pi_theta || sg(pi~)) (paper's alpha: 1).
        eta_grad: ``implicit`` (differentiate through eta) or ``stop`` (eta constant).
    """

    needs = frozenset({"support"})

    def __init__(self, *, kl_bound: float = 0.05, top_k: int = 64, tail_mass: float = 1e-5,
                 reg_coef: float = 1.0, eta_grad: str = "implicit", **shared: Any) -> None:
        super().__init__(**shared)
        if not (isinstance(kl_bound, (int, float)) and math.isfinite(kl_bound) and kl_bound > 0):
            raise ConfigError(f"kl_bound must be a finite number > 0, got {kl_bound!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if not (isinstance(tail_mass, (int, float)) and 0 <= tail_mass < 1):
            raise ConfigError(f"tail_mass must be in [0, 1), got {tail_mass!r}")
        if not (isinstance(reg_coef, (int, float)) and math.isfinite(reg_coef) and reg_coef >= 0):
            raise ConfigError(f"reg_coef must be a finite number >= 0, got {reg_coef!r}")
        if eta_grad not in ETA_GRADS:
            raise ConfigError(f"eta_grad must be one of {', '.join(ETA_GRADS)}, got {eta_grad!r}")
        self.kl_bound, self.reg_coef, self.eta_grad = float(kl_bound), float(reg_coef), eta_grad
        self.support_spec = SupportSpec(top_k=top_k, tail_mass=float(tail_mass))

    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        counted = batch.mask > 0  # [B, T]
        if not bool(batch.support_mask[..., 0][counted].all()):
            raise ValueError("troll: support slot 0 must hold the sampled token (support_mask[..., 0] = 1)")
        used = batch.support_mask.bool() & counted.unsqueeze(-1)  # [B, T, S]; padding tokens: no slot
        log_q = with_tail(batch.support_logprobs.double(), used)  # [B, T, S+1], grad
        log_p = with_tail(batch.old_support_logprobs.detach().double(), used)
        log_pt, eta, kl0, projected = trust_region_projection(log_q, log_p, self.kl_bound, self.eta_grad)
        log_ratio = (log_pt[..., 0] - log_p[..., 0]).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
        ratio = torch.exp(log_ratio)
        regression = categorical_kl(log_q, log_pt.detach())  # KL(q || sg(pi~)) [B, T]
        loss = -batch.advantages.double() * ratio + self.reg_coef * regression
        metrics = self._metrics(batch, log_pt, log_p, eta, kl0, projected, regression)
        metrics.update(ratio_metrics(ratio, log_ratio, batch.mask, {}))
        return loss.to(batch.support_logprobs.dtype), metrics

    def _metrics(self, batch: PolicyBatch, log_pt: Tensor, log_p: Tensor, eta: Tensor, kl0: Tensor,
                 projected: Tensor, regression: Tensor) -> dict[str, Any]:
        mask = batch.mask
        kl_after = categorical_kl(log_pt.detach(), log_p)
        on = projected.to(mask.dtype) * mask
        return {
            "projected_frac": masked_mean(projected.double(), mask),
            "eta_mean": masked_mean(eta.detach(), on),
            "kl_before": masked_mean(kl0, mask),
            "kl_after": masked_mean(kl_after, mask),
            "kl_after_max": masked_max(kl_after, mask),
            "regression_kl": masked_mean(regression.detach(), mask),
            "support_size": masked_mean(batch.support_mask.sum(-1).double(), mask),
            "old_tail_mass": masked_mean(log_p[..., -1].exp(), mask),
        }
