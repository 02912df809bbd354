"""The objective API (contract 1): base class, registry, aggregation, KL estimators.

An objective is a small class: its settings are constructor arguments and its
``surrogate`` is a pure function of a :class:`PolicyBatch` that returns a
per-token loss ``[B, T]``. Aggregation over tokens and the KL penalty to a
reference model are shared by every objective and live here, apart from the
surrogate (as verl's ``agg_loss``, unlike TRL's ``loss_type``).
"""

from __future__ import annotations

import abc
import inspect
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from rlclip.errors import ConfigError
from rlclip.types import ObjectiveOutput, PolicyBatch

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
NEEDS = frozenset({"entropy", "ref", "support"})
LOG_RATIO_CLAMP = 20.0

_REGISTRY: dict[str, type[Objective]] = {}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is 1 (0 when nothing is selected)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Minimum of ``values`` where ``mask`` is 1 (0 when nothing is selected)."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values.masked_fill(mask == 0, float("inf")).min()


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Maximum of ``values`` where ``mask`` is 1 (0 when nothing is selected)."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values.masked_fill(mask == 0, float("-inf")).max()


def aggregate(values: Tensor, mask: Tensor, mode: str = "token_mean", num_tokens: Any = None,
              num_sequences: Any = None, norm_len: int | None = None) -> Tensor:
    """Reduce a per-token loss ``values [B, T]`` to a scalar.

    - ``token_mean``: sum(L * mask) / N, N = ``num_tokens`` or mask.sum().
    - ``seq_mean_token_mean``: mean over sequences of each sequence's token mean.
    - ``seq_mean_token_sum``: mean over sequences of each sequence's token sum.
    - ``seq_mean_token_sum_norm`` (Dr. GRPO, arXiv 2503.20783): each sequence's
      token sum divided by a constant ``norm_len`` (default: T), then the mean
      over sequences.

    Sequence means divide by ``num_sequences`` when given, else by the number
    of rows with at least one counted token. The trainer passes the global
    counts of the optimizer step so that micro-batching and data parallelism
    leave the update unchanged.
    """
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        denom = mask.sum().clamp_min(1) if num_tokens is None else num_tokens
        return (values * mask).sum() / denom
    token_sum = (values * mask).sum(-1)  # [B]
    if mode == "seq_mean_token_mean":
        per_seq = token_sum / mask.sum(-1).clamp_min(1)
    elif mode == "seq_mean_token_sum":
        per_seq = token_sum
    elif mode == "seq_mean_token_sum_norm":
        per_seq = token_sum / float(norm_len or values.shape[-1])
    else:
        raise ConfigError(f"unknown aggregation {mode!r}; choose one of {', '.join(AGG_MODES)}")
    denom = (mask.sum(-1) > 0).sum().clamp_min(1) if num_sequences is None else num_sequences
    return per_seq.sum() / denom


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta.

    With d = ref_logprobs - logprobs (Schulman, "Approximating KL divergence"):
    k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 with d clamped to [-20, 20].
    """
    d = ref_logprobs - logprobs  # [B, T]
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator == "k3":
        d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.expm1(d) - d
    raise ConfigError(f"unknown kl_estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


class Objective(abc.ABC):
    """Base class of every surrogate objective.

    Subclasses set ``needs`` (a subset of {"entropy", "ref", "support"}),
    take their settings as keyword constructor arguments (forwarding the
    shared ones below to ``super().__init__``) and implement ``surrogate``.

    Args:
        agg: aggregation of the per-token loss, one of ``AGG_MODES``.
        agg_norm_len: constant length for ``seq_mean_token_sum_norm``
            (the trainer sets it to ``max_new_tokens`` when left unset).
        kl_coef: weight of the KL penalty to the reference model; 0 loads no
            reference model.
        kl_estimator: ``k1``, ``k2`` or ``k3``.
    """

    name: ClassVar[str] = ""
    needs: frozenset[str] = frozenset()

    def __init__(self, *, agg: str = "token_mean", agg_norm_len: int | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3") -> None:
        if agg not in AGG_MODES:
            raise ConfigError(f"unknown aggregation agg={agg!r}; choose one of {', '.join(AGG_MODES)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
        if kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}")
        self.agg = agg
        self.agg_norm_len = agg_norm_len
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.needs = frozenset(type(self).needs) | ({"ref"} if self.kl_coef > 0 else frozenset())
        unknown = self.needs - NEEDS
        if unknown:
            raise ConfigError(f"{type(self).__name__}.needs has unknown entries {sorted(unknown)}; "
                              f"use a subset of {sorted(NEEDS)}")

    @abc.abstractmethod
    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        """Per-token loss ``[B, T]`` and metrics (without the namespace prefix)."""

    def aggregate(self, values: Tensor, batch: PolicyBatch) -> Tensor:
        """Aggregate a per-token quantity with this objective's ``agg`` mode."""
        return aggregate(values, batch.mask, self.agg, batch.num_tokens, batch.num_sequences,
                         self.agg_norm_len)

    def kl_penalty(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        """``kl_coef * agg(KL)`` to the reference model (0 when ``kl_coef`` is 0)."""
        if self.kl_coef == 0:
            return batch.logprobs.new_zeros(()), {}
        if batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs PolicyBatch.ref_logprobs")
        kl = kl_estimate(batch.logprobs, batch.ref_logprobs, self.kl_estimator)  # [B, T]
        return self.kl_coef * self.aggregate(kl, batch), {"kl_ref": masked_mean(kl.detach(), batch.mask)}

    def __call__(self, batch: PolicyBatch) -> ObjectiveOutput:
        self._check_inputs(batch)
        per_token, metrics = self.surrogate(batch)
        loss = self.aggregate(per_token, batch)
        penalty, kl_metrics = self.kl_penalty(batch)
        metrics = {**metrics, **kl_metrics}
        return ObjectiveOutput(loss=loss + penalty, metrics=metrics)

    def _check_inputs(self, batch: PolicyBatch) -> None:
        required = {"entropy": ["entropy"], "ref": ["ref_logprobs"],
                    "support": ["support_logprobs", "old_support_logprobs", "support_mask"]}
        for need in self.needs:
            for attr in required[need]:
                if getattr(batch, attr) is None:
                    raise ValueError(f"objective {self.name or type(self).__name__!r} needs "
                                     f"PolicyBatch.{attr} (declared need {need!r})")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "needs")
        return f"{type(self).__name__}({settings})"


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an :class:`Objective` subclass buildable by ``name``."""

    def decorator(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY:
            raise ValueError(f"objective name {name!r} is already registered by "
                             f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}; pick another name")
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"@register_objective({name!r}) must decorate a subclass of Objective")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_objectives() -> list[str]:
    """Names of the registered objectives."""
    return sorted(_REGISTRY)


def objective_parameters(cls: type[Objective]) -> dict[str, inspect.Parameter]:
    """Keyword settings accepted by ``cls`` and its bases, by name."""
    params: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params[p.name] = p
    return params


def _coerce(cls: type[Objective], key: str, value: Any) -> Any:
    """Check ``value`` against the annotation of setting ``key``; int -> float is allowed."""
    init = next(k.__dict__["__init__"] for k in cls.__mro__ if key in inspect.signature(
        k.__dict__.get("__init__", object.__init__)).parameters)
    hint = typing.get_type_hints(init).get(key)
    if hint is None:
        return value
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    simple = [t for t in allowed if t in (int, float, str, bool)]
    if simple and not any(isinstance(value, t) and not (t is int and isinstance(value, bool))
                          for t in simple):
        names = " or ".join(t.__name__ for t in allowed if t is not type(None))
        raise ConfigError(f"objective {cls.name!r}: {key} must be {names}, got {value!r}")
    return value


def build_objective(name: str, **settings: Any) -> Objective:
    """Build the registered objective ``name`` with its keyword ``settings``.

    An unknown name or setting raises :class:`ConfigError` listing the choices.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown objective {name!r}; choose one of {', '.join(available_objectives())} "
                          "or register your own with @register_objective")
    cls = _REGISTRY[name]
    params = objective_parameters(cls)
    unknown = sorted(set(settings) - set(params))
    if unknown:
        raise ConfigError(f"objective {name!r} has no setting {', '.join(unknown)}; "
                          f"its settings are: {', '.join(sorted(params))}")
    settings = {k: _coerce(cls, k, v) for k, v in settings.items()}
    return cls(**settings)
