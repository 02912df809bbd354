"""Bootstrap statistics of held-out outcomes for ``rlclip compare``.

One resampling scheme serves both questions the compare report asks. Each of
``samples`` bootstrap draws picks the seeds with replacement and, within each
drawn seed, its held-out problems with replacement (a two-level bootstrap), then
averages per seed and over the drawn seeds:

- the **interval of one objective** applies it to the 0/1 outcomes of its runs;
- the **paired difference** of objectives ``a`` and ``b`` applies it to the
  per-(seed, problem) differences ``correct_a - correct_b``. Drawing a
  difference is drawing the same seed and the same problem for both
  objectives, so the pairing is kept: the draws equal those of ``a`` minus
  those of ``b`` made with the same indices (same generator seed and shapes).
  Problem difficulty and seed luck that both objectives share cancel, which is
  why a paired interval can exclude 0 while the two separate intervals overlap.

Deterministic: the generator is seeded (``seed``, default 0).
"""

from __future__ import annotations

from typing import Any

from rlclip.errors import ConfigError

BOOTSTRAP_SAMPLES = 10_000
LEVEL = 0.95


def bootstrap_draws(per_seed: list[list[float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Any:
    """``samples`` two-level bootstrap means of ``per_seed`` (one list of per-problem values per seed): ``[B]``.

    Each draw picks the seeds with replacement and, for each drawn seed, its
    problems with replacement, so both the seed-to-seed spread and the finite
    held-out set widen the spread of the draws.
    """
    import numpy as np

    if not per_seed or any(len(c) == 0 for c in per_seed):
        raise ConfigError("a run has no held-out outcomes; set eval.limit >= 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(per_seed), size=(samples, len(per_seed)))  # [B, S]
    seed_means = np.empty((samples, len(per_seed)))  # [B, S]
    for s, outcomes in enumerate(per_seed):
        values = np.asarray(outcomes, dtype=float)
        resampled = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)  # [B]
        seed_means[:, s] = resampled
    return np.take_along_axis(seed_means, picks, axis=1).mean(axis=1)  # [B]


def _mean(per_seed: list[list[float]]) -> float:
    import numpy as np

    return float(np.mean([np.mean(c) for c in per_seed]))


def _interval(draws: Any, level: float) -> tuple[float, float]:
    import numpy as np

    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(per_seed: list[list[float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                       level: float = LEVEL) -> tuple[float, float, float]:
    """Mean accuracy over seeds (mean of the per-seed means) and its percentile bootstrap interval."""
    draws = bootstrap_draws(per_seed, samples, seed)
    return (_mean(per_seed), *_interval(draws, level))


def paired_outcomes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[list[int], list[list[float]]]:
    """The seeds and, per seed, ``correct_a - correct_b`` problem by problem.

    ``a`` and ``b`` are the results of two objectives (one per seed, each with
    ``seed``, ``correct`` and ``problems``). Refused with a one-line
    ``ConfigError`` unless both ran the same seeds and, at each seed, were scored
    on the same held-out problems (matched by problem text; the order may differ
    when no problem is repeated).
    """
    name_a, name_b = (_name(a), _name(b))
    head = f"paired comparison of `{name_a}` and `{name_b}` refused"
    for result in (*a, *b):
        correct, problems = result.get("correct"), result.get("problems")
        if correct is None or problems is None or len(correct) != len(problems):
            raise ConfigError(f"{head}: the run `{_name([result])}` seed {result.get('seed')} has no per-problem "
                              "outcomes ('correct' and 'problems' of equal length) in its compare_result.json")
    by_a, by_b = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    if len(by_a) != len(a) or len(by_b) != len(b):
        raise ConfigError(f"{head}: a seed appears twice among the runs of one objective")
    if set(by_a) != set(by_b):
        raise ConfigError(f"{head}: they ran different seeds ({name_a}: {_seeds(by_a)}; {name_b}: {_seeds(by_b)})")
    seeds = sorted(by_a)
    diffs = []
    for s in seeds:
        ra, rb = by_a[s], by_b[s]
        pa, pb = [str(p) for p in ra["problems"]], [str(p) for p in rb["problems"]]
        ca, cb = list(ra["correct"]), list(rb["correct"])
        if pa != pb:
            if len(set(pa)) != len(pa) or sorted(pa) != sorted(pb):
                only = len(set(pa) ^ set(pb))
                raise ConfigError(f"{head}: at seed {s} they were scored on different held-out problems ({len(pa)} "
                                  f"vs {len(pb)}, {only} not shared); pair runs evaluated on the same problems")
            where = {p: i for i, p in enumerate(pb)}
            cb = [cb[where[p]] for p in pa]
        diffs.append([float(x) - float(y) for x, y in zip(ca, cb)])
    return seeds, diffs


def _name(results: list[dict[str, Any]]) -> str:
    first = results[0] if results else {}
    return str(first.get("label") or (first.get("objective") or {}).get("name", "?"))


def _seeds(by_seed: dict[int, Any]) -> str:
    return ", ".join(str(s) for s in sorted(by_seed)) or "none"


def paired_difference(a: list[dict[str, Any]], b: list[dict[str, Any]], samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0, level: float = LEVEL) -> dict[str, Any]:
    """Accuracy of ``a`` minus that of ``b`` on the same seeds and problems, with its paired bootstrap.

    ``diff_mean`` is the mean over seeds of the per-seed mean difference (equal
    to the difference of the two objectives' means); ``ci_low``/``ci_high`` its
    percentile interval; ``p_value`` the two-sided bootstrap p-value
    ``min(1, 2 min(P*(d <= 0), P*(d >= 0)))`` over the draws ``d``, the smallest
    two-sided level whose percentile interval reaches 0. ``a_only``/``b_only``
    count the (seed, problem) pairs only ``a`` (only ``b``) got right.
    """
    import numpy as np

    seeds, diffs = paired_outcomes(a, b)
    draws = bootstrap_draws(diffs, samples, seed)
    low, high = _interval(draws, level)
    p_value = min(1.0, 2 * min(float(np.mean(draws <= 0)), float(np.mean(draws >= 0))))
    flat = [d for row in diffs for d in row]
    return {"diff_mean": _mean(diffs), "ci_low": low, "ci_high": high, "excludes_zero": low > 0 or high < 0,
            "p_value": p_value, "n_seeds": len(seeds), "n_problems": len(diffs[0]), "n_pairs": len(flat),
            "seeds": seeds, "a_only": sum(d > 0 for d in flat), "b_only": sum(d < 0 for d in flat),
            "samples": samples, "level": level}


def pair_order(labels: list[str]) -> list[tuple[str, str, bool]]:
    """``(a, b, against_baseline)``: every objective against the first listed (the baseline), then the other pairs,
    each later-listed objective as ``a`` so that a difference reads "``a`` minus the earlier one"."""
    first = [(labels[j], labels[0], True) for j in range(1, len(labels))]
    rest = [(labels[j], labels[i], False) for i in range(1, len(labels)) for j in range(i + 1, len(labels))]
    return first + rest


def paired_comparisons(results: list[dict[str, Any]], labels: list[str], samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every pair of objective specs (``pair_order``): the computed differences, and the pairs refused (with the
    reason) because their runs do not share seeds and problems."""
    by_label = {label: [r for r in results if r.get("label") == label] for label in labels}
    present = [label for label in labels if by_label[label]]
    paired, refused = [], []
    for a, b, baseline in pair_order(present):
        head = {"a": a, "b": b, "baseline": baseline}
        try:
            paired.append({**head, **paired_difference(by_label[a], by_label[b], samples, seed)})
        except ConfigError as err:
            refused.append({**head, "reason": str(err)})
    return paired, refused
