"""Metrics over k sampled answers per problem: pass@1, unbiased pass@k, maj@k."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k).

    ``n`` samples of which ``c`` are correct; computed as a product, without
    large binomials.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, plus ``n`` itself."""
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent extracted answer is correct (ties: the earliest answer).

    ``keys`` are canonical answers (None: nothing extracted, never voted for).
    """
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return False
    top = max(counts.values())
    for key, ok in zip(keys, correct):
        if key is not None and counts[key] == top:
            return bool(ok)
    return False


def problem_metrics(correct: Sequence[bool], keys: Sequence[str | None], ks: Sequence[int]) -> dict[str, float]:
    """pass@k for each k, maj@n and the mean accuracy of one problem's n samples."""
    n, c = len(correct), sum(bool(x) for x in correct)
    metrics = {f"pass@{k}": pass_at_k(n, c, k) for k in ks}
    metrics[f"maj@{n}"] = float(majority_correct(keys, correct))
    metrics["accuracy"] = c / n
    return metrics


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of per-problem metrics."""
    if not rows:
        return {}
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def breakdown(
    rows: Sequence[dict[str, float]], records: Sequence[dict[str, Any]], fields: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per value of each metadata field (e.g. subject, level): ``n`` and mean metrics."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name in fields:
        groups: dict[str, list[dict[str, float]]] = defaultdict(list)
        for row, record in zip(rows, records):
            if name in record:
                groups[str(record[name])].append(row)
        result[name] = {
            value: {"n": len(group), **mean_metrics(group)} for value, group in sorted(groups.items(), key=_natural)
        }
    return result


def _natural(item: tuple[str, Any]) -> tuple[int, Any]:
    """Sort numeric group names numerically (level 2 before level 10)."""
    key = item[0]
    return (0, int(key)) if key.lstrip("-").isdigit() else (1, key)
