"""Helpers shared by the benchmark adapters (gsm8k, math500, svamp, asdiv).

Every adapter returns records shaped as::

    {"prompt": [{"role": "user", "content": <instruction filled with the question>}],
     "answer": <gold final answer, str>, "suite": <suite name>, "question": ...,
     "solution": <reference solution text>, "id": ..., **metadata}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rlclip.data.errors import DataError

DEFAULT_INSTRUCTION = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
QUESTION_FIELD = "{question}"
_LOCAL_SUFFIXES = (".json", ".jsonl", ".xml", ".parquet", ".csv")


def default_data_dir() -> Path:
    """``$RLCLIP_DATA_DIR``, else ``<repository>/../shared/data``."""
    env = os.environ.get("RLCLIP_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_source(local_file: str, hub_name: str) -> str:
    """The local copy under the data dir when present, else the hub name."""
    path = default_data_dir() / local_file
    return str(path) if path.is_file() else hub_name


def is_local(path_or_name: str) -> bool:
    """True for an existing path; raise DataError for a path-like name that is missing.

    ``org/name`` strings that do not exist locally are treated as hub names.
    """
    if os.path.exists(path_or_name):
        return True
    looks_like_path = path_or_name.startswith(("/", ".", "~")) or path_or_name.lower().endswith(
        _LOCAL_SUFFIXES
    )
    if looks_like_path:
        raise DataError("file not found; pass an existing file", source=path_or_name)
    return False


def resolve_file(path: str, split: str, names: tuple[str, ...]) -> str:
    """``path`` itself, or for a directory the first of ``names`` (formatted with split) inside it."""
    if not os.path.isdir(path):
        return path
    for name in names:
        candidate = os.path.join(path, name.format(split=split))
        if os.path.isfile(candidate):
            return candidate
    wanted = ", ".join(name.format(split=split) for name in names)
    raise DataError(f"directory has none of: {wanted}", source=path)


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-empty line of a UTF-8 JSONL file.

    Raises DataError naming the file and line for an unreadable file, a line
    that is not UTF-8 or not valid JSON, or a value that is not an object.
    """
    with open_data_file(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            line = decode_line(raw, path, line_no)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON ({exc.msg}, column {exc.colno}); each line must be one JSON object",
                                source=path, line=line_no) from None
            if not isinstance(obj, dict):
                raise DataError(f"expected a JSON object, got {type(obj).__name__}; each line must be one JSON "
                                "object such as {\"question\": ...}", source=path, line=line_no)
            yield line_no, obj


def open_data_file(path: str, mode: str = "r") -> IO[Any]:
    """``open(path)`` (UTF-8 in text mode) with OS errors turned into a DataError naming the file."""
    try:
        return open(path, mode) if "b" in mode else open(path, mode, encoding="utf-8")
    except FileNotFoundError:
        raise DataError("file not found; pass an existing file", source=path) from None
    except IsADirectoryError:
        raise DataError("is a directory; pass the data file inside it", source=path) from None
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror}); check its permissions", source=path) from None


def decode_line(raw: bytes, path: str, line_no: int) -> str:
    """One line of a data file as text; DataError naming the file and line when it is not UTF-8."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8", source=path, line=line_no) from None


def read_text(path: str) -> str:
    """A whole UTF-8 data file as text; DataError naming the file (and line) when unreadable or not UTF-8."""
    with open_data_file(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        decode_line(raw.split(b"\n")[line - 1], path, line)  # raises with the column
        raise  # pragma: no cover


def load_hub_rows(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub data set via ``datasets.load_dataset``; failures become DataError."""
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split) if config else load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, unknown split...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load hub data set ({first}); pass a local file instead", source=f"{name}[{split}]"
        ) from None
    return [dict(row) for row in dataset]


def get_field(
    record: dict[str, Any], names: tuple[str, ...], where: dict[str, Any], kinds: tuple[type, ...] = (str,)
) -> Any:
    """The first present field of ``names``; DataError when missing, empty or of the wrong type.

    ``where`` holds the DataError location keywords (source, line or index).
    """
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, kinds):
                wanted = " or ".join(k.__name__ for k in kinds)
                raise DataError(f"expected {wanted}, got {type(value).__name__}", field=name, **where)
            if isinstance(value, str) and not value.strip():
                raise DataError("is empty", field=name, **where)
            return value
    raise DataError("is missing", field=names[0], **where)


def check_instruction(instruction: str | None) -> str:
    """The instruction template to use; it must contain ``{question}``."""
    template = DEFAULT_INSTRUCTION if instruction is None else instruction
    if QUESTION_FIELD not in template:
        raise DataError(f"instruction template must contain {QUESTION_FIELD}: {template!r}")
    return template


def fill_instruction(template: str, question: str) -> str:
    """Put the question into the template (``{{``/``}}`` stand for literal braces)."""
    before, _, after = template.partition(QUESTION_FIELD)
    return _unescape(before) + question + _unescape(after)


def _unescape(text: str) -> str:
    return text.replace("{{", "{").replace("}}", "}")


def make_record(
    suite: str, template: str, question: str, answer: str, solution: str, **metadata: Any
) -> dict[str, Any]:
    """Build one adapter record."""
    return {
        "prompt": [{"role": "user", "content": fill_instruction(template, question)}],
        "answer": answer,
        "suite": suite,
        "question": question,
        "solution": solution,
        **metadata,
    }


def check_limit(limit: int | None) -> int | None:
    """Validate the ``limit`` argument of a loader."""
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    return limit


def format_number(value: float) -> str:
    """``8.0`` -> ``8``, ``2.5`` -> ``2.5`` (gold answers are stored as text)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
