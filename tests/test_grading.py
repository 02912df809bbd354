"""Answer extraction and grading (rlclip.rewards.grading) and the math reward functions."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlclip.rewards.grading import (
    answer_key,
    extract_answer,
    find_boxed,
    grade,
    last_boxed,
    parse_gold,
    parse_number,
)
from rlclip.rewards.math_rewards import completion_text, correctness_reward, format_reward

# (completion, gold, suite, expected)
NUMERIC_CASES = [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "gsm8k", True),
    ("#### 1,000", "1000", "gsm8k", True),
    ("#### Step 2: add the costs\n9 + 9 = 18, so \\boxed{18}.", "18", "gsm8k", True),
    ("#### 18 dollars", "18", "gsm8k", True),
    ("The total is \\boxed{2125}.", "2,125", "gsm8k", True),
    ("So the answer is \\boxed{18}.", "18", "gsm8k", True),
    ("\\boxed{\\$18.00}", "18", "gsm8k", True),
    ("The answer is $1,000.50.", "1000.5", "gsm8k", True),
    ("The answer is 3.50", "3.5", "gsm8k", True),
    ("The answer is 3/4", "0.75", "gsm8k", True),
    ("The answer is 25%.", "25", "gsm8k", True),
    ("Final Answer: 42", "42", "gsm8k", True),
    ("**Final Answer:** 42", "42", "gsm8k", True),
    ("The answer is: 7 marbles.", "7", "gsm8k", True),
    ("Final answer:\n42", "42", "gsm8k", True),
    ("The answer is five.", "5", "gsm8k", True),
    ("The temperature ends at -5 degrees.", "-5", "gsm8k", True),
    ("Janet sells 16-3-4=9 eggs", "9", "gsm8k", True),
    ("First 5 + 3 = 8, then 8 * 2 = 16", "16", "gsm8k", True),
    ("\\boxed{18} is what I get; 20 was a wrong guess", "18", "gsm8k", True),
    ("The answer is 18.\nThen 30 more lines of musing: 31", "18", "gsm8k", True),
    ("The answer is 51", "51.0", "svamp", True),
    ("He pays 4 - 3 = 1 dollar. The answer is 1.", "1", "svamp", True),
    ("The answer is 9 apples", "9 (apples)", "asdiv", True),
    ("So 7 + 2 = 9 (apples) are in the basket.", "9 (apples)", "asdiv", True),
    ("The answer is 0.33", "1/3", "asdiv", True),
    ("\\boxed{-\\frac{1}{3}}", "-(1/3)", "asdiv", True),
    ("#### 17", "18", "gsm8k", False),
    ("\\boxed{18}", "180", "gsm8k", False),
    ("\\boxed{1,000}", "1", "gsm8k", False),
    ("The answer is 0.3", "1/3", "asdiv", False),
    ("I do not know.", "18", "gsm8k", False),
    ("", "18", "gsm8k", False),
    ("The answer is 20:13", "20", "asdiv", False),
    ("The answer is 18, not 19.", "19", "gsm8k", False),
    ("The answer is 18, since 9 * 2 = 18.", "18", "gsm8k", True),
    ("The answer is 60; 72", "60 (beanie babies)", "asdiv", False),
    ("\\boxed{18, 19}", "18", "gsm8k", False),
    ("\\boxed{1,000}", "1000", "gsm8k", True),
]

ASDIV_CASES = [
    ("The answer is 3:4.", "3:4", True),
    ("The ratio is 6:8, so the answer is 6:8.", "3:4", True),
    ("The answer is 3 to 4.", "3:4", True),
    ("The answer is 3:5.", "3:4", False),
    ("The answer is 3:30 pm.", "3:30 p.m.", True),
    ("The answer is 15:30", "3:30 p.m.", True),
    ("The answer is 3:30 a.m.", "3:30 p.m.", False),
    ("\\boxed{9:03:36 a.m.}", "9:03:36 a.m.", True),
    ("The answer is 5, 15 and 20 years.", "5 (years old); 15 (years old); 20 (years old)", True),
    ("The answer is 20; 5; 15", "5 (years old); 15 (years old); 20 (years old)", True),
    ("The answer is 5 and 15.", "5 (years old); 15 (years old); 20 (years old)", False),
    ("The answer is Mrs. Hilt.", "Mrs. Hilt", True),
    ("Mrs. Hilt has more money.\nThe answer is Jacob.", "Mrs. Hilt", False),
    ("The answer is yes, she has enough.", "Yes", True),
    ("The answer is no.", "Yes", False),
    ("The answer is 6.", "6th", True),
    ("\\boxed{\\text{The men's track team}}", "The men's track team", True),
    ("Comparing the fractions, they are equal", "They are equal", True),
]

MATH_CASES = [
    ("So $x = \\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{3}", False),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac34", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("The answer is $\\frac{1}{2}$.", "\\frac12", True),
    ("\\boxed{3}", "4", False),
    ("no box here", "4", False),
    ("\\boxed{(3,\\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{[1, 3)}", "[1,3)", True),
    ("\\boxed{(1,3)}", "[1,3)", False),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", True),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{x=5}", "5", True),
    ("\\boxed{2x+4}", "2x+5", False),
]


@pytest.mark.parametrize("completion,gold,suite,expected", NUMERIC_CASES)
def test_numeric_grading(completion: str, gold: str, suite: str, expected: bool) -> None:
    assert grade(completion, gold, suite) is expected


@pytest.mark.parametrize("completion,gold,expected", ASDIV_CASES)
def test_asdiv_special_answers(completion: str, gold: str, expected: bool) -> None:
    assert grade(completion, gold, "asdiv") is expected


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_math_grading(completion: str, gold: str, expected: bool) -> None:
    assert grade(completion, gold, "math500") is expected
    assert grade(completion, gold, "math") is expected


@pytest.mark.parametrize(
    "completion,suite,expected",
    [
        ("x\n#### 1,234\n", "gsm8k", "1,234"),
        ("a \\boxed{7} b \\boxed{8}", "gsm8k", "8"),
        ("The answer is $12.", "svamp", "$12"),
        ("1 then 2 then 3", "asdiv", "3"),
        ("nothing", "gsm8k", None),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}.", "math500", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{12", "math500", None),
        ("The final answer is $\\boxed{\\{1,2\\}}$", "math500", "\\{1,2\\}"),
    ],
)
def test_extract_answer(completion: str, suite: str, expected: str | None) -> None:
    assert extract_answer(completion, suite) == expected


def test_boxed_spans() -> None:
    assert find_boxed("\\boxed{a{b}c} and \\fbox{7} and \\boxed 5 $") == ["a{b}c", "7", "5"]
    assert last_boxed("\\boxed{\\boxed{4}}") == "\\boxed{4}"
    assert last_boxed("\\boxed{\\{1\\}}") == "\\{1\\}"
    assert last_boxed("none") is None


def test_number_and_gold_parsing() -> None:
    assert parse_number("$1,234.50 dollars").value == pytest.approx(1234.5)
    assert parse_number("\\frac{3}{4}").value == pytest.approx(0.75)
    assert parse_number("x = 2 + 3 = 5").value == 5
    assert parse_number("no digits") is None
    assert parse_gold("9 (apples)").kind == "number"
    assert parse_gold("11; 12; 13").values == (11.0, 12.0, 13.0)
    assert parse_gold("3:30 p.m.").meridiem == "p"
    assert parse_gold("Mrs. Hilt").kind == "text"


def test_answer_key_groups_equal_answers() -> None:
    assert answer_key("The answer is 1,000.", "gsm8k") == answer_key("\\boxed{1000}", "gsm8k")
    assert answer_key("\\boxed{\\dfrac{1}{2}}", "math500") == answer_key("\\boxed{0.5}", "math500")
    assert answer_key("nothing here", "math500") is None


def test_unknown_suite_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown suite"):
        grade("1", "1", "mmlu")


def test_no_eval_of_model_text() -> None:
    """Expressions in answers are never executed."""
    assert grade("\\boxed{__import__('os').getcwd()}", "1", "gsm8k") is False
    assert grade("The answer is 2**10", "1024", "gsm8k") is False


PATHOLOGICAL = "\\boxed{9^{9^{9^{9^9}}}}"


def _timed_grade(completion: str, gold: str, timeout: float) -> tuple[bool, float]:
    start = time.perf_counter()
    result = grade(completion, gold, "math500", timeout=timeout)
    return result, time.perf_counter() - start


def test_huge_inputs_are_fast() -> None:
    huge = "1 2 3 " * 100_000 + "the answer is " + "( " * 5000 + "\\boxed{" + "{" * 3000
    start = time.perf_counter()
    assert grade(huge, "3", "gsm8k") is False
    assert grade(huge, "3", "math500") is False
    assert grade("\\boxed{" + "x+" * 5000 + "1}", "3", "math500") is False
    assert time.perf_counter() - start < 5.0


def test_pathological_input_times_out() -> None:
    grade("\\boxed{(x+1)^2}", "x^2+2x+1", "math500")  # warm a worker up
    result, elapsed = _timed_grade(PATHOLOGICAL, "5", timeout=2.0)
    assert result is False
    assert elapsed < 8.0
    assert grade("\\boxed{(x+1)^2}", "x^2+2x+1", "math500") is True  # worker replaced


def test_pathological_input_times_out_off_main_thread() -> None:
    outcome: list[tuple[bool, float]] = []
    thread = threading.Thread(target=lambda: outcome.append(_timed_grade(PATHOLOGICAL, "5", 2.0)))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome and outcome[0][0] is False and outcome[0][1] < 10.0


def test_grading_from_many_threads() -> None:
    cases = [(c, g, e) for c, g, e in MATH_CASES] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: grade(case[0], case[1], "math500", timeout=60), cases))  # thread safety, not speed
    assert results == [expected for _, _, expected in cases]


def test_correctness_reward_strings_and_messages() -> None:
    completions = [
        "so #### 18",
        [{"role": "assistant", "content": "The answer is \\boxed{17}."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{18}"}]}],
    ]
    rewards = correctness_reward(None, completions, answer=["18", "18", "18"], suite=["gsm8k"] * 3)
    assert rewards == [1.0, 0.0, 1.0]
    assert correctness_reward([None], ["\\boxed{\\frac12}"], answer=["0.5"], suite="math500") == [1.0]
    assert correctness_reward([None], ["x"], answer=[None], suite="gsm8k") == [None]
    with pytest.raises(ValueError, match="suite"):
        correctness_reward([None], ["x"], answer=["1"])


def test_format_reward() -> None:
    completions = ["\\boxed{3}", "#### 3", "The answer is 3.", "3", [{"role": "assistant", "content": "\\boxed{}"}]]
    assert format_reward(None, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(None, completions, require="any") == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert completion_text({"role": "assistant", "content": "hi"}) == "hi"
