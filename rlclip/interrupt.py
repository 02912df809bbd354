"""SIGINT / SIGTERM: finish the current optimizer step, save a checkpoint, exit with how to resume.

The handler only records the signal; the trainer polls :meth:`StopRequest.requested`
after each optimizer step (all-reduced, so every process stops at the same
step). A second SIGINT restores Python's default behaviour and interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
from accelerate import Accelerator

from rlclip.utils import all_reduce

EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130}
"""Exit status after a graceful stop: SIGTERM (schedulers, timeouts) is a clean stop; Ctrl-C follows the shell's 130."""


class StopRequest:
    """Context manager that turns SIGINT / SIGTERM into a stop request (main thread only)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts immediately
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, accelerator: Accelerator) -> bool:
        """True on every process once any process received a signal."""
        flag = torch.tensor(float(self.signal_name is not None), device=accelerator.device)
        return bool(all_reduce(accelerator, flag, "max") > 0)
