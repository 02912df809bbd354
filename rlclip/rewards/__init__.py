"""Reward functions (TRL's signature) and the answer grading shared with evaluation.

A reward function is ``f(prompts, completions, **columns) -> list[float | None]``
with one value per completion; ``None`` means "no score" and is ignored in
the weighted sum (as TRL does); a completion that no function scores is
masked out of the loss. TRL reward functions work unchanged.

Faults (``reward.on_error``): a non-finite value or an exception is an error
that names the function and the first failing completion (``raise``, the
default), or masks the failing completions out and counts them (``skip``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError, RewardError, UserCodeError, describe_user_exception
from rlclip.lazy import torch
from rlclip.rewards.grading import extract_answer, grade
from rlclip.rewards.math_rewards import completion_text, correctness_reward, format_reward

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["BUILTIN", "completion_text", "compute_reward_table", "compute_rewards", "correctness_reward",
           "extract_answer", "format_reward", "grade", "resolve_reward_func", "target_token_reward"]

RewardFunc = Callable[..., Sequence[float | None]]
ON_ERROR = ("raise", "skip")


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
        except Exception as err:  # noqa: BLE001 - the user's module failed while importing
            raise UserCodeError(f"{describe_user_exception(f'importing reward module {module!r}', err)}; "
                                "fix the module (--debug shows the traceback)") from err
    else:
        raise ConfigError(f"unknown reward function {name!r}; choose one of {', '.join(BUILTIN)} "
                          "or give 'package.module:function'")
    if kwargs:
        func = functools.update_wrapper(functools.partial(func, **kwargs), func)
    return func


def reward_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _checked(name: str, values: Any, n: int) -> list[float | None]:
    if not isinstance(values, (list, tuple)) and not isinstance(values, torch.Tensor):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}; "
                          f"it must return a list of {n} floats (or None)")
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions; "
                          "it must return one float (or None) per completion")
    out = []
    for v in values:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise RewardError(f"reward function {name!r} returned {v!r}; values must be float, int or None")
        out.append(None if v is None else float(v))
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


def _sample_kwargs(kwargs: dict[str, Any], i: int, n: int) -> dict[str, Any]:
    """The keyword arguments of a reward call restricted to completion ``i`` (per-sample lists sliced)."""
    return {k: (v[i:i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in kwargs.items()}


def _score_one_by_one(func: RewardFunc, name: str, kwargs: dict[str, Any], n: int,
                      on_error: str, batch_error: Exception) -> tuple[list[float | None], list[bool]]:
    """After a batch call raised: score each completion alone, to name (raise) or mask (skip) the failing ones."""
    values: list[float | None] = []
    failed: list[bool] = []
    for i in range(n):
        try:
            one = _checked(name, func(**_sample_kwargs(kwargs, i, n)), 1)[0]
        except RewardError:
            raise
        except Exception as err:  # noqa: BLE001 - user code: any exception is the function's fault
            if on_error == "raise":
                raise UserCodeError(f"{describe_user_exception(f'reward function {name!r}', err)} on completion {i} "
                                    f"of {n}; fix the function, or set reward.on_error: skip to mask failing "
                                    "completions out (--debug shows the traceback)") from err
            values.append(None)
            failed.append(True)
            continue
        values.append(one)
        failed.append(False)
    if on_error == "raise":  # the batch call failed but every single call worked: report the batch failure
        raise UserCodeError(f"{describe_user_exception(f'reward function {name!r}', batch_error)} on a batch of {n} "
                            "completions (each alone scores fine); fix the function (--debug shows the "
                            "traceback)") from batch_error
    return values, failed


def _call_reward(func: RewardFunc, kwargs: dict[str, Any], n: int, on_error: str) -> tuple[Tensor, Tensor, Tensor]:
    """One reward function: ``(values [N] with NaN where no score, scored [N], failed [N])``."""
    name = reward_name(func)
    try:
        raw: list[float | None] = _checked(name, func(**kwargs), n)
        failed = [False] * n
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - user code
        raw, failed = _score_one_by_one(func, name, kwargs, n, on_error, err)
    bad = [i for i, v in enumerate(raw) if v is not None and not math.isfinite(v)]
    if bad and on_error == "raise":
        raise RewardError(f"reward function {name!r} returned {raw[bad[0]]} for completion {bad[0]} ({len(bad)} of "
                          f"{n} non-finite); return finite floats (None means no score), or set reward.on_error: "
                          "skip to mask such completions out")
    failed = [f or i in bad for i, f in enumerate(failed)]
    scored = torch.tensor([v is not None and not f for v, f in zip(raw, failed)])  # [N]
    values = torch.tensor([v if (v is not None and not f) else math.nan for v, f in zip(raw, failed)],
                          dtype=torch.float32)  # [N]
    return values, scored, torch.tensor(failed)


def compute_rewards(funcs: Sequence[RewardFunc], weights: Sequence[float], prompts: list[Any],
                    completions: list[Any], columns: dict[str, list[Any]], on_error: str = "raise",
                    **extra: Any) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the reward functions, ``[N]``, and metrics.

    ``None`` values are skipped in the sum. A completion that no function
    scores, or (with ``on_error="skip"``) on which a function failed, gets a
    NaN reward: the trainer masks it out of the loss. Metrics: each
    function's mean, ``reward/errors`` and ``reward/unscored`` (counts).
    """
    total, _, metrics = compute_reward_table(funcs, weights, prompts, completions, columns, on_error, **extra)
    return total, metrics


def compute_reward_table(funcs: Sequence[RewardFunc], weights: Sequence[float], prompts: list[Any],
                         completions: list[Any], columns: dict[str, list[Any]], on_error: str = "raise",
                         **extra: Any) -> tuple[Tensor, Tensor, dict[str, float]]:
    """:func:`compute_rewards`'s weighted sum ``[N]``, each function's unweighted scores ``[N, F]`` (NaN where
    it gave none; a whole row NaN where the sum is NaN) and the metrics."""
    if on_error not in ON_ERROR:
        raise ConfigError(f"unknown reward.on_error {on_error!r}; choose raise or skip")
    n = len(completions)
    metrics: dict[str, float] = {}
    per_func, scored_any, failed_any = [], torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    for func in funcs:
        name = reward_name(func)
        kwargs = {"prompts": prompts, "completions": completions, **columns, **extra}
        _check_signature(func, name, kwargs, columns)
        values, scored, failed = _call_reward(func, kwargs, n, on_error)
        per_func.append(values)
        scored_any |= scored
        failed_any |= failed
        metrics[f"reward/{name}/mean"] = float(values.nanmean()) if bool(scored.any()) else math.nan
    table = torch.stack(per_func, dim=1)  # [N, F]
    total = (table * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)  # [N]
    total = torch.where(scored_any & ~failed_any, total, torch.full_like(total, math.nan))
    metrics["reward/errors"] = float(failed_any.sum())
    metrics["reward/unscored"] = float((~scored_any & ~failed_any).sum())
    return total, table.masked_fill(total.isnan().unsqueeze(1), math.nan), metrics
