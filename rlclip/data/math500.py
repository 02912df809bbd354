"""MATH-500 (Lightman et al. 2023, the PRM800K test split of MATH) and the full MATH test set.

MATH-500: hub ``HuggingFaceH4/MATH-500`` or a local JSONL with ``problem``,
``solution``, ``answer``, ``subject``, ``level`` (int) and ``unique_id``.
MATH (suite ``math``): the same adapter reads the 5000-problem JSONL repackaging
(``problem``, ``solution``, ``type``, ``level`` as ``"Level 3"``, ``idx``), whose
answer is the last ``\\boxed{}`` of the solution.
"""

from __future__ import annotations

import re
from typing import Any

from rlclip.data._common import (
    check_instruction,
    check_limit,
    default_source,
    get_field,
    is_local,
    load_hub_rows,
    make_record,
    read_jsonl,
    resolve_file,
)
from rlclip.data.errors import DataError
from rlclip.rewards.grading import last_boxed

SUITE = "math500"
HUB_NAME = "HuggingFaceH4/MATH-500"
LOCAL_FILE = "math500/{split}.jsonl"
MATH_SUITE = "math"
MATH_HUB_NAME = "DigitalLearningGmbH/MATH-lighteval"
MATH_LOCAL_FILE = "math/{split}.jsonl"


def _level(value: Any, where: dict[str, Any]) -> int:
    """``3`` or ``"Level 3"`` -> 3."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(value))
    if not match:
        raise DataError(f"expected a level such as 3 or 'Level 3', got {value!r}", field="level", **where)
    return int(match.group(1))


def _answer(row: dict[str, Any], solution: str, where: dict[str, Any]) -> str:
    """The ``answer`` field, else the last ``\\boxed{}`` of the solution."""
    if row.get("answer") is not None:
        return str(get_field(row, ("answer",), where)).strip()
    boxed = last_boxed(solution)
    if boxed is None or not boxed.strip():
        raise DataError("is missing and the solution has no \\boxed{} answer", field="answer", **where)
    return boxed.strip()


def convert(
    row: dict[str, Any], template: str, index: int, where: dict[str, Any], suite: str = SUITE
) -> dict[str, Any]:
    """One MATH row -> an adapter record (metadata: subject, level, unique_id)."""
    question = get_field(row, ("problem",), where).strip()
    solution = get_field(row, ("solution",), where)
    unique_id = row.get("unique_id", row.get("idx", index))
    return make_record(
        suite,
        template,
        question,
        _answer(row, solution, where),
        solution.strip(),
        id=f"{suite}-{unique_id}",
        subject=get_field(row, ("subject", "type"), where),
        level=_level(get_field(row, ("level",), where, (int, str)), where),
        unique_id=str(unique_id),
    )


def _load(
    suite: str, source: str, split: str, instruction: str | None, limit: int | None, config: str | None = None
) -> list[dict[str, Any]]:
    template, limit = check_instruction(instruction), check_limit(limit)
    records: list[dict[str, Any]] = []
    if is_local(source):
        path = resolve_file(source, split, ("{split}.jsonl",))
        for line, row in read_jsonl(path):
            where = {"source": path, "line": line}
            records.append(convert(row, template, len(records), where, suite))
            if limit and len(records) >= limit:
                break
        return records
    for index, row in enumerate(load_hub_rows(source, config, split)[:limit]):
        where = {"source": f"{source}[{split}]", "index": index}
        records.append(convert(row, template, index, where, suite))
    return records


def load(
    path_or_name: str | None = None,
    split: str = "test",
    instruction: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load MATH-500 records from a local JSONL or the hub (default: local copy if any)."""
    source = path_or_name or default_source(LOCAL_FILE.format(split=split), HUB_NAME)
    return _load(SUITE, source, split, instruction, limit)


def load_math(
    path_or_name: str | None = None,
    split: str = "test",
    instruction: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load the full MATH test set (suite ``math``), answers taken from the solutions' boxes."""
    source = path_or_name or default_source(MATH_LOCAL_FILE.format(split=split), MATH_HUB_NAME)
    return _load(MATH_SUITE, source, split, instruction, limit, config="default")
