"""Entropy bonus and adaptive entropy control (Skywork-OR1, arXiv 2505.22312).

With coefficient c_k at optimizer step k, the loss minimised is

    L_k = L_objective - c_k * H_k,    H_k = sum_t H_t m_t / sum_t m_t

where H_t = -sum_v pi(v) log pi(v) is the policy's entropy at completion
position t (at the sampling temperature, with gradient) and m_t selects the
tokens the objective trains: its counted tokens (after ``mask_truncated``)
and, with ``entropy_top_quantile``, only those the entropy filter keeps -- the
same set as TRL 1.16's ``effective_mask`` (the off-policy mask does not
apply). The sums run over the whole optimizer step on every process, so the
bonus does not change with micro-batching or the number of processes. TRL
divides by each micro-batch's own token count instead; the two agree with one
micro-batch per step.

Adaptive control (Skywork-OR1 section 4; TRL's ``use_adaptive_entropy``):
after step k the step's mean entropy H_k over m, all processes together,
moves the coefficient

    c_{k+1} = min(c_k + delta, c_max)   if H_k <= target
    c_{k+1} = max(c_k - delta, c_min)   otherwise

and step k+1 applies c_{k+1} only if H_k <= target (0 otherwise). Before the
first measurement nothing is applied (H_0 = inf, as TRL). The coefficient and
the last entropy are trainer state: they go into checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlclip.config import EntropyConfig


class EntropyBonus:
    """The entropy term of the loss and its coefficient controller (one per trainer)."""

    def __init__(self, config: EntropyConfig) -> None:
        self.config = config
        self.coef = float(config.coef)
        self.last_entropy = math.inf
        self._sum = 0.0  # this process's share of H_k, summed over the step's micro-batches

    @property
    def enabled(self) -> bool:
        """Whether the policy pass must return entropy with gradient (adaptive stays on at c = 0)."""
        return self.config.adaptive or self.coef != 0.0

    def applied_coef(self) -> float:
        """c applied at this step: the coefficient, gated on the last entropy in adaptive mode."""
        if self.config.adaptive:
            return self.coef if self.last_entropy <= self.config.target else 0.0
        return self.coef

    def loss(self, entropy: Tensor, mask: Tensor, num_tokens: Tensor) -> Tensor:
        """``-c * sum(H m) / num_tokens`` for one micro-batch (``entropy``, ``mask`` ``[B, T]``).

        ``num_tokens`` is the step's count of selected tokens over all processes,
        so the micro-batch terms sum to ``-c * H_k``.
        """
        share = (entropy * mask).sum() / num_tokens  # this micro-batch's part of H_k
        self._sum += float(share.detach())
        return -self.applied_coef() * share

    def end_step(self, step_entropy: float) -> dict[str, float]:
        """Close step k with its mean entropy H_k (all processes); update c in adaptive mode; the metrics."""
        applied = self.applied_coef()
        self._sum = 0.0
        if self.config.adaptive and math.isfinite(step_entropy):
            if step_entropy <= self.config.target:
                self.coef = min(self.coef + self.config.coef_delta, self.config.coef_max)
            else:
                self.coef = max(self.coef - self.config.coef_delta, self.config.coef_min)
            self.last_entropy = step_entropy
        return {"entropy/mean": step_entropy, "entropy/coef_applied": applied, "entropy/coef": self.coef}

    def local_sum(self, device: torch.device | str = "cpu") -> Tensor:
        """This process's share of the step's mean entropy (all-reduce it with a sum)."""
        return torch.tensor(self._sum, dtype=torch.float64, device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state.get("coef", self.config.coef))
        self.last_entropy = float(state.get("last_entropy", math.inf))
