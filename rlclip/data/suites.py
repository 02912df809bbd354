"""The benchmark suites known to ``rlclip eval``: loader, default local file, hub name.

``SUITES[name]`` is a :class:`Suite`; ``load_suite(name, data_file, ...)`` loads its
records from ``data_file`` when given, else from the local copy under the data dir
(``$RLCLIP_DATA_DIR`` or ``<repo>/../shared/data``) when present, else from the hub.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlclip.data import asdiv, gsm8k, math500, svamp
from rlclip.data._common import DEFAULT_INSTRUCTION, default_data_dir
from rlclip.data.errors import DataError

Loader = Callable[..., list[dict[str, Any]]]


@dataclass(frozen=True)
class Suite:
    """One benchmark: how to load it and which record fields to break results down by."""

    name: str
    loader: Loader
    local_file: str
    hub_name: str
    split: str = "test"
    breakdown: tuple[str, ...] = field(default_factory=tuple)
    instruction: str = DEFAULT_INSTRUCTION

    def default_local_path(self) -> str | None:
        """The local copy under the data dir, or None when absent."""
        path = default_data_dir() / self.local_file.format(split=self.split)
        return str(path) if path.is_file() else None

    def default_source(self) -> str:
        """Where records come from when no data file is given."""
        return self.default_local_path() or self.hub_name


SUITES: dict[str, Suite] = {
    "gsm8k": Suite("gsm8k", gsm8k.load, gsm8k.LOCAL_FILE, gsm8k.HUB_NAME),
    "math500": Suite(
        "math500", math500.load, math500.LOCAL_FILE, math500.HUB_NAME, breakdown=("subject", "level")
    ),
    "svamp": Suite("svamp", svamp.load, svamp.LOCAL_FILE, svamp.HUB_NAME, breakdown=("type",)),
    "asdiv": Suite("asdiv", asdiv.load, asdiv.LOCAL_FILE, asdiv.HUB_NAME, breakdown=("solution_type", "grade")),
    "math": Suite(
        "math", math500.load_math, math500.MATH_LOCAL_FILE, math500.MATH_HUB_NAME, breakdown=("subject", "level")
    ),
}


def get_suite(name: str) -> Suite:
    """The suite called ``name``; DataError listing the choices otherwise."""
    try:
        return SUITES[name]
    except KeyError:
        raise DataError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}") from None


def load_suite(
    name: str,
    data_file: str | None = None,
    split: str | None = None,
    instruction: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records of suite ``name`` (see the module docstring for where they come from)."""
    suite = get_suite(name)
    source = data_file or suite.default_source()
    return suite.loader(source, split=split or suite.split, instruction=instruction, limit=limit)
