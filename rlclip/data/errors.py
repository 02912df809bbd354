"""The error raised for unreadable benchmark files and malformed records."""

from __future__ import annotations

from rlclip.errors import RlclipError


class DataError(RlclipError, ValueError):
    """A data file or record is missing or malformed.

    The message names where the problem is (file, line or record index, field),
    e.g. ``test.jsonl, line 12, field 'answer': has no '####' final answer``.
    The parts are kept as attributes for programs. Being an ``RlclipError``, the
    ``rlclip`` CLI prints it as one line without a traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = message
        self.source = source
        self.line = line
        self.index = index
        self.field = field
        where = [part for part in (source,) if part]
        if line is not None:
            where.append(f"line {line}")
        elif index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
