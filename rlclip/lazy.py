"""A module imported on first attribute access, so that commands which never compute
(``rlclip objectives``, config errors, ``rlclip eval --gold``) answer without importing torch.

Here importing torch costs tens of seconds of disk reads (DESIGN.md, measured facts); the
objectives and batch types only need it once they compute, and by then it is loaded.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for ``importlib.import_module(name)`` until an attribute is read."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (loaded)' if self._module is not None else ''}>"


torch: Any = LazyModule("torch")
"""``torch``, loaded on first use."""
