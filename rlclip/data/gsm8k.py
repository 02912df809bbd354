"""GSM8K (Cobbe et al. 2021): grade-school math word problems with a ``#### N`` final answer.

Source: the hub data set ``openai/gsm8k`` (config ``main``) or a local JSONL file
(or a directory holding ``<split>.jsonl``) with ``question`` and ``answer`` fields,
the answer being the worked solution ending in ``#### <number>``.
"""

from __future__ import annotations

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

SUITE = "gsm8k"
HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"
LOCAL_FILE = "gsm8k/{split}.jsonl"


def final_answer(solution: str, where: dict[str, Any]) -> str:
    """The text after the last ``####`` of a GSM8K solution (DataError when absent)."""
    if "####" not in solution:
        raise DataError("has no '####' final answer", field="answer", **where)
    answer = solution.rsplit("####", 1)[1].strip()
    if not answer:
        raise DataError("is empty after '####'", field="answer", **where)
    return answer


def convert(row: dict[str, Any], template: str, index: int, where: dict[str, Any]) -> dict[str, Any]:
    """One GSM8K row -> an adapter record."""
    question = get_field(row, ("question",), where).strip()
    solution = get_field(row, ("answer",), where)
    return make_record(
        SUITE, template, question, final_answer(solution, where), solution.strip(), id=f"{SUITE}-{index}"
    )


def load(
    path_or_name: str | None = None,
    split: str = "test",
    instruction: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load GSM8K records from a local JSONL file/directory or the hub (default: local copy if any)."""
    template, limit = check_instruction(instruction), check_limit(limit)
    source = path_or_name or default_source(LOCAL_FILE.format(split=split), HUB_NAME)
    records: list[dict[str, Any]] = []
    if is_local(source):
        path = resolve_file(source, split, ("{split}.jsonl",))
        for line, row in read_jsonl(path):
            where = {"source": path, "line": line}
            records.append(convert(row, template, len(records), where))
            if limit and len(records) >= limit:
                break
        return records
    for index, row in enumerate(load_hub_rows(source, HUB_CONFIG, split)[:limit]):
        records.append(convert(row, template, index, {"source": f"{source}[{split}]", "index": index}))
    return records
