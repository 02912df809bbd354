"""The objective API (contract 1): the :class:`Objective` base class and the registry.

An objective is a small class: its settings are constructor arguments and its
``surrogate`` is a pure function of a :class:`PolicyBatch` that returns a
per-token loss ``[B, T]``. Aggregation over tokens and the KL penalty to a
reference model are shared by every objective and applied here, apart from the
surrogate (as verl's ``agg_loss``, unlike TRL's ``loss_type``); their formulas
live in :mod:`rlclip.objectives.aggregation` and :mod:`rlclip.objectives.kl`,
the token filters in :mod:`rlclip.objectives.filters`, the cross-process
:class:`Reducer` in :mod:`rlclip.objectives.reduce`. Their names stay
importable from here.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from rlclip.errors import ConfigError, ObjectiveError
from rlclip.kl_control import ObjectiveState, build_kl_control
from rlclip.lazy import torch
from rlclip.objectives.aggregation import AGG_MODES, aggregate, masked_max, masked_mean, masked_min
from rlclip.objectives.filters import (
    ENTROPY_KEEP,
    ENTROPY_KEPT,
    FILTER_KEYS,
    M2_COUNTED,
    M2_KEEP,
    M2_MASKED,
    M2_MEAN,
    drop_truncated,
    entropy_statistics,
    linear_quantile,
    m2_statistics,
    off_policy_keep,
)
from rlclip.objectives.kl import KL_ESTIMATORS, LOG_RATIO_CLAMP, LOW_VAR_KL_CLAMP, kl_estimate, token_ratio
from rlclip.objectives.reduce import Reducer
from rlclip.types import ObjectiveOutput, PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

NEEDS = frozenset({"entropy", "ref", "support"})
STEP_NEEDS = frozenset({"entropy", "logprobs"})

_REGISTRY: dict[str, type[Objective]] = {}

__all__ = [  # the names moved out stay importable from here
    "AGG_MODES", "ENTROPY_KEEP", "ENTROPY_KEPT", "FILTER_KEYS", "KL_ESTIMATORS", "LOG_RATIO_CLAMP",
    "LOW_VAR_KL_CLAMP", "M2_COUNTED", "M2_KEEP", "M2_MASKED", "M2_MEAN", "NEEDS", "STEP_NEEDS", "Objective",
    "Reducer", "aggregate", "available_objectives", "build_objective", "kl_estimate", "linear_quantile",
    "masked_max", "masked_mean", "masked_min", "m2_statistics", "objective_parameters", "register_objective",
    "token_ratio",
]


def _with_filter_statistics(fn: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
    """Wrap a subclass's ``step_statistics`` so that the base class's token filters get theirs too.

    The subclass sees the batch with ``mask_truncated`` applied to its mask (its counts then match
    the tokens that train); the filters' statistics are added unless a ``super()`` call already did.
    """

    @functools.wraps(fn)
    def step_statistics(self: Objective, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        batch = self.count_masked(batch)
        stats = dict(fn(self, batch, reduce))
        if not stats.keys() & FILTER_KEYS:
            stats.update(self.filter_statistics(batch, reduce))
        return stats

    step_statistics._with_filters = True  # type: ignore[attr-defined]
    return step_statistics



class Objective(ObjectiveState, abc.ABC):
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
        kl_estimator: ``k1``, ``k2``, ``k3``, ``low_var_kl`` (k3 clamped to
            [-10, 10], verl's ``kl_loss_type=low_var_kl``), ``k3_plus`` (k3's value, k2's
            gradient: verl's ``k3+``) or ``abs`` (|log pi - log pi_ref|); see :func:`kl_estimate`.
        kl_bias_correction: multiply the per-token KL by the importance ratio
            rho_t = exp(logprobs - old_logprobs) (with grad) before aggregation, so
            that the KL gradient is the unbiased reverse-KL gradient off-policy
            (DeepSeek-V3.2, arXiv 2512.02556; TRL 1.16's ``use_bias_correction_kl``,
            which is on by default there). Off by default (verl, and the Archer
            and PSPO authors' code, have no such weight); see docs/conventions.md.
        entropy_top_quantile: token filter ("Beyond the 80/20 rule", arXiv
            2506.01939; TRL's ``top_entropy_quantile``): only the fraction
            rho of counted tokens with the highest entropy train. The
            threshold is the (1 - rho)-quantile (linear interpolation, as
            ``torch.quantile``) of the entropy over all counted tokens of the
            optimizer step, across processes (a step statistic); tokens with
            entropy >= threshold are kept. None or 1.0: off; the paper uses 0.2.
        off_policy_mask: token filter (TRL's ``off_policy_mask_threshold``,
            DeepSeek-V3.2, arXiv 2512.02556, eq. 9): a token with advantage
            A < 0 in a sequence whose mean KL(old || new) estimate,
            mean_t(old_logprobs - logprobs), exceeds this threshold does not
            train. None: off.
        mask_truncated: token filter (DAPO, arXiv 2503.14476; TRL's
            ``mask_truncated_completions``): completions that hit the length
            limit (``PolicyBatch.truncated``) neither train nor count in the
            token-mean denominator (see :meth:`count_mask`).
        m2_threshold: token filter (M2PO, arXiv 2510.01161; AReaL's
            ``actor.m2_threshold``): with M2_t = (log pi_theta(a_t) - log pi_old(a_t))^2,
            the counted tokens of the optimizer step with the largest M2 do not
            train, until the mean M2 of the rest is < the threshold (a step
            statistic over all processes; rule and ties in
            :mod:`rlclip.objectives.filters`). None: off; AReaL's GSM8K example uses 0.04.
        kl_target: adaptive KL (verl's AdaptiveKLController): after each optimizer step ``kl_coef`` (> 0,
            the start) moves toward this KL to the reference, over ``kl_horizon`` sequences (default
            10000, verl's); saved in checkpoints, logged as ``kl_coef``. None: fixed. See rlclip/kl_control.py.

    The entropy, off-policy and M2 filters multiply the per-token loss (the
    denominator keeps counting the filtered tokens, as TRL); the KL penalty
    to the reference is not filtered by them (as TRL). ``PolicyBatch.token_weights``
    (the importance-sampling correction of a vLLM sampler, rlclip/is_correction.py)
    multiplies the per-token loss after the filters and leaves the KL penalty
    unweighted, as TRL 1.16 (trl/trainer/grpo_trainer.py, ``_compute_loss``:
    the ratio multiplies ``per_token_loss`` before ``beta * per_token_kl`` is
    added). ``mask_truncated``
    removes the completions from the mask itself. The metric ``kept_frac`` is
    the fraction of completion tokens that train when any filter is on;
    ``m2_threshold`` adds ``m2_masked_frac`` (its masked share of the step's
    counted tokens) and ``m2_mean`` (the step's mean M2 before masking).
    """

    name: ClassVar[str] = ""
    needs: frozenset[str] = frozenset()
    step_needs: frozenset[str] = frozenset()
    """Inputs of :meth:`step_statistics` ("entropy", "logprobs"); empty: the objective has no step statistics."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("step_statistics")
        if own is not None and not getattr(own, "_with_filters", False):
            cls.step_statistics = _with_filter_statistics(own)  # type: ignore[method-assign]

    def __init__(self, *, agg: str = "token_mean", agg_norm_len: int | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", kl_bias_correction: bool = False,
                 entropy_top_quantile: float | None = None,
                 off_policy_mask: float | None = None, mask_truncated: bool = False,
                 m2_threshold: float | None = None, kl_target: float | None = None,
                 kl_horizon: float = 10000.0) -> None:
        if agg not in AGG_MODES:
            raise ConfigError(f"unknown aggregation agg={agg!r}; choose one of {', '.join(AGG_MODES)}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
        if kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}")
        if entropy_top_quantile is not None and not 0.0 <= entropy_top_quantile <= 1.0:
            raise ConfigError(f"entropy_top_quantile must be in [0, 1] (or null to disable), got {entropy_top_quantile}")
        if off_policy_mask is not None and not off_policy_mask >= 0:
            raise ConfigError(f"off_policy_mask must be >= 0 (or null to disable), got {off_policy_mask}")
        if m2_threshold is not None and not m2_threshold > 0:
            raise ConfigError(f"m2_threshold must be > 0 (or null to disable; M2PO's example uses 0.04), "
                              f"got {m2_threshold}")
        self.agg = agg
        self.agg_norm_len = agg_norm_len
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.kl_bias_correction = bool(kl_bias_correction)
        self.entropy_top_quantile = None if entropy_top_quantile in (None, 1.0) else float(entropy_top_quantile)
        self.off_policy_mask = None if off_policy_mask is None else float(off_policy_mask)
        self.mask_truncated = bool(mask_truncated)
        self.m2_threshold = None if m2_threshold is None else float(m2_threshold)
        self.kl_control = build_kl_control(kl_target, kl_horizon, self.kl_coef)  # state: rlclip/kl_control.py
        self.needs = frozenset(type(self).needs) | ({"ref"} if self.kl_coef > 0 else frozenset())
        if self.entropy_top_quantile is not None:
            self.needs = self.needs | {"entropy"}
        self.step_needs = type(self).step_needs  # the filters' needs are added in __setattr__
        unknown = self.needs - NEEDS
        if unknown:
            raise ConfigError(f"{type(self).__name__}.needs has unknown entries {sorted(unknown)}; "
                              f"use a subset of {sorted(NEEDS)}")
        unknown = frozenset(self.step_needs) - STEP_NEEDS
        if unknown:
            raise ConfigError(f"{type(self).__name__}.step_needs has unknown entries {sorted(unknown)}; "
                              f"use a subset of {sorted(STEP_NEEDS)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "step_needs":  # a subclass may reset step_needs; the token filters' needs stay
            value = frozenset(value) | self._filter_step_needs()
        super().__setattr__(name, value)

    def _filter_step_needs(self) -> frozenset[str]:
        entropy = getattr(self, "entropy_top_quantile", None) is not None
        m2 = getattr(self, "m2_threshold", None) is not None
        return frozenset({"entropy"} if entropy else ()) | frozenset({"logprobs"} if m2 else ())

    def count_mask(self, mask: Tensor, truncated: Tensor | None) -> Tensor:
        """The completion mask ``[B, T]`` with the tokens that leave the loss *and* its denominators removed.

        With ``mask_truncated`` the rows of truncated completions (``truncated [B]`` bool) are zeroed,
        as TRL's ``mask_truncated_completions``; otherwise ``mask`` itself. The trainer computes the
        step's global token and sequence counts from this mask.
        """
        if not self.mask_truncated:
            return mask
        if truncated is None:
            raise ValueError(f"objective {self.name or type(self).__name__!r} with mask_truncated needs "
                             "PolicyBatch.truncated")
        return drop_truncated(mask, truncated)  # [B, T]

    def count_masked(self, batch: PolicyBatch) -> PolicyBatch:
        """``batch`` with its mask replaced by :meth:`count_mask` (the same batch when nothing changes)."""
        if not self.mask_truncated:
            return batch
        return dataclasses.replace(batch, mask=self.count_mask(batch.mask, batch.truncated))

    def filter_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        """Step statistics of the token filters: the entropy threshold and keep mask of ``entropy_top_quantile``,
        the keep mask and counts of ``m2_threshold``."""
        stats = {} if self.m2_threshold is None else m2_statistics(
            batch.logprobs, batch.old_logprobs, batch.mask, self.m2_threshold, reduce)
        return {**stats, **self._entropy_statistics(batch, reduce)}

    def _entropy_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        if self.entropy_top_quantile is None:
            return {}
        if batch.entropy is None:
            raise ValueError(f"objective {self.name or type(self).__name__!r} with entropy_top_quantile needs "
                             "PolicyBatch.entropy")
        return entropy_statistics(batch.entropy, batch.mask, self.entropy_top_quantile, reduce)

    def _filter_stats(self, batch: PolicyBatch, key: str) -> dict[str, Tensor]:
        stats = batch.step_stats or {}
        return stats if key in stats else self.filter_statistics(_detached(batch), Reducer())

    def bonus_mask(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """The tokens an entropy bonus acts on, ``[B, T]``, and their count over the optimizer step.

        As TRL 1.16's ``effective_mask``: the counted tokens (``mask_truncated``
        applied) kept by ``entropy_top_quantile``; the off-policy mask does not
        apply. The count is ``batch.num_tokens`` (or the mask's own sum) without
        the entropy filter, else the filter's kept count over all processes.
        """
        batch = self.count_masked(batch)
        mask = batch.mask.to(batch.logprobs.dtype)  # [B, T]
        count = mask.sum() if batch.num_tokens is None else batch.num_tokens
        if self.entropy_top_quantile is not None:
            stats = self._filter_stats(batch, ENTROPY_KEEP)
            mask = mask * stats[ENTROPY_KEEP].to(mask.dtype)
            count = stats[ENTROPY_KEPT]
        return mask, torch.as_tensor(count, dtype=mask.dtype, device=mask.device).clamp_min(1)

    def token_filter(self, batch: PolicyBatch) -> tuple[Tensor | None, dict[str, Any]]:
        """The entropy, off-policy and M2 filters as a ``[B, T]`` multiplier of the per-token loss (None: off).

        ``batch`` already has :meth:`count_mask` applied and carries the step statistics.
        """
        keep = None
        metrics: dict[str, Any] = {}
        if self.entropy_top_quantile is not None:
            stats = self._filter_stats(batch, ENTROPY_KEEP)
            keep = stats[ENTROPY_KEEP].to(batch.logprobs.dtype)
            metrics["entropy_threshold"] = stats["filter_entropy_threshold"]
        if self.m2_threshold is not None:
            stats = self._filter_stats(batch, M2_KEEP)
            m2_keep = stats[M2_KEEP].to(batch.logprobs.dtype)  # [B, T]
            keep = m2_keep if keep is None else keep * m2_keep
            metrics["m2_masked_frac"] = stats[M2_MASKED] / stats[M2_COUNTED].clamp_min(1)
            metrics["m2_mean"] = stats[M2_MEAN]
        if self.off_policy_mask is not None:
            off = off_policy_keep(batch.logprobs, batch.old_logprobs, batch.advantages, batch.mask,
                                  self.off_policy_mask)  # [B, T]
            keep = off if keep is None else keep * off
        return keep, metrics

    def step_statistics(self, batch: PolicyBatch, reduce: Reducer) -> dict[str, Tensor]:
        """Statistics over the whole optimizer step, computed once before its micro-batch forwards.

        Some objectives need more than one micro-batch can see: a quantile or
        a token count over the step, a covariance over the batch. The trainer
        calls this with the process's whole mini-batch (``logprobs`` and, when
        ``step_needs`` asks, ``entropy`` of the current policy, both without
        grad) and ``reduce`` across processes; it then hands each micro-batch
        the result in ``PolicyBatch.step_stats``, with every tensor whose first
        dimension is the mini-batch's row count sliced to the micro-batch's
        rows (0-d tensors are passed whole). Called directly on a batch,
        an objective computes them from that batch (see ``__call__``), so the
        update is invariant to micro-batching and the number of processes.

        A subclass that overrides this returns its own statistics; the base
        class adds those of the token filters (``entropy_top_quantile``) and
        hands the override the batch with :meth:`count_mask` applied.
        """
        return {}

    @abc.abstractmethod
    def surrogate(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        """Per-token loss ``[B, T]`` and metrics (without the namespace prefix)."""

    def aggregate(self, values: Tensor, batch: PolicyBatch) -> Tensor:
        """Aggregate a per-token quantity with this objective's ``agg`` mode."""
        return aggregate(values, batch.mask, self.agg, batch.num_tokens, batch.num_sequences,
                         self.agg_norm_len, batch.group_ids, batch.prompt_tokens, batch.num_prompts)

    def kl_weight(self, batch: PolicyBatch) -> Tensor:
        """Importance weight of the per-token KL under ``kl_bias_correction``: rho_t ``[B, T]`` (with grad).

        TRL 1.16 multiplies its per-token k3 by ``coef_1``, its importance weight
        (trl/trainer/grpo_trainer.py, ``_compute_loss``); at token level that is rho_t.
        An objective with a sequence-level ratio (``ratio_clip`` with ``level="sequence"``)
        overrides this with its sequence weight, as TRL does.
        """
        return token_ratio(batch.logprobs, batch.old_logprobs)

    def kl_terms(self, batch: PolicyBatch) -> Tensor:
        """Per-token KL to the reference ``[B, T]``: ``kl_estimator``, times :meth:`kl_weight` under
        ``kl_bias_correction``. Needs ``batch.ref_logprobs``."""
        kl = kl_estimate(batch.logprobs, batch.ref_logprobs, self.kl_estimator)  # [B, T]
        return kl * self.kl_weight(batch) if self.kl_bias_correction else kl

    def kl_penalty(self, batch: PolicyBatch) -> tuple[Tensor, dict[str, Any]]:
        """``kl_coef * agg(KL)`` to the reference model (0 when ``kl_coef`` is 0), KL from :meth:`kl_terms`."""
        if self.kl_coef == 0:
            return batch.logprobs.new_zeros(()), {}
        if batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs PolicyBatch.ref_logprobs")
        kl = self.kl_terms(batch)  # [B, T]
        metrics = {"kl_ref": masked_mean(kl.detach(), batch.mask)}
        if self.kl_control is not None:  # the coefficient this step applies (it moves after the step)
            metrics["kl_coef"] = self.kl_coef
        return self.kl_coef * self.aggregate(kl, batch), metrics

    def __call__(self, batch: PolicyBatch) -> ObjectiveOutput:
        self._check_inputs(batch)
        if self.step_needs and batch.step_stats is None:
            batch = dataclasses.replace(batch, step_stats=self.step_statistics(_detached(batch), Reducer()))
        completion_mask = batch.mask
        batch = self.count_masked(batch)
        keep, filter_metrics = self.token_filter(batch)
        result = self.surrogate(batch)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
            raise ObjectiveError(f"objective {self.name or type(self).__name__!r}: surrogate() returned "
                                 f"{type(result).__name__}; it must return (per-token loss [B, T], metrics dict)")
        per_token, metrics = result
        self._check_per_token(per_token, batch)
        if keep is not None:
            per_token = per_token * keep  # [B, T]
        if batch.token_weights is not None:  # the sampler's IS correction; the KL penalty below stays unweighted
            per_token = per_token * batch.token_weights.to(per_token.dtype)  # [B, T]
        if keep is not None or self.mask_truncated:
            trains = batch.mask if keep is None else batch.mask * keep
            filter_metrics["kept_frac"] = masked_mean(trains.detach().to(completion_mask.dtype), completion_mask)
        loss = self.aggregate(per_token, batch)
        penalty, kl_metrics = self.kl_penalty(batch)
        metrics = {**metrics, **filter_metrics, **kl_metrics}
        return ObjectiveOutput(loss=loss + penalty, metrics=metrics)

    def _check_per_token(self, per_token: Any, batch: PolicyBatch) -> None:
        """The output contract: a floating ``[B, T]`` tensor, one loss per token."""
        name = self.name or type(self).__name__
        if not isinstance(per_token, torch.Tensor):
            raise ObjectiveError(f"objective {name!r}: surrogate() returned {type(per_token).__name__}; it must "
                              f"return (per-token loss tensor [B, T], metrics dict)")
        if tuple(per_token.shape) != tuple(batch.logprobs.shape):
            raise ObjectiveError(f"objective {name!r}: surrogate() returned a per-token loss of shape "
                              f"{list(per_token.shape)}, expected {list(batch.logprobs.shape)} ([B, T] like "
                              "batch.logprobs); return one loss per token, not a reduced value")
        if not per_token.is_floating_point():
            raise ObjectiveError(f"objective {name!r}: surrogate() returned dtype {per_token.dtype}; "
                              "the per-token loss must be a floating tensor")

    def _check_inputs(self, batch: PolicyBatch) -> None:
        required = {"entropy": ["entropy"], "ref": ["ref_logprobs"],
                    "support": ["support_logprobs", "old_support_logprobs", "support_mask"]}
        for need in self.needs:
            for attr in required[need]:
                if getattr(batch, attr) is None:
                    raise ValueError(f"objective {self.name or type(self).__name__!r} needs "
                                     f"PolicyBatch.{attr} (declared need {need!r})")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("needs", "step_needs"))
        return f"{type(self).__name__}({settings})"


Objective.step_statistics = _with_filter_statistics(Objective.step_statistics)  # type: ignore[method-assign]


def _detached(batch: PolicyBatch) -> PolicyBatch:
    """The batch with log-probs and entropy detached (step statistics never carry grad)."""
    return dataclasses.replace(batch, logprobs=batch.logprobs.detach(),
                               entropy=None if batch.entropy is None else batch.entropy.detach())


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
