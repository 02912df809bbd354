"""The non-finite guard: one bad batch never reaches the weights.

After the backward pass of an optimizer step, the trainer asks the guard
whether to take the step. When the loss or the global gradient norm is
non-finite on any process (the decision is all-reduced, so every process
agrees), the step is skipped: the gradients are zeroed and the optimizer,
scheduler and gradient clipper are left untouched. After
``max_consecutive_skips`` skipped steps in a row the run stops with a
one-line error; the last checkpoint on disk is left as it was.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator

from rlclip.errors import TrainingError
from rlclip.utils import all_reduce


class NonFiniteGuard:
    """Skips optimizer steps with a non-finite loss or gradient norm, and stops after too many in a row.

    Args:
        accelerator: for the all-reduced decision.
        max_consecutive_skips: stop after this many skipped steps in a row (0: never stop).
    """

    def __init__(self, accelerator: Accelerator, max_consecutive_skips: int = 3) -> None:
        self.accelerator = accelerator
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0

    def take_step(self, step: int, *values: float | torch.Tensor) -> bool:
        """True when every value is finite on every process; otherwise count a skip (maybe stop)."""
        local_bad = any(not math.isfinite(float(v)) for v in values)
        flag = torch.tensor(float(local_bad), device=self.accelerator.device)
        if not bool(all_reduce(self.accelerator, flag, "max") > 0):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.max_consecutive_skips and self.consecutive >= self.max_consecutive_skips:
            first = step - self.consecutive + 1
            raise TrainingError(
                f"{self.consecutive} consecutive optimizer steps (steps {first}-{step}) had a non-finite loss or "
                "gradient norm and were skipped, so training stopped with the weights untouched by them (the last "
                "checkpoint is intact); check the reward functions and the objective for NaN/inf, lower "
                "train.learning_rate, or raise train.max_consecutive_skips")
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def mask_nonfinite(rollout: Any, accelerator: Accelerator) -> dict[str, float]:
    """Tokens whose behaviour, reference or value estimates are not finite do not count; they are counted."""
    mask = rollout.completion_mask.bool()  # [N, T]
    bad = torch.zeros_like(mask)
    for values in (rollout.old_logprobs, rollout.ref_logprobs, rollout.old_values):
        if values is not None:
            bad |= ~torch.isfinite(values) & mask
    count = all_reduce(accelerator, bad.sum().double(), "sum").item()
    if count:
        rollout.completion_mask = rollout.completion_mask.masked_fill(bad, 0)
        for name in ("old_logprobs", "ref_logprobs", "old_values"):
            values = getattr(rollout, name)
            if values is not None:  # finite placeholders: masked tokens must not turn sums into NaN
                setattr(rollout, name, values.masked_fill(bad, 0.0))
    return {"behaviour/nonfinite_tokens": count}
