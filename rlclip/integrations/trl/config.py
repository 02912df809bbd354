"""TRL's configuration against an rlclip objective: the supported TRL range, option checks, loss_type -> agg.

Everything here runs before training: it refuses GRPOConfig options that
would bypass the objective, translates TRL's ``loss_type`` into the
objective's aggregation, and opens TRL's reference-model gate when the
objective needs reference log-probs.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

from rlclip.errors import ConfigError
from rlclip.objectives import Objective, build_objective

SUPPORTED_TRL = ">=1.16,<1.17"
"""The TRL versions this adapter is tested on (also pyproject's ``trl`` dependency)."""

try:
    import trl
except ImportError as exc:  # pragma: no cover - trl is a dependency of rlclip
    raise ImportError(f"rlclip.integrations.trl needs TRL: pip install 'trl{SUPPORTED_TRL}'") from exc

LOSS_TYPE_AGG = {
    "dapo": "token_mean",  # over the tokens of the whole accumulation window (TRL's num_items_in_batch)
    "bnpo": "token_mean",  # over the tokens of each micro-batch
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",  # divided by max_completion_length
}
"""TRL ``loss_type`` -> rlclip ``agg``. Other loss types are TRL's own surrogates, not aggregations."""

_REFERENCE_GATE_BETA = 1.0  # any non-zero beta makes TRL load the reference model and score it


# ---------------------------------------------------------------- validation


def check_trl_version(version: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``version`` (default: the installed TRL) is in :data:`SUPPORTED_TRL`.

    The adapter overrides private GRPOTrainer methods whose signatures change
    between TRL releases, so only the tested range is accepted.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = trl.__version__ if version is None else version
    try:
        ok = SpecifierSet(SUPPORTED_TRL).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ConfigError(f"rlclip.integrations.trl supports trl{SUPPORTED_TRL}, found trl {version}; "
                          f"install a supported version: pip install 'trl{SUPPORTED_TRL}'")


def _bypass_problems(args: Any, allow_beta: bool) -> Iterator[str]:
    """One message per GRPOConfig option that would bypass or silently alter the objective."""
    if getattr(args, "use_liger_kernel", False) or getattr(args, "use_liger_loss", False):
        yield ("use_liger_kernel=True (Liger) replaces the forward/loss the objective is computed from; "
               "set use_liger_kernel=False")
    if args.loss_type not in LOSS_TYPE_AGG:
        yield (f"loss_type={args.loss_type!r} is TRL's own surrogate and cannot be mapped to an rlclip "
               f"aggregation; set loss_type to one of {', '.join(LOSS_TYPE_AGG)} and choose the surrogate "
               "with objective=")
    if getattr(args, "beta", 0.0) != 0.0 and not allow_beta:
        yield (f"beta={args.beta} is TRL's KL penalty, which the objective replaces; set beta=0 and put "
               "kl_coef (and kl_estimator) in the objective's settings")
    if getattr(args, "importance_sampling_level", "token") != "token":
        yield ("importance_sampling_level='sequence' belongs to TRL's surrogate; use "
               "objective={'name': 'ratio_clip', 'level': 'sequence'} (GSPO) instead")
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        yield "top_entropy_quantile < 1 is applied inside TRL's own loss only; leave it at 1.0"
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        yield "off_policy_mask_threshold is applied inside TRL's own loss only; leave it unset"
    if getattr(args, "delta", None) is not None:
        yield "delta (two-sided clipping) belongs to TRL's surrogate; use the objective's dual_clip instead"
    if getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False):
        yield "the entropy bonus (entropy_coef / use_adaptive_entropy) is not applied to the objective; disable it"
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        yield ("vLLM importance-sampling correction is applied inside TRL's own loss only; set "
               "vllm_importance_sampling_correction=False")


def check_trl_args(args: Any, *, allow_beta: bool = False) -> None:
    """Raise a one-line :class:`ConfigError` for the first GRPOConfig option that bypasses the objective.

    ``allow_beta`` is for users' own subclasses, where a non-zero ``beta``
    is how TRL is asked for reference log-probs (their loss replaces TRL's KL).
    Non-default ``epsilon`` / ``epsilon_high`` only warn: the objective's own
    clip settings apply.
    """
    for problem in _bypass_problems(args, allow_beta):
        raise ConfigError(f"rlclip objective in TRL: {problem}")
    if getattr(args, "epsilon", 0.2) != 0.2 or getattr(args, "epsilon_high", None) is not None:
        warnings.warn("TRL's epsilon / epsilon_high are not used by the rlclip objective; set its own clip "
                      "settings (e.g. objective={'name': 'ratio_clip', 'eps_low': 0.2, 'eps_high': 0.28})",
                      UserWarning, stacklevel=3)


def _check_agg(agg: str, norm_len: int | None, want: str, want_len: int | None, loss_type: str) -> None:
    if agg != want:
        raise ConfigError(f"objective agg={agg!r} disagrees with loss_type={loss_type!r}, which aggregates as "
                          f"{want!r}; drop agg from the objective or pick the loss_type that maps to it "
                          f"({', '.join(f'{k} -> {v}' for k, v in LOSS_TYPE_AGG.items())})")
    if want_len is not None and norm_len not in (None, want_len):
        raise ConfigError(f"objective agg_norm_len={norm_len} disagrees with loss_type='dr_grpo', which divides "
                          f"by max_completion_length={want_len}; drop agg_norm_len from the objective")


def _check_fixed_kl(objective: Objective) -> Objective:
    """The adaptive KL controller moves ``kl_coef`` after each of rlclip's optimizer steps; TRL never calls it."""
    if getattr(objective, "kl_control", None) is not None:
        raise ConfigError("rlclip objective in TRL: kl_target (the adaptive KL controller) needs rlclip's trainer, "
                          "which updates kl_coef after each optimizer step; drop kl_target (TRL keeps beta fixed) "
                          "or train with rlclip train")
    return objective


def resolve_objective(objective: str | dict[str, Any] | Objective, loss_type: str,
                      max_completion_length: int | None) -> Objective:
    """The objective to use under TRL's ``loss_type``: built from a name / dict, or checked if an instance.

    A name or dict gets ``agg`` (and, for ``dr_grpo``, ``agg_norm_len``) from
    ``loss_type``; an explicit ``agg`` that disagrees raises. An instance
    must already use the matching ``agg``; a copy gets the Dr. GRPO length.
    """
    if loss_type not in LOSS_TYPE_AGG:
        raise ConfigError(f"rlclip objective in TRL: loss_type={loss_type!r} cannot be mapped; use one of "
                          f"{', '.join(LOSS_TYPE_AGG)}")
    agg = LOSS_TYPE_AGG[loss_type]
    norm_len = max_completion_length if agg == "seq_mean_token_sum_norm" else None
    if isinstance(objective, str):
        objective = {"name": objective}
    if isinstance(objective, dict):
        settings = dict(objective)
        name = settings.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"objective dict needs a 'name' (a registered objective), got {objective!r}")
        _check_agg(settings.setdefault("agg", agg), settings.get("agg_norm_len"), agg, norm_len, loss_type)
        if norm_len is not None:
            settings.setdefault("agg_norm_len", norm_len)
        return _check_fixed_kl(build_objective(name, **settings))
    if isinstance(objective, Objective):
        _check_fixed_kl(objective)
        _check_agg(objective.agg, objective.agg_norm_len, agg, norm_len, loss_type)
        if norm_len is not None and objective.agg_norm_len is None:
            objective = copy.copy(objective)
            objective.agg_norm_len = norm_len
        return objective
    raise ConfigError(f"objective must be a registered name, a dict with 'name', or an Objective instance; "
                      f"got {type(objective).__name__}")


# ---------------------------------------------------------------- TRL's __init__: reference gate, step layout


@contextlib.contextmanager
def _reference_gate(args: Any, needed: bool) -> Iterator[None]:
    """While TRL's __init__ runs, a non-zero ``beta`` when the objective needs a reference model.

    TRL loads the reference model (or keeps the PEFT base as reference) and
    scores it after generation only when ``beta != 0``; the adapter opens that
    gate and never applies TRL's KL. The user's config is restored.
    """
    if not needed:
        yield
        return
    saved = args.beta
    args.beta = _REFERENCE_GATE_BETA
    try:
        yield
    finally:
        args.beta = saved


def _check_step_layout(objective: Objective, args: Any) -> None:
    """Step statistics (e.g. Archer's KL token counts) need each accumulation window inside one generation."""
    if not getattr(objective, "step_needs", None):
        return
    spg = args.steps_per_generation or args.gradient_accumulation_steps
    if spg % args.gradient_accumulation_steps:
        raise ConfigError(f"objective {objective.name!r} computes statistics over each optimizer step, which "
                          f"needs steps_per_generation ({spg}) to be a multiple of gradient_accumulation_steps "
                          f"({args.gradient_accumulation_steps})")

