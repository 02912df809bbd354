"""Reward functions (TRL's signature) and the answer grading shared with evaluation.

A reward function is ``f(prompts, completions, **columns) -> list[float | None]``
with one value per completion; ``None`` means "not applicable" and is
ignored in the weighted sum (as TRL does). TRL reward functions work unchanged.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rlclip.errors import ConfigError, RewardError
from rlclip.rewards.grading import extract_answer, grade
from rlclip.rewards.math_rewards import completion_text, correctness_reward, format_reward

__all__ = ["BUILTIN", "completion_text", "compute_rewards", "correctness_reward", "extract_answer", "format_reward",
           "grade", "resolve_reward_func", "target_token_reward"]

RewardFunc = Callable[..., Sequence[float | None]]


def target_token_reward(prompts: list[Any], completions: list[Any], token: str = "7", **_: Any) -> list[float]:
    """Fraction of the completion's characters equal to ``token`` (a toy task for smoke tests)."""
    texts = [completion_text(c) for c in completions]
    return [t.count(token) * len(token) / len(t) if t else 0.0 for t in texts]


BUILTIN: dict[str, RewardFunc] = {
    "target_token": target_token_reward,
    "correctness": correctness_reward,
    "format": format_reward,
}


def resolve_reward_func(name: str, kwargs: dict[str, Any] | None = None) -> RewardFunc:
    """A built-in reward by name, or any importable ``module:function`` (kwargs bound)."""
    if name in BUILTIN:
        func = BUILTIN[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            func = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"reward function {name!r} cannot be imported ({err}); "
                              "give 'package.module:function' on the Python path") from None
    else:
        raise ConfigError(f"unknown reward function {name!r}; choose one of {', '.join(BUILTIN)} "
                          "or give 'package.module:function'")
    if kwargs:
        func = functools.update_wrapper(functools.partial(func, **kwargs), func)
    return func


def reward_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _checked(name: str, values: Any, n: int) -> list[float]:
    if not isinstance(values, (list, tuple)) and not isinstance(values, Tensor):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}; "
                          f"it must return a list of {n} floats (or None)")
    values = values.tolist() if isinstance(values, Tensor) else list(values)
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions; "
                          "it must return one float (or None) per completion")
    out = []
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RewardError(f"reward function {name!r} returned {v!r}; values must be float, int or None")
        out.append(math.nan if v is None else float(v))
    return out


def _check_signature(func: RewardFunc, name: str, kwargs: dict[str, Any], columns: dict[str, Any]) -> None:
    """A reward function asking for a column the data set lacks fails here, by name."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call speak
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        raise RewardError(f"reward function {name!r} cannot be called with the data set's columns "
                          f"({', '.join(sorted(columns)) or 'none'}): {err}; add the column to the data or "
                          "give the function defaults and **kwargs") from None


def compute_rewards(funcs: Sequence[RewardFunc], weights: Sequence[float], prompts: list[Any],
                    completions: list[Any], columns: dict[str, list[Any]],
                    **extra: Any) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the reward functions, ``[N]``, and per-function means.

    ``None`` values are skipped in the sum (a row where every function
    returns None gets reward 0).
    """
    n = len(completions)
    per_func = []
    metrics: dict[str, float] = {}
    for func in funcs:
        name = reward_name(func)
        kwargs = {"prompts": prompts, "completions": completions, **columns, **extra}
        _check_signature(func, name, kwargs, columns)
        try:
            raw = func(**kwargs)
        except ValueError as err:  # a reward function refusing its input names the problem itself
            raise RewardError(f"reward function {name!r} failed: {err}") from None
        values = torch.tensor(_checked(name, raw, n), dtype=torch.float32)  # [N]
        per_func.append(values)
        metrics[f"reward/{name}/mean"] = float(values.nanmean()) if not values.isnan().all() else math.nan
    stacked = torch.stack(per_func, dim=1) * torch.tensor(weights, dtype=torch.float32)  # [N, F]
    return stacked.nansum(dim=1), metrics
