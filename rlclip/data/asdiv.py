"""ASDiv (Miao et al. 2020): a diverse corpus of 2305 English math word problems.

Source: the ``ASDiv.xml`` file of ``chaochun/nlu-asdiv-dataset`` (``<Problem ID=...
Grade=...>`` with ``Body``, ``Question``, ``Solution-Type``, ``Answer`` such as
``9 (apples)`` and ``Formula``), or a hub data set such as ``EleutherAI/asdiv``
(lower-case fields, split ``validation``). The gold answer is the ``Answer`` text as
stated; :func:`rlclip.rewards.grade` understands its numbers, units, ratios, times,
lists and words.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any

from rlclip.data._common import (
    check_instruction,
    check_limit,
    default_source,
    get_field,
    is_local,
    load_hub_rows,
    make_record,
    open_data_file,
)
from rlclip.data.errors import DataError

SUITE = "asdiv"
HUB_NAME = "EleutherAI/asdiv"
LOCAL_FILE = "asdiv/ASDiv.xml"
_FIELDS = {"Body": "body", "Question": "question", "Answer": "answer", "Formula": "formula"}


def _xml_rows(path: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, location) pairs, one per ``<Problem>`` element."""
    name = path
    try:
        with open_data_file(path, "rb") as handle:
            root = ET.parse(handle).getroot()
    except ET.ParseError as exc:
        raise DataError(f"invalid XML ({exc})", source=name, line=exc.position[0]) from None
    pairs = []
    for index, problem in enumerate(root.iter("Problem")):
        row: dict[str, Any] = {child.tag: child.text for child in problem}
        row.update({f"@{key}": value for key, value in problem.attrib.items()})
        where = {"source": f"{name} (Problem {problem.get('ID', '?')})", "index": index}
        pairs.append((row, where))
    if not pairs:
        raise DataError("has no <Problem> elements", source=name)
    return pairs


def convert(row: dict[str, Any], template: str, index: int, where: dict[str, Any]) -> dict[str, Any]:
    """One ASDiv problem -> an adapter record; the solution is ``Formula`` + the answer."""
    fields = {key: (key, low) for key, low in _FIELDS.items()}
    body = get_field(row, fields["Body"], where).strip()
    question = get_field(row, fields["Question"], where).strip()
    answer = " ".join(get_field(row, fields["Answer"], where).split())
    formula = str(row.get("Formula", row.get("formula")) or "").strip()
    solution = f"{formula}\nThe answer is {answer}." if formula else f"The answer is {answer}."
    return make_record(
        SUITE,
        template,
        f"{body} {question}",
        answer,
        solution,
        id=str(row.get("@ID", row.get("id", f"{SUITE}-{index}"))),
        grade=str(row.get("@Grade", row.get("grade", ""))),
        solution_type=str(row.get("Solution-Type", row.get("solution_type", "")) or ""),
        formula=formula,
    )


def load(
    path_or_name: str | None = None,
    split: str = "test",
    instruction: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load ASDiv records from the local XML file or the hub (default: local copy if any).

    The XML has no splits; for the hub, ``split="test"`` is read as ``validation``.
    """
    template, limit = check_instruction(instruction), check_limit(limit)
    source = path_or_name or default_source(LOCAL_FILE, HUB_NAME)
    if is_local(source):
        if os.path.isdir(source):
            raise DataError("expected the ASDiv.xml file, got a directory", source=source)
        pairs = _xml_rows(source)
    else:
        hub_split = "validation" if split == "test" else split
        rows = load_hub_rows(source, None, hub_split)
        pairs = [(row, {"source": f"{source}[{hub_split}]", "index": i}) for i, row in enumerate(rows)]
    return [convert(row, template, i, where) for i, (row, where) in enumerate(pairs[:limit])]
