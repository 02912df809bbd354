"""``norm``: fixed global-norm clipping, exactly ``torch.nn.utils.clip_grad_norm_(params, max_norm)``.

scale = min(1, max_norm / (||g|| + 1e-6)), computed in the norm's dtype as
torch does, so the clipped gradients are bit-identical to torch's; max_norm 0
disables clipping (the norms are still reported). docs/grad_clipping.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlclip.grad_clip.base import (
    EPS,
    GradClipper,
    _finite,
    _grads,
    _number,
    clip_metrics,
    register_clipper,
    scale_grads,
)
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


@register_clipper("norm")
class NormClipper(GradClipper):
    """Fixed global-norm clipping, exactly ``torch.nn.utils.clip_grad_norm_(params, max_norm)``.

    scale = min(1, max_norm / (||g|| + 1e-6)), computed in the norm's dtype as
    torch does, so the clipped gradients are bit-identical to torch's.

    Args:
        max_norm: the threshold (default 1.0, as ``train.max_grad_norm``); 0
            disables clipping, the norms are still reported.
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = _number("max_norm", max_norm, 0.0)

    def apply(self, params: list[torch.nn.Parameter], norm: Tensor) -> dict[str, float]:
        value = _finite(norm)
        if not self.max_norm:
            return clip_metrics(value, 1.0, None)
        norm = torch.as_tensor(norm)
        # torch's own arithmetic (torch/nn/utils/clip_grad.py, _clip_grads_with_norm_), then a float, so
        # the result is identical to clip_grad_norm_ and a DTensor gradient is never multiplied by a plain tensor
        scale = float(torch.clamp(self.max_norm / (norm + EPS), max=1.0))
        scale_grads(_grads(params), scale)
        return clip_metrics(value, scale, self.max_norm)
