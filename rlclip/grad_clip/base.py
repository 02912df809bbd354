"""Gradient clippers' common ground: norms, scaling, settings checks, the base class and the registry.

A clipper is a small class whose settings are constructor arguments, chosen in
a recipe as ``train: {grad_clip: {name: zclip, z_thresh: 2.5}}`` and built with
:func:`build_clipper` (the same pattern as the objectives' registry); the
shipped clippers live one per module beside this one (norm.py, autoclip.py,
zclip.py, adagc.py). Each optimizer step the trainer calls

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
