"""Paired differences of ``rlclip compare`` (rlclip/bootstrap.py): the two-level bootstrap drawn jointly for two
objectives, checked against hand-computed distributions, refusals of unpaired results, compare.json and report.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import make_run

from rlclip.bootstrap import (
    bootstrap_draws,
    bootstrap_interval,
    pair_order,
    paired_comparisons,
    paired_difference,
    paired_outcomes,
)
from rlclip.compare import PlannedRun, paired_sentences, write_compare_report
from rlclip.errors import ConfigError


def results(label, per_seed, problems=None, seeds=None):
    """Fake ``compare_result.json`` contents: one per seed, problems named p0, p1, ... unless given."""
    seeds = list(range(len(per_seed))) if seeds is None else seeds
    return [{"label": label, "seed": s, "correct": [float(x) for x in c], "accuracy": sum(c) / len(c),
             "problems": list(problems or [f"p{i}" for i in range(len(c))])} for s, c in zip(seeds, per_seed)]


def test_paired_interval_by_hand_is_tighter_than_the_unpaired_one():
    """2 seeds x 3 problems. Seed 0 is hard for both objectives (a = b = [0, 0, 0]), seed 1 easy for both
    (a = [1, 1, 1], b = [0, 1, 1]): the seed luck both share dominates each separate interval and cancels in the pair.

    Separate: a's draws are 0 (seed 0 drawn twice, p 1/4), 1/2 (both seeds, 1/2) or 1 (seed 1 twice, 1/4): [0, 1].
    b is 0 with p >= 1/4 and 1 with p 1/4 (2/3)^3 = 2/27 > 2.5%: [0, 1].
    Paired: the differences are [0, 0, 0] and [1, 0, 0]; with m ~ Binomial(3, 1/3) / 3 the resampled seed-1 mean,
    a draw is 0 (p 1/4), m (p 1/4) or m / 2 (p 1/2). P(d = 1) = 1/4 (1/27) = 0.9% < 2.5% < P(d >= 2/3) =
    1/4 (7/27) = 6.5%, so the interval is [0, 2/3]; P(d <= 0) = 1/4 + 3/4 (8/27) = 17/36 gives p = 17/18.
    """
    a, b = [[0, 0, 0], [1, 1, 1]], [[0, 0, 0], [0, 1, 1]]
    assert bootstrap_interval(a) == (0.5, 0.0, 1.0)
    assert bootstrap_interval(b) == (pytest.approx(1 / 3), 0.0, 1.0)
    row = paired_difference(results("a", a), results("b", b))
    assert row["diff_mean"] == pytest.approx(1 / 6)  # = 0.5 - 1/3, the difference of the two means
    assert (row["ci_low"], row["ci_high"]) == (0.0, pytest.approx(2 / 3))
    assert row["p_value"] == pytest.approx(17 / 18, abs=0.02) and not row["excludes_zero"]
    assert (row["n_seeds"], row["n_problems"], row["n_pairs"], row["a_only"], row["b_only"]) == (2, 3, 6, 1, 0)
    # the unpaired bootstrap of the difference draws a and b independently: far wider (it is [-1, 2/3])
    unpaired = bootstrap_draws(a, seed=1) - bootstrap_draws(b, seed=2)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert row["ci_high"] - row["ci_low"] < 1.0 < 1.5 < high - low  # paired 2/3, separate 1 each, unpaired 5/3


def test_pairing_separates_what_overlapping_intervals_do_not():
    """2 seeds x 5 problems, the same on both: a = [1, 1, 1, 1, 0], b = [1, 0, 0, 0, 0]. The separate intervals
    [2/5, 1] and [0, 3/5] overlap. The differences [0, 1, 1, 1, 0] are 0 in a draw only if every resampled problem
    is 0: P = 1/2 (2/5)^10 + 1/2 (2/5)^5 = 0.52% (two seeds drawn, or one seed twice), and P(d <= 1/10) = 0.60%,
    P(d <= 1/5) = 5.0%, so the interval is [1/5, 1] and p = 2 x 0.52% = 1.03%."""
    a, b = [[1, 1, 1, 1, 0]] * 2, [[1, 0, 0, 0, 0]] * 2
    (_, a_low, a_high), (_, b_low, b_high) = bootstrap_interval(a), bootstrap_interval(b)
    assert (a_low, a_high, b_low, b_high) == (pytest.approx(0.4), 1.0, 0.0, pytest.approx(0.6))
    row = paired_difference(results("a", a), results("b", b))
    assert (row["diff_mean"], row["ci_low"], row["ci_high"]) == (pytest.approx(0.6), pytest.approx(0.2), 1.0)
    assert row["excludes_zero"] and row["p_value"] == pytest.approx(0.0103, abs=0.004)
    assert (row["a_only"], row["b_only"]) == (6, 0)


def test_identical_objectives_differ_by_exactly_zero():
    per_seed = [[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]]
    row = paired_difference(results("a", per_seed), results("b", per_seed))
    assert (row["diff_mean"], row["ci_low"], row["ci_high"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert not row["excludes_zero"] and (row["a_only"], row["b_only"]) == (0, 0)


def test_the_paired_draws_are_the_two_objectives_draws_on_the_same_indices():
    """Resampling the differences is resampling seeds and problems jointly: with the same generator seed, the paired
    draws equal a's draws minus b's (each as its own interval draws them), problem counts varying by seed."""
    rng = np.random.default_rng(7)
    a = [rng.integers(0, 2, n).tolist() for n in (5, 8, 6)]
    b = [rng.integers(0, 2, n).tolist() for n in (5, 8, 6)]
    seeds, diffs = paired_outcomes(results("a", a), results("b", b))
    assert seeds == [0, 1, 2]
    paired = bootstrap_draws(diffs, samples=2000, seed=3)
    np.testing.assert_allclose(paired, bootstrap_draws(a, 2000, 3) - bootstrap_draws(b, 2000, 3), atol=1e-12)
    first, again = paired_difference(results("a", a), results("b", b)), paired_difference(results("a", a),
                                                                                           results("b", b))
    assert first == again  # seeded: the same numbers every time


def test_problems_are_matched_by_name_and_mismatches_are_refused():
    a = results("a", [[1, 0, 1]], problems=["x", "y", "z"])
    shuffled = results("b", [[0, 1, 1]], problems=["z", "x", "y"])  # b: z wrong, x and y right
    _, diffs = paired_outcomes(a, shuffled)
    assert diffs == [[0.0, -1.0, 1.0]]  # x, y, z in a's order
    cases = [
        (results("b", [[1, 0, 1]], problems=["x", "y", "w"]), "at seed 0 they were scored on different held-out "
                                                              r"problems \(3 vs 3, 2 not shared\)"),
        (results("b", [[1, 0]], problems=["x", "y"]), r"different held-out problems \(3 vs 2, 1 not shared\)"),
        (results("b", [[1, 0, 1]], problems=["x", "y", "z"], seeds=[4]), r"different seeds \(a: 0; b: 4\)"),
        ([{"label": "b", "seed": 0, "correct": [1.0, 0.0, 1.0]}], "the run `b` seed 0 has no per-problem outcomes"),
    ]
    for b, message in cases:
        with pytest.raises(ConfigError, match="paired comparison of `a` and `b` refused: .*" + message):
            paired_difference(a, b)
    with pytest.raises(ConfigError, match="different held-out problems"):  # a repeated problem cannot be matched
        paired_outcomes(results("a", [[1, 0]], problems=["x", "x"]), results("b", [[1, 0]], problems=["y", "x"]))


def test_every_objective_against_the_first_then_the_other_pairs():
    assert pair_order(["base", "b", "c"]) == [("b", "base", True), ("c", "base", True), ("c", "b", False)]
    assert pair_order(["base"]) == []
    runs = results("base", [[1, 0]]) + results("b", [[1, 1]]) + results("c", [[0, 0]], problems=["q0", "q1"])
    paired, refused = paired_comparisons(runs, ["base", "b", "c"])
    assert [(p["a"], p["b"], p["baseline"]) for p in paired] == [("b", "base", True)]
    assert [(r["a"], r["b"]) for r in refused] == [("c", "base"), ("c", "b")]
    assert "different held-out problems" in refused[0]["reason"]


def test_sentences_say_what_separates_and_what_does_not():
    row = {"n_seeds": 2, "n_problems": 5, "samples": 10_000}
    close = {"a": "b", "b": "base", "diff_mean": 0.05, "ci_low": -0.1, "ci_high": 0.2, "excludes_zero": False,
             "p_value": 0.5, **row}
    assert paired_sentences([close], [])[0].startswith("No paired interval excludes 0: with 5 held-out problems and "
                                                       "2 seed(s) this sweep does not separate any two objectives")
    below = {**close, "a": "c", "diff_mean": -0.3, "ci_low": -0.5, "ci_high": -0.1, "excludes_zero": True,
             "p_value": 0.0}
    lines = paired_sentences([close, below], [{"reason": "paired comparison of `d` and `base` refused: why"}])
    assert lines == [
        "`base` is above `c` on the same problems and seeds: `c` - `base` is -30.0 points, 95% interval [-50.0, "
        "-10.0], p = < 0.0002.",
        "Not separated (the interval contains 0): `b` vs `base`; on these problems and seeds the sweep cannot tell "
        "them apart.",
        "2 pairs, no correction for multiple comparisons: a pair with no true difference still excludes 0 about one "
        "time in 20.",
        "Not paired: paired comparison of `d` and `base` refused: why."]


def test_compare_json_and_report_hold_the_paired_differences(tmp_path):
    """A finished sweep written from fake runs (no training): 3 objectives x 2 seeds, the third scored on other
    problems, so one pair is computed and two are refused, in compare.json and in report.md."""
    per_label = {"base": [[1, 0, 0, 0, 0]] * 2, "better": [[1, 1, 1, 1, 0]] * 2, "other": [[1, 1, 0, 0, 0]] * 2}
    runs, all_results = [], []
    for label, per_seed in per_label.items():
        problems = [f"q{i}" for i in range(5)] if label == "other" else None
        for result in results(label, per_seed, problems=problems):
            directory = make_run(tmp_path / f"{label}-seed{result['seed']}", label, [0.1, 0.2],
                                 extra={2: {"eval/accuracy": result["accuracy"]}})
            runs.append(PlannedRun(label, {"name": label}, result["seed"], directory))
            all_results.append(result)
    report = write_compare_report(tmp_path, runs, all_results).read_text()
    summary = json.loads((tmp_path / "compare.json").read_text())
    (row,) = summary["paired"]
    assert (row["a"], row["b"], row["baseline"], row["n_seeds"], row["n_problems"]) == ("better", "base", True, 2, 5)
    assert (row["diff_mean"], row["ci_low"], row["ci_high"]) == (pytest.approx(0.6), pytest.approx(0.2), 1.0)
    assert [(r["a"], r["b"]) for r in summary["paired_refused"]] == [("other", "base"), ("other", "better")]
    assert "## Paired differences" in report
    assert "| a - b | seeds | problems | only a right | only b right | difference | 95% interval | p | excludes 0 |" \
        in report
    assert "| `better` - `base` | 2 | 5 | 6 | 0 | +60.0 | [+20.0, +100.0] | 0.0" in report
    assert "`better` is above `base` on the same problems and seeds" in report
    assert "Every pair of intervals overlaps" in report  # the separate intervals did not see it
    assert "Not paired: paired comparison of `other` and `base` refused: at seed 0 they were scored on different " \
           "held-out problems" in report
    assert report.index("## Paired differences") < report.index("![mean reward")


def test_a_spec_may_set_other_sections_for_its_runs(tmp_path):
    """``ratio_clip:rollout.is_mode=token_truncate``: one objective under several corrections is several specs."""
    from conftest import tiny_config
    from rlclip.compare import parse_objectives, plan, run_config
    from rlclip.errors import ConfigError

    config = tiny_config(tmp_path)
    specs = parse_objectives("ratio_clip:rollout.is_mode=none,ratio_clip:rollout.is_mode=token_mask:"
                             "rollout.is_floor=0.5:eps_high=0.3")
    runs = plan(config, specs, [0])
    first, second = (run_config(config, run) for run in runs)
    assert (first.rollout.is_mode, second.rollout.is_mode, second.rollout.is_floor) == ("none", "token_mask", 0.5)
    assert second.objective == {**config.objective, "eps_high": 0.3}  # dotted keys stay out of the objective
    assert runs[0].directory != runs[1].directory
    bad = plan(config, parse_objectives("ratio_clip:rollout.no_such_field=1"), [0])
    with pytest.raises(ConfigError, match="'rollout.no_such_field' is not a config field"):
        run_config(config, bad[0])
    out_of_range = plan(config, parse_objectives("ratio_clip:rollout.staleness=-2"), [0])
    with pytest.raises(ConfigError, match="rollout.staleness must be >= 0"):
        run_config(config, out_of_range[0])
