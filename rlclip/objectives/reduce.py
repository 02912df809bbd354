"""Reductions across the processes of one optimizer step (the single-process identity)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class Reducer:
    """Reductions across the processes of one optimizer step; this one is the identity (one process).

    The trainer passes a distributed subclass to :meth:`Objective.step_statistics`.
    """

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over processes."""
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        """Element-wise maximum over processes."""
        return tensor

    def min(self, tensor: Tensor) -> Tensor:
        """Element-wise minimum over processes."""
        return tensor

    def cat(self, tensor: Tensor) -> Tensor:
        """1-D tensors of any length from every process, concatenated in rank order."""
        return tensor
