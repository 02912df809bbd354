"""Gradient clippers (issue 17): ``norm``, ``autoclip``, ``zclip``, ``adagc``, registered by name.

The contract, helpers and registry are in :mod:`rlclip.grad_clip.base`, each
shipped clipper in its own module. Formulas, sources and defaults:
docs/grad_clipping.md.

>>> from rlclip.grad_clip import build_clipper
>>> clipper = build_clipper("zclip", z_thresh=2.5)
"""

from rlclip.grad_clip import (  # noqa: F401  (registers the shipped clippers)
    adagc,
    autoclip,
    norm,
    zclip,
)
from rlclip.grad_clip.adagc import AdaGCClipper
from rlclip.grad_clip.autoclip import AutoClipClipper, percentile
from rlclip.grad_clip.base import (
    _REGISTRY,  # noqa: F401  (tests unregister their own clippers from it)
    EPS,
    GradClipper,
    available_clippers,
    build_clipper,
    clip_metrics,
    clip_scale,
    clipper_parameters,
    global_grad_norm,
    register_clipper,
    scale_grads,
    tensor_grad_norms,
)
from rlclip.grad_clip.norm import NormClipper
from rlclip.grad_clip.zclip import ZClipClipper

__all__ = [
    "EPS",
    "AdaGCClipper",
    "AutoClipClipper",
    "GradClipper",
    "NormClipper",
    "ZClipClipper",
    "available_clippers",
    "build_clipper",
    "clip_metrics",
    "clip_scale",
    "clipper_parameters",
    "global_grad_norm",
    "percentile",
    "register_clipper",
    "scale_grads",
    "tensor_grad_norms",
]
