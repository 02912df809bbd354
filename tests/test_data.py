"""Benchmark adapters (gsm8k, math500, svamp, asdiv) on small files, their errors, and the
real benchmark files (gold self-check) when ``$RLCLIP_DATA_DIR`` (default ../shared/data) has them."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from rlclip.data import asdiv, gsm8k, math500, svamp
from rlclip.data._common import DEFAULT_INSTRUCTION, default_data_dir
from rlclip.data.errors import DataError
from rlclip.data.suites import SUITES, get_suite, load_suite
from rlclip.rewards.grading import extract_answer, grade, last_boxed
from rlclip.rewards.verify_pool import get_pool

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"prompt", "answer", "suite", "question", "solution", "id"}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A house costs $80,000 plus $920.", "answer": "80000+920=80920\n#### 80,920"},
]


def test_gsm8k_local_file(tmp_path: Path) -> None:
    records = gsm8k.load(str(write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)))
    assert len(records) == 2 and RECORD_KEYS <= set(records[0])
    first = records[0]
    assert first["answer"] == "5" and first["suite"] == "gsm8k"
    assert first["prompt"][0]["role"] == "user"
    assert first["prompt"][0]["content"] == DEFAULT_INSTRUCTION.replace("{question}", first["question"])
    assert records[1]["answer"] == "80,920"
    assert grade(first["solution"], first["answer"], "gsm8k")


def test_gsm8k_directory_limit_and_instruction(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    records = gsm8k.load(str(tmp_path), split="train", instruction="Q: {question}\nA: {{}}", limit=1)
    assert len(records) == 1
    assert records[0]["prompt"][0]["content"] == f"Q: {GSM8K_ROWS[0]['question']}\nA: {{}}"
    with pytest.raises(DataError, match="must contain"):
        gsm8k.load(str(tmp_path), split="train", instruction="no placeholder")
    with pytest.raises(DataError, match="test.jsonl"):
        gsm8k.load(str(tmp_path), split="test")


@pytest.mark.parametrize(
    "bad_row,pattern",
    [
        ({"question": "q"}, r"bad\.jsonl, line 2, field 'answer': is missing"),
        ({"question": "q", "answer": "no final answer"}, r"line 2, field 'answer': has no '####'"),
        ({"question": 7, "answer": "#### 1"}, r"line 2, field 'question': expected str"),
        ({"question": "q", "answer": "#### "}, r"line 2, field 'answer'"),
        ("{not json", r"bad\.jsonl, line 2: invalid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object"),
    ],
)
def test_gsm8k_bad_records(tmp_path: Path, bad_row: object, pattern: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], bad_row])
    with pytest.raises(DataError, match=pattern) as info:
        gsm8k.load(str(path))
    assert isinstance(info.value, ValueError) and info.value.line == 2


def test_missing_file_and_hub_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        gsm8k.load(str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="could not load hub data set"):
        gsm8k.load("no-such-org/no-such-dataset")  # offline (HF_HUB_OFFLINE=1) or unknown
    with pytest.raises(DataError, match="unknown suite"):
        get_suite("mmlu")


def test_math500_local_file(tmp_path: Path) -> None:
    rows = [
        {"problem": "What is $1/2$?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}",
         "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1.json"},
        {"problem": "Sum?", "solution": "So $\\boxed{3}$.", "type": "Prealgebra", "level": "Level 1", "idx": 9},
    ]
    records = math500.load(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [r["answer"] for r in records] == ["\\frac{1}{2}", "3"]
    assert records[0]["subject"] == "Algebra" and records[0]["level"] == 2
    assert records[0]["unique_id"] == "test/algebra/1.json"
    assert records[1]["subject"] == "Prealgebra" and records[1]["level"] == 1 and records[1]["unique_id"] == "9"
    assert math500.load_math(str(tmp_path / "m.jsonl"))[0]["suite"] == "math"


def test_math500_bad_records(tmp_path: Path) -> None:
    base = {"problem": "p", "solution": "no box", "subject": "Algebra", "level": 1}
    with pytest.raises(DataError, match=r"line 1, field 'answer': is missing and the solution has no"):
        math500.load(str(write_jsonl(tmp_path / "a.jsonl", [base])))
    with pytest.raises(DataError, match=r"line 1, field 'level'"):
        math500.load(str(write_jsonl(tmp_path / "b.jsonl", [{**base, "answer": "1", "level": "hard"}])))
    with pytest.raises(DataError, match=r"line 1, field 'problem': is missing"):
        math500.load(str(write_jsonl(tmp_path / "c.jsonl", [{"solution": "\\boxed{1}", "level": 1}])))


SVAMP_ROWS = [
    {"ID": "chal-1", "Body": "Each pack costs 76 dollars. There is a discount of 25 dollars on each pack",
     "Question": "How much do you pay?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0, "Type": "Subtraction"},
    {"ID": "chal-2", "Body": "Dan had $ 3 left.", "Question": "How much did he spend?", "Equation": "( 4.0 - 3.0 )",
     "Answer": 1.5, "Type": "Subtraction"},
]


def test_svamp_local_file(tmp_path: Path) -> None:
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps(SVAMP_ROWS))
    records = svamp.load(str(path))
    assert [r["answer"] for r in records] == ["51", "1.5"]
    assert records[0]["question"].endswith("on each pack, how much do you pay?")
    assert records[1]["question"] == "Dan had $ 3 left. How much did he spend?"
    assert records[0]["id"] == "chal-1" and records[0]["type"] == "Subtraction"
    assert all(grade(r["solution"], r["answer"], "svamp") for r in records)
    assert len(svamp.load(str(write_jsonl(tmp_path / "s.jsonl", SVAMP_ROWS)), limit=1)) == 1


def test_svamp_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([SVAMP_ROWS[0], {**SVAMP_ROWS[1], "Answer": "many"}]))
    with pytest.raises(DataError, match=r"bad\.json, record 1, field 'Answer': expected a number"):
        svamp.load(str(path))
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        svamp.load(str(path))


ASDIV_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<Machine-Reading-Corpus-File><ProblemSet>
  <Problem ID="nluds-0001" Grade="1" Source="x">
    <Body>Seven red apples and two green apples are in the basket.</Body>
    <Question>How many apples are in the basket?</Question>
    <Solution-Type>Addition</Solution-Type>
    <Answer>9 (apples)</Answer>
    <Formula>7+2=9</Formula>
  </Problem>
  <Problem ID="nluds-0850" Grade="6" Source="x">
    <Body>There are 15 boys and 18 girls.</Body>
    <Question>What is the ratio of boys to girls?</Question>
    <Solution-Type>Ratio</Solution-Type>
    <Answer>5:6</Answer>
    <Formula>15:18=5:6</Formula>
  </Problem>
</ProblemSet></Machine-Reading-Corpus-File>
"""


def test_asdiv_local_file(tmp_path: Path) -> None:
    path = tmp_path / "ASDiv.xml"
    path.write_text(ASDIV_XML)
    records = asdiv.load(str(path))
    assert [r["answer"] for r in records] == ["9 (apples)", "5:6"]
    assert records[0]["question"].startswith("Seven red apples") and records[0]["question"].endswith("basket?")
    assert records[1]["id"] == "nluds-0850" and records[1]["solution_type"] == "Ratio" and records[1]["grade"] == "6"
    assert all(grade(r["solution"], r["answer"], "asdiv") for r in records)


def test_asdiv_bad_records(tmp_path: Path) -> None:
    path = tmp_path / "ASDiv.xml"
    path.write_text(ASDIV_XML.replace("<Answer>5:6</Answer>", ""))
    with pytest.raises(DataError, match=r"ASDiv\.xml \(Problem nluds-0850\), record 1, field 'Answer': is missing"):
        asdiv.load(str(path))
    path.write_text(ASDIV_XML.replace("</Body>", "", 1))
    with pytest.raises(DataError, match=r"ASDiv\.xml, line \d+: invalid XML"):
        asdiv.load(str(path))


def test_registry_matches_suites_yaml() -> None:
    spec = yaml.safe_load((ROOT / "eval" / "suites.yaml").read_text())
    assert spec["instruction"] == DEFAULT_INSTRUCTION
    assert set(spec["suites"]) == set(SUITES) >= {"gsm8k", "math500", "svamp", "asdiv"}
    for name, entry in spec["suites"].items():
        suite = SUITES[name]
        assert (suite.local_file.format(split=suite.split), suite.hub_name) == (entry["local_file"], entry["hub_name"])
        assert list(suite.breakdown) == entry["breakdown"]


# ----------------------------------------------------------------------------- real files

SIZES = {"gsm8k": 1319, "math500": 500, "svamp": 1000, "asdiv": 2305}
MIN_GOLD_ACCURACY = {"gsm8k": 0.995, "math500": 0.97, "svamp": 1.0, "asdiv": 1.0}


def _real(name: str) -> list[dict]:
    path = default_data_dir() / SUITES[name].local_file.format(split="test")
    if not path.is_file():
        pytest.skip(f"{path} not present (set RLCLIP_DATA_DIR)")
    return load_suite(name, str(path))


@pytest.mark.parametrize("name", list(SIZES))
def test_real_files_gold_self_check(name: str) -> None:
    records = _real(name)
    assert len(records) == SIZES[name]
    correct = [grade(r["solution"], r["answer"], name) for r in records]
    failures = sum(extract_answer(r["solution"], name) is None for r in records)
    assert sum(correct) / len(records) >= MIN_GOLD_ACCURACY[name], [r["id"] for r, ok in zip(records, correct) if not ok]
    assert failures == 0


@pytest.mark.parametrize("name", ["gsm8k", "svamp", "asdiv"])
def test_real_files_shuffled_golds_rarely_match(name: str) -> None:
    """Negative control: a solution graded against another problem's answer is almost never right."""
    records = _real(name)
    golds = [r["answer"] for r in records]
    random.Random(0).shuffle(golds)
    hits = sum(grade(r["solution"], g, name) for r, g in zip(records, golds) if g != r["answer"])
    assert hits / len(records) < 0.02


def test_real_math500_self_check_through_math_verify() -> None:
    """The symbolic path alone (no string shortcut) accepts the reference answers too.

    With a generous timeout: this checks math-verify's verdicts, not its speed. Under the default 5 s a busy
    machine timed out on identical answers (each a False) while a fresh worker was still loading sympy, and
    each timeout killed the worker and started a cold one, so one slow comparison led to the next: about 15
    minutes and 12 false rejections, against about 30 s of comparisons (all 500 accepted) without timeouts."""
    records = _real("math500")
    pool = get_pool()
    with ThreadPoolExecutor(max_workers=pool.max_workers) as executor:
        verdicts = list(executor.map(lambda r: pool.verify(r["answer"], last_boxed(r["solution"]), timeout=60),
                                     records))
    assert sum(verdicts) / len(records) >= 0.97
