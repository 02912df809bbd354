"""``zclip``: z-score spike detection on EMA statistics of the gradient norm.

Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for
LLM Pre-Training", arXiv 2504.02507; follows the authors' code (github
bluorion-com/ZClip, zclip/zclip.py) and its setting names and defaults.
After a warm-up of norm clipping that seeds mu and sigma^2 from the raw norms,
z = (g - mu) / (sigma + eps); a spike (z > z_thresh) is clipped to
clip_factor * (mu + z_thresh^2 * sigma / z) (``adaptive_scaling``), to mu
(``mean``), or to mu + z_thresh * sigma (``mode="percentile"``), capped at
``max_grad_norm``; the EMA mu <- a mu + (1-a) x, sigma^2 <- a sigma^2 +
(1-a) (x - mu)^2 then takes the clipped value x. docs/grad_clipping.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.grad_clip.base import (
    EPS,
    GradClipper,
    _choice,
    _finite,
    _grads,
    _number,
    _optional_cap,
    clip_metrics,
    clip_scale,
    register_clipper,
    scale_grads,
)
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


@register_clipper("zclip")
class ZClipClipper(GradClipper):
    """ZClip: z-score spike detection on EMA statistics of the gradient norm.

    Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for
    LLM Pre-Training", arXiv 2504.02507; follows the authors' code
    (github bluorion-com/ZClip, zclip/zclip.py), whose setting names and
    defaults are used here (zclip.py:17-19).

    Warm-up (the first ``warmup_steps`` steps): norm clipping at
    ``max_grad_norm`` (zclip.py:199-200); the raw norms are collected, then
    mu = mean, sigma^2 = population variance of them (zclip.py:71-75).
    After warm-up, with sigma = sqrt(var) and z = (g - mu) / (sigma + eps):

    - ``mode="zscore"`` (default), when z > z_thresh, clip to
      ``clip_option="adaptive_scaling"`` (default; the reciprocal-z rule):
      clip_factor * (mu + z_thresh * sigma / (z / z_thresh))
      = clip_factor * (mu + z_thresh^2 * sigma / z), so a larger outlier is cut
      harder; ``clip_option="mean"``: mu (zclip.py:126-136);
    - ``mode="percentile"``: clip to mu + z_thresh * sigma whenever
      g > mu + z_thresh * sigma (zclip.py:122-125).

    The clip value is further capped at ``max_grad_norm`` when set
    (zclip.py:163-164). Then the EMA takes the clipped value, not the raw
    spike (zclip.py:209-210): mu <- a mu + (1-a) x, sigma^2 <- a sigma^2 +
    (1-a) (x - mu)^2 with the new mu (zclip.py:79-80), x = the clip value on a
    spike, else g (g even when only the ``max_grad_norm`` cap clipped it);
    ``skip_update_on_spike`` leaves the EMA unchanged on a spike instead.

    ``grad/threshold`` is the clip value on a clipped step, else the norm
    above which this step would have been clipped (mu + z_thresh (sigma + eps)
    in zscore mode, capped at ``max_grad_norm``).

    Args (defaults of zclip.py:17-19):
        alpha: EMA factor (0.97). z_thresh: 2.5. max_grad_norm: cap used in
        warm-up and after (1.0; None or 0: none). eps: 1e-6. warmup_steps: 25.
        mode: "zscore" | "percentile". clip_option: "adaptive_scaling" |
        "mean" (zscore mode only). clip_factor: multiplies the
        adaptive_scaling clip value (1.0). skip_update_on_spike: False.
    """

    MODES = ("zscore", "percentile")
    CLIP_OPTIONS = ("adaptive_scaling", "mean")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False) -> None:
        self.alpha = _number("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.z_thresh = _number("z_thresh", z_thresh, 0.0, low_open=True)
        self.max_grad_norm = _optional_cap("max_grad_norm", max_grad_norm)
        self.eps = _number("eps", eps, 0.0, low_open=True)
        self.warmup_steps = _number("warmup_steps", warmup_steps, 1, integer=True)
        self.mode = _choice("mode", mode, self.MODES)
        self.clip_option = _choice("clip_option", clip_option, self.CLIP_OPTIONS)
        self.clip_factor = _number("clip_factor", clip_factor, 0.0, low_open=True)
        if not isinstance(skip_update_on_spike, bool):
            raise ConfigError(f"grad_clip setting skip_update_on_spike must be true or false, "
                              f"got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self.buffer: list[float] = []
        self.initialized = False
        self.mean = 0.0
        self.var = 0.0

    def _cap(self, value: float) -> float:
        return value if self.max_grad_norm is None else min(value, self.max_grad_norm)

    def _spike_clip_value(self, norm: float) -> tuple[float | None, float]:
        """(clip value or None when no spike, the norm above which this step would be a spike)."""
        std = math.sqrt(self.var)
        if self.mode == "percentile":
            bound = self.mean + self.z_thresh * std
            return (bound if norm > bound else None), bound
        bound = self.mean + self.z_thresh * (std + self.eps)  # z > z_thresh  <=>  norm > bound
        z = (norm - self.mean) / (std + self.eps)
        if not z > self.z_thresh:
            return None, bound
        if self.clip_option == "mean":
            return self.mean, bound
        return (self.mean + self.z_thresh * std / (z / self.z_thresh)) * self.clip_factor, bound

    def apply(self, params: list[torch.nn.Parameter], norm: Tensor) -> dict[str, float]:
        value = _finite(norm)
        if not self.initialized:
            return self._warmup_step(params, value)
        clip_value, bound = self._spike_clip_value(value)
        threshold = self._cap(value if clip_value is None else clip_value)
        scale = clip_scale(value, threshold)
        scale_grads(_grads(params), scale)
        if clip_value is None or not self.skip_update_on_spike:
            self._update_ema(value if clip_value is None else clip_value)
        return clip_metrics(value, scale, threshold if scale < 1.0 else self._cap(bound))

    def _warmup_step(self, params: list[torch.nn.Parameter], value: float) -> dict[str, float]:
        self.buffer.append(value)
        if len(self.buffer) >= self.warmup_steps:
            self.mean = sum(self.buffer) / len(self.buffer)
            self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            self.initialized, self.buffer = True, []
        # the reference calls clip_grad_norm_ here: torch's rule, min(1, cap / (norm + 1e-6))
        scale = 1.0 if self.max_grad_norm is None else min(1.0, self.max_grad_norm / (value + EPS))
        scale_grads(_grads(params), scale)
        return clip_metrics(value, scale, self.max_grad_norm)

    def _update_ema(self, x: float) -> None:
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * x
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (x - self.mean) ** 2

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "buffer": list(self.buffer), "initialized": int(self.initialized),
                "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._state_of_mine(state):
            self.buffer = [float(v) for v in state["buffer"]]
            self.initialized = bool(state["initialized"])
            self.mean, self.var = float(state["mean"]), float(state["var"])
