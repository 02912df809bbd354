"""SVAMP (Patel et al. 2021): one-unknown arithmetic word problems with varied structure.

Source: a local JSON file holding a list of objects (``ID``, ``Body``, ``Question``,
``Equation``, ``Answer`` (float), ``Type``) as in the ``arkilpatel/SVAMP`` repository
(which has no splits; ``split`` is ignored for it), a local JSONL of such objects,
or a hub data set such as ``ChilleD/SVAMP`` (train/test).
"""

from __future__ import annotations

import json
from typing import Any

from rlclip.data._common import (
    check_instruction,
    check_limit,
    default_source,
    format_number,
    get_field,
    is_local,
    load_hub_rows,
    make_record,
    read_jsonl,
    read_text,
)
from rlclip.data.errors import DataError

SUITE = "svamp"
HUB_NAME = "ChilleD/SVAMP"
LOCAL_FILE = "svamp/SVAMP.json"


def join_body_question(body: str, question: str) -> str:
    """``Body`` + ``Question``; a body without final punctuation continues into the question."""
    body, question = body.strip(), question.strip()
    if body.endswith((".", "?", "!", ":")):
        return f"{body} {question}"
    return f"{body}, {question[:1].lower()}{question[1:]}"


def convert(row: dict[str, Any], template: str, index: int, where: dict[str, Any]) -> dict[str, Any]:
    """One SVAMP object -> an adapter record; the solution is ``Equation = Answer``."""
    body = get_field(row, ("Body", "body"), where)
    question = join_body_question(body, get_field(row, ("Question", "question"), where))
    value = get_field(row, ("Answer", "answer"), where, (int, float, str))
    try:
        answer = format_number(float(value))
    except ValueError:
        raise DataError(f"expected a number, got {value!r}", field="Answer", **where) from None
    equation = str(row.get("Equation", row.get("equation", "")) or "").strip()
    solution = f"{equation} = {answer}\nThe answer is {answer}." if equation else f"The answer is {answer}."
    return make_record(
        SUITE,
        template,
        question,
        answer,
        solution,
        id=str(row.get("ID", row.get("id", f"{SUITE}-{index}"))),
        equation=equation,
        type=str(row.get("Type", row.get("type", ""))),
    )


def _read_local(path: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, location) pairs from a JSON list file or a JSONL file."""
    name = path
    if path.endswith(".jsonl"):
        return [(row, {"source": name, "line": line}) for line, row in read_jsonl(path)]
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg})", source=name, line=exc.lineno) from None
    if not isinstance(data, list):
        raise DataError("expected a JSON list of problems", source=name)
    pairs = []
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError("expected a JSON object", source=name, index=index)
        pairs.append((row, {"source": name, "index": index}))
    return pairs


def load(
    path_or_name: str | None = None,
    split: str = "test",
    instruction: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load SVAMP records from a local JSON/JSONL file or the hub (default: local copy if any)."""
    template, limit = check_instruction(instruction), check_limit(limit)
    source = path_or_name or default_source(LOCAL_FILE, HUB_NAME)
    if is_local(source):
        pairs = _read_local(source)
    else:
        rows = load_hub_rows(source, None, split)
        pairs = [(row, {"source": f"{source}[{split}]", "index": i}) for i, row in enumerate(rows)]
    return [convert(row, template, i, where) for i, (row, where) in enumerate(pairs[:limit])]
