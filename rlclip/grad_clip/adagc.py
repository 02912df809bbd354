"""``adagc``: per-tensor clipping against an EMA of each tensor's own clipped gradient norm.

Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, "AdaGC: Improving Training
Stability for Large Language Model Pretraining", arXiv 2502.11034; follows the
authors' released code (github lishuai-97/AdaGC, megatron-gpt2.patch). After a
warm-up of global clipping at lambda_abs that sets gamma_i to each tensor's
minimum clipped norm: threshold_i = lambda_rel * gamma_i,
g_i <- g_i * threshold_i / (||g_i|| + eps) when ||g_i|| > threshold_i, and
gamma_i <- beta * gamma_i + (1 - beta) * min(||g_i||, threshold_i).
docs/grad_clipping.md.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.grad_clip.base import (
    GradClipper,
    _finite,
    _grads,
    _number,
    clip_metrics,
    register_clipper,
    scale_grads,
    tensor_grad_norms,
)
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor


@register_clipper("adagc")
class AdaGCClipper(GradClipper):
    """AdaGC: per-tensor clipping against an EMA of each tensor's own clipped gradient norm.

    Wang, Li, Chen, Zeng, Yang, Yu, Ma, Shen, "AdaGC: Improving Training
    Stability for Large Language Model Pretraining", arXiv 2502.11034;
    follows the authors' released code (github lishuai-97/AdaGC,
    megatron-gpt2.patch, class ``AdaGC`` in megatron/optimizer/clip_grads.py).

    Warm-up, steps t = 1..``warmup_steps`` (``steps <= start_clip_steps`` in
    the patch): global clipping, g <- g * min(1, lambda_abs / (||g|| + eps)),
    and gamma_i = the minimum over the warm-up of each tensor's clipped norm
    ||g_i|| (the patch's "collect minimum clipped tensor-wise norm").
    After warm-up, per tensor i with the previous gamma_i:
    threshold_i = lambda_rel * gamma_i; when ||g_i|| > threshold_i,
    g_i <- g_i * threshold_i / (||g_i|| + eps); then
    gamma_i <- beta * gamma_i + (1 - beta) * min(||g_i||, threshold_i).
    A tensor first seen after warm-up starts at gamma_i = ||g_i||; a tensor
    without a gradient keeps its gamma.

    State is keyed by the parameter's position in ``params`` (the trainer
    passes its trainable parameters in a fixed order) together with each
    position's element count, checked on every step so a resume with other
    trainable parameters fails clearly instead of mixing thresholds.

    ``grad/threshold`` is lambda_abs during warm-up, after it the L2 norm of
    the per-tensor thresholds of the tensors with gradients;
    ``grad/clipped`` is 1 when any tensor was clipped, and
    ``grad/clipped_tensors`` the fraction of tensors clipped.

    Args:
        lambda_rel: relative clip ratio (default 1.05, the paper's value;
            the released Megatron scripts use ``--clip-ratio 1.04``).
        beta: EMA factor (default 0.98, the paper's value; the scripts use
            ``--clip-beta 0.99``).
        warmup_steps: steps of global clipping (default 100, the patch's
            ``start_clip_steps``).
        lambda_abs: global max norm during warm-up (default 1.0, the
            scripts' ``--clip-grad 1.0``).
        eps: 1e-6 (the patch's default).
    """

    def __init__(self, lambda_rel: float = 1.05, beta: float = 0.98, warmup_steps: int = 100,
                 lambda_abs: float = 1.0, eps: float = 1e-6) -> None:
        self.lambda_rel = _number("lambda_rel", lambda_rel, 0.0, low_open=True)
        self.beta = _number("beta", beta, 0.0, 1.0, high_open=True)
        self.warmup_steps = _number("warmup_steps", warmup_steps, 0, integer=True)
        self.lambda_abs = _number("lambda_abs", lambda_abs, 0.0, low_open=True)
        self.eps = _number("eps", eps, 0.0, low_open=True)
        self.step = 0
        self.gamma: dict[int, float] = {}
        self.numels: list[int] | None = None
        self._cache: tuple[list[tuple[weakref.ref, int] | None], list[float | None]] | None = None

    def measure(self, params: list[torch.nn.Parameter]) -> Tensor:
        """Global norm from the per-tensor norms, which are kept for :meth:`apply`."""
        norms = tensor_grad_norms(params)
        self._cache = (self._grad_ids(params), norms)
        present = [n for n in norms if n is not None]
        return torch.tensor(math.sqrt(sum(n * n for n in present)) if present else 0.0, dtype=torch.float64)

    @staticmethod
    def _grad_ids(params: list[torch.nn.Parameter]) -> list[tuple[weakref.ref, int] | None]:
        """Which gradient tensors, at which in-place version: weak, so a skipped step's grads can be freed."""
        return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]

    def _norms(self, params: list[torch.nn.Parameter]) -> list[float | None]:
        cached, self._cache = self._cache, None  # clipping changes the gradients: use a cache once
        if cached is not None and len(cached[0]) == len(params) and all(
                (key is None) == (p.grad is None) and (key is None or (key[0]() is p.grad
                                                                       and key[1] == p.grad._version))
                for key, p in zip(cached[0], params)):
            return cached[1]
        return tensor_grad_norms(params)

    def _check_layout(self, params: list[torch.nn.Parameter]) -> None:
        numels = [p.numel() for p in params]
        if self.numels is not None and self.numels != numels:
            raise ConfigError(f"adagc state was built for {len(self.numels)} trainable tensors with other sizes "
                              f"than the {len(numels)} given now; resume with the same trainable parameters "
                              "(model, LoRA settings) or start afresh")
        self.numels = numels

    def apply(self, params: list[torch.nn.Parameter], norm: Tensor) -> dict[str, float]:
        value = _finite(norm)
        self._check_layout(params)
        norms = self._norms(params)
        self.step += 1
        if self.step <= self.warmup_steps:
            return self._warmup_step(params, norms, value)
        sq_post = sq_threshold = 0.0
        clipped = present = 0
        for i, (p, n) in enumerate(zip(params, norms)):
            if n is None:
                continue
            threshold = self.lambda_rel * self.gamma.setdefault(i, n)
            scale = threshold / (n + self.eps) if n > threshold else 1.0
            scale_grads([p.grad], scale)
            self.gamma[i] = self.beta * self.gamma[i] + (1.0 - self.beta) * min(n, threshold)
            sq_post, sq_threshold = sq_post + (n * scale) ** 2, sq_threshold + threshold ** 2
            clipped, present = clipped + (scale < 1.0), present + 1
        return {"grad/norm_pre": value, "grad/norm_post": math.sqrt(sq_post), "grad/clipped": float(clipped > 0),
                "grad/threshold": math.sqrt(sq_threshold), "grad/clipped_tensors": clipped / max(present, 1)}

    def _warmup_step(self, params: list[torch.nn.Parameter], norms: list[float | None],
                     value: float) -> dict[str, float]:
        scale = min(1.0, self.lambda_abs / (value + self.eps))  # the patch's GlobalGC: clip when coeff < 1
        scale_grads(_grads(params), scale)
        for i, n in enumerate(norms):
            if n is not None:
                self.gamma[i] = min(self.gamma.get(i, math.inf), n * scale)
        return {**clip_metrics(value, scale, self.lambda_abs), "grad/clipped_tensors": float(scale < 1.0)}

    def state_dict(self) -> dict[str, Any]:
        positions = sorted(self.gamma)
        return {"name": self.name, "step": self.step, "positions": positions,
                "gamma": [self.gamma[i] for i in positions], "numels": list(self.numels or [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._state_of_mine(state):
            self.step = int(state["step"])
            self.gamma = {int(i): float(g) for i, g in zip(state["positions"], state["gamma"])}
            self.numels = [int(n) for n in state["numels"]] or None
            self._cache = None
