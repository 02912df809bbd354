"""Gradient clippers (issue 17): ``norm``, ``autoclip``, ``zclip``, ``adagc``, registered by name.

A clipper is a small class whose settings are constructor arguments, chosen in
a recipe as ``train: {grad_clip: {name: zclip, z_thresh: 2.5}}`` and built with
:func:`build_clipper` (the same pattern as the objectives' registry). Each
optimizer step the trainer calls

1. ``norm = clipper.measure(params)``: the global L2 norm of the gradients,
   pre-clip, identical on every process (DDP gradients are already
   all-reduced; FSDP2 DTensor gradients are reduced to the full norm here);
2. its non-finite guard: a NaN/inf norm skips the step, and ``apply`` is not
   called, so no clipper's history or EMA ever holds a non-finite value;
3. ``clipper.apply(params, norm)``: clips the gradients in place, updates the
   clipper's state and returns the metrics ``grad/norm_pre``,
   ``grad/norm_post``, ``grad/clipped`` (0.0/1.0) and ``grad/threshold``.

All adaptive state is kept in Python floats computed from the (identical)
reduced norms, so every process holds the same state, and ``state_dict()``
holds only floats, ints and lists: it goes through ``torch.save`` and JSON.
Formulas, sources and defaults: docs/grad_clipping.md.
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rlclip.errors import ConfigError
from rlclip.lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

EPS = 1e-6
"""Added to the norm in every scale factor threshold / (norm + EPS), as torch.nn.utils.clip_grad_norm_."""

_REGISTRY: dict[str, type[GradClipper]] = {}


# ---------------------------------------------------------------------------- norms and scaling
@functools.cache
def _dtensor_type() -> type | None:
    """FSDP2 gradients are DTensors; a torch build without distributed has none."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return None
    return DTensor


def _full(tensor: Tensor) -> Tensor:
    """A DTensor (an FSDP2 shard's partial norm) reduced to the full plain tensor; others unchanged."""
    if _dtensor_type() is not None and isinstance(tensor, _dtensor_type()):
        return tensor.full_tensor()
    return tensor


def _grads(params: Sequence[torch.nn.Parameter]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def global_grad_norm(params: Sequence[torch.nn.Parameter]) -> Tensor:
    """L2 norm over all gradients, computed as torch.nn.utils.clip_grad_norm_ does (0 when none)."""
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    with torch.no_grad():
        return _full(torch.nn.utils.get_total_norm(grads, norm_type=2.0)).detach()


def tensor_grad_norms(params: Sequence[torch.nn.Parameter]) -> list[float | None]:
    """L2 norm of each gradient by position in ``params`` (None where ``grad`` is None).

    Each norm is reduced over shards (DTensor) and computed in at least float32;
    one device sync for all of them.
    """
    norms, where = [], []
    with torch.no_grad():
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            dtype = torch.promote_types(p.grad.dtype, torch.float32)
            norms.append(_full(torch.linalg.vector_norm(p.grad.detach(), dtype=dtype)))
            where.append(i)
    out: list[float | None] = [None] * len(params)
    if norms:
        device = norms[0].device
        for i, value in zip(where, torch.stack([n.to(device, torch.float64) for n in norms]).tolist()):
            out[i] = value
    return out


def scale_grads(grads: Sequence[Tensor], factor: float) -> None:
    """Multiply gradients in place by a Python float (works for plain tensors and DTensors alike)."""
    if factor != 1.0:
        with torch.no_grad():
            for g in grads:
                g.mul_(factor)


def clip_scale(norm: float, threshold: float | None) -> float:
    """threshold / (norm + EPS) when norm > threshold, else 1 (no threshold: 1).

    The rule of the ZClip and AdaGC reference code (zclip/zclip.py:149, the
    AdaGC Megatron patch's ``clip_by_norm``).
    """
    if threshold is None or not norm > threshold:
        return 1.0
    return threshold / (norm + EPS)


def _finite(norm: Tensor | float) -> float:
    value = float(norm)
    if not math.isfinite(value):
        raise ValueError(f"a gradient clipper's apply() got the non-finite norm {value}; the trainer's "
                         "non-finite guard must skip such a step (it never reaches the clipper)")
    return value


def clip_metrics(norm: float, scale: float, threshold: float | None) -> dict[str, float]:
    """The four ``grad/*`` metrics; ``norm_post`` is scale x norm_pre (not re-measured), threshold 0 = none."""
    return {"grad/norm_pre": norm, "grad/norm_post": norm * scale, "grad/clipped": float(scale < 1.0),
            "grad/threshold": 0.0 if threshold is None else float(threshold)}


# ---------------------------------------------------------------------------- settings checks
def _number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
            integer: bool = False, low_open: bool = False, high_open: bool = False) -> Any:
    """``value`` as float (or int) within [low, high] (open ends on request), else ConfigError."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ConfigError(f"grad_clip setting {name} must be {kind}, got {value!r}")
    value = int(value) if integer else float(value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or not math.isfinite(value):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ConfigError(f"grad_clip setting {name} must be in {interval}, got {value}")
    return value


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ConfigError(f"grad_clip setting {name} must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def _optional_cap(name: str, value: Any) -> float | None:
    """A max-norm cap: None or 0 disable it (0 as ``train.max_grad_norm``), else a positive number."""
    if value is None:
        return None
    value = _number(name, value, 0.0)
    return value or None


# ---------------------------------------------------------------------------- base class and registry
class GradClipper(abc.ABC):
    """Base class of every gradient clipper.

    Subclasses take their settings as keyword constructor arguments, implement
    :meth:`apply` (and :meth:`measure` when they need more than the global
    norm) and keep their learned state in :meth:`state_dict`. Register one with
    ``@register_clipper("mine")`` and select it with
    ``train: {grad_clip: {name: mine, ...}}``.
    """

    name: ClassVar[str] = ""

    def measure(self, params: list[torch.nn.Parameter]) -> Tensor:
        """Global L2 norm of the gradients (0-d float tensor, pre-clip), identical on every rank.

        Under DDP the gradients are already all-reduced; DTensor gradients
        (FSDP2) are reduced to the full norm. Must not change the clipper's
        state: a non-finite result makes the trainer skip the step.
        """
        return global_grad_norm(params)

    @abc.abstractmethod
    def apply(self, params: list[torch.nn.Parameter], norm: Tensor) -> dict[str, float]:
        """Clip the gradients in place and update the state; only called with a finite ``norm``.

        Returns ``grad/norm_pre``, ``grad/norm_post``, ``grad/clipped`` (0.0/1.0)
        and ``grad/threshold`` (see :func:`clip_metrics`).
        """

    def state_dict(self) -> dict[str, Any]:
        """Learned state (floats, ints and lists only); a stateless clipper has none."""
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a stateless clipper only checks whose state it is)."""
        self._state_of_mine(state)

    def _state_of_mine(self, state: dict[str, Any]) -> bool:
        """False (with a warning) for another clipper's state: a resume that switched clippers starts afresh."""
        other = state.get("name", self.name)
        if other != self.name:
            warnings.warn(f"gradient clipper state saved by {other!r} is ignored by {self.name!r}; "
                          f"{self.name!r} starts with fresh statistics", stacklevel=3)
            return False
        return True


def register_clipper(name: str) -> Callable[[type[GradClipper]], type[GradClipper]]:
    """Class decorator: make a :class:`GradClipper` subclass buildable by ``name`` (a taken name raises)."""

    def decorator(cls: type[GradClipper]) -> type[GradClipper]:
        if name in _REGISTRY:
            raise ValueError(f"gradient clipper name {name!r} is already registered by "
                             f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; pick another name")
        if not (isinstance(cls, type) and issubclass(cls, GradClipper)):
            raise TypeError(f"@register_clipper({name!r}) must decorate a subclass of GradClipper")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_clippers() -> list[str]:
    """Names of the registered clippers, sorted."""
    return sorted(_REGISTRY)


def clipper_parameters(cls: type[GradClipper]) -> dict[str, inspect.Parameter] | None:
    """Keyword settings of ``cls`` and its bases by name; None when it takes ``**kwargs`` (anything goes)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind == p.VAR_KEYWORD:
                return None
            if p.name != "self" and p.kind != p.VAR_POSITIONAL:
                params[p.name] = p
    return params


def build_clipper(name: str, **settings: Any) -> GradClipper:
    """Build the registered clipper ``name``; an unknown name or setting raises ConfigError listing the choices."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown gradient clipper {name!r}; choose one of {', '.join(available_clippers())} "
                          "or register your own with @register_clipper")
    cls = _REGISTRY[name]
    params = clipper_parameters(cls)
    unknown = [] if params is None else sorted(set(settings) - set(params))
    if unknown:
        raise ConfigError(f"gradient clipper {name!r} has no setting {', '.join(unknown)}; "
                          f"its settings are: {', '.join(sorted(params)) or '(none)'}")
    return cls(**settings)


# ---------------------------------------------------------------------------- norm
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


# ---------------------------------------------------------------------------- autoclip
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


# ---------------------------------------------------------------------------- zclip
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


# ---------------------------------------------------------------------------- adagc
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
