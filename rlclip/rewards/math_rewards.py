"""Reward functions for math benchmarks, with TRL's signature.

``f(prompts, completions, **dataset_columns) -> list[float | None]``: TRL (and the
rlclip trainer) pass every dataset column as a keyword list, so with the adapters'
``answer`` and ``suite`` columns these work unchanged::

    correctness_reward(prompts, completions, answer=["18", ...], suite=["gsm8k", ...])

A completion is a string, or (conversational data) a list of chat messages
``[{"role": "assistant", "content": ...}]``; ``content`` may also be a list of
``{"type": "text", "text": ...}`` parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlclip.errors import RewardError
from rlclip.rewards.grading import answer_is_span, check_suite, grade, last_boxed


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, a message dict or a list of messages.

    For a list of messages the assistant messages are joined (all messages when
    none is marked assistant).
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role") == "assistant"] or messages
    return "\n".join(_content_text(m.get("content")) for m in assistant)


def _content_text(content: Any) -> str:
    """Message content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def _per_sample(value: Any, count: int, name: str) -> list[Any]:
    """Broadcast a scalar keyword to ``count`` samples, or check a column's length."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries for {count} completions")
    return list(value)


def correctness_reward(
    prompts: Sequence[Any] | None,
    completions: Sequence[Any],
    answer: Sequence[Any] | Any = None,
    suite: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when a completion reaches its gold ``answer`` (see :func:`grade`), else 0.0.

    ``suite`` is a column (one name per sample) or one name for all; a sample
    without a gold answer gets ``None`` (TRL: reward not applicable).
    """
    del prompts, kwargs
    if answer is None:
        raise RewardError("reward function 'correctness_reward' needs the gold 'answer' column, which the data "
                          "set lacks; use data with an 'answer' field (gsm8k, math500, svamp, asdiv or your "
                          "own jsonl) or another reward function")
    if suite is None:
        raise RewardError("reward function 'correctness_reward' needs a 'suite' column or the setting "
                          "suite: gsm8k|math500|svamp|asdiv")
    golds = _per_sample(answer, len(completions), "answer")
    suites = [check_suite(s) for s in _per_sample(suite, len(completions), "suite")]
    rewards: list[float | None] = []
    for completion, gold, name in zip(completions, golds, suites):
        if gold is None:
            rewards.append(None)
        else:
            rewards.append(1.0 if grade(completion_text(completion), str(gold), name) else 0.0)
    return rewards


def has_final_answer(text: str, require: str = "boxed") -> bool:
    """Whether ``text`` states a final answer: a non-empty ``\\boxed{}`` (``require="boxed"``),
    or any explicit marker, ``\\boxed{}``, ``####`` or "the answer is" (``require="any"``).
    """
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return True
    if require == "boxed":
        return False
    if require != "any":
        raise ValueError(f"require must be 'boxed' or 'any', got {require!r}")
    hashes = text.rsplit("####", 1)[1].strip() if "####" in text else ""
    return bool(hashes) or answer_is_span(text) is not None


def format_reward(
    prompts: Sequence[Any] | None, completions: Sequence[Any], require: str = "boxed", **kwargs: Any
) -> list[float | None]:
    """1.0 when a completion states an extractable final answer in the requested format.

    The adapters' default instruction asks for ``\\boxed{}``; pass ``require="any"``
    (e.g. with ``functools.partial``) to also accept ``####`` and "the answer is".
    """
    del prompts, kwargs
    return [1.0 if has_final_answer(completion_text(c), require) else 0.0 for c in completions]
