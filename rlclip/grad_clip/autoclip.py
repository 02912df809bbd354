"""``autoclip``: clip to the p-th percentile of the history of gradient norms.

Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping
for Source Separation Networks", MLSP 2020 (arXiv 2007.14469). Per step, with
h the window of the last ``history_size`` norms: h <- h + [||g||] (appended
first, as the paper's code, pseeth/autoclip autoclip.py:25-27); threshold
eta = percentile(h, p) (linear interpolation, as numpy.percentile);
g <- g * eta / (||g|| + 1e-6) when ||g|| > eta. docs/grad_clipping.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rlclip.grad_clip.base import (
    GradClipper,
    _finite,
    _grads,
    _number,
    clip_metrics,
    clip_scale,
    register_clipper,
    scale_grads,
)
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy.percentile's default."""
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@register_clipper("autoclip")
class AutoClipClipper(GradClipper):
    """AutoClip: clip to the p-th percentile of the history of gradient norms.

    Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks", MLSP 2020 (arXiv 2007.14469).

    Per step, with h the window of the last ``history_size`` norms:
    h <- h + [||g||] (appended first, as the paper's code, pseeth/autoclip
    autoclip.py:25-27: ``grad_history.append(obs_grad_norm)`` then
    ``np.percentile(grad_history, clip_percentile)``); threshold
    eta = percentile(h, p) (linear interpolation); g <- g * eta / (||g|| + 1e-6)
    when ||g|| > eta. Appending first means the first step is never clipped
    (eta = ||g||) and the threshold never undershoots the current norm's rank.

    Args:
        clip_percentile: p in [0, 100]; default 10, the paper's recommendation
            (and its code's name for it).
        history_size: window of recent norms kept (default 1000, the
            ``history_length`` default of the authors' package,
            autoclip/torch/quantile.py:12); the paper keeps all norms, the
            window keeps memory constant over long runs.
    """

    def __init__(self, clip_percentile: float = 10.0, history_size: int = 1000) -> None:
        self.clip_percentile = _number("clip_percentile", clip_percentile, 0.0, 100.0)
        self.history_size = _number("history_size", history_size, 1, integer=True)
        self.history: deque[float] = deque(maxlen=self.history_size)

    def apply(self, params: list[torch.nn.Parameter], norm: Tensor) -> dict[str, float]:
        value = _finite(norm)
        self.history.append(value)
        threshold = percentile(self.history, self.clip_percentile)
        scale = clip_scale(value, threshold)
        scale_grads(_grads(params), scale)
        return clip_metrics(value, scale, threshold)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._state_of_mine(state):
            self.history = deque((float(v) for v in state["history"]), maxlen=self.history_size)
