"""Optimizer-in-backward: each parameter is stepped as soon as its gradient is complete, then the gradient is freed.

An ordinary step holds a gradient for every parameter at the end of the
backward pass (as much memory as the weights). Here each trainable parameter
carries a post-accumulate-grad hook: when autograd has written its finished
gradient, the hook calls the trainer's own optimizer, whose ``step()`` only
touches parameters that have a gradient (torch's AdamW and SGD skip
``grad is None``). Every other parameter's gradient is either already freed
or not yet made, so that one parameter is stepped, with its own AdamW state
and the group's current learning rate, and its gradient is set to None.
The update is the ordinary one, parameter by parameter (tests check the
weights to 1e-6 against a normal step), and the optimizer's state dict,
the LR scheduler and checkpoints are unchanged. The same idea is torchtune's
``optimizer_in_bwd`` and LOMO (Lv et al. 2023, arXiv 2306.09782).

What it cannot do, refused by the config check:

- clip by the global gradient norm (the norm needs every gradient before any
  step); ``train.max_grad_norm`` must be 0 and ``train.grad_clip`` unset;
- accumulate over micro-batches: one backward per optimizer step;
- several processes (DDP averages a gradient after this hook would step it),
  DeepSpeed, FSDP, and the PPO critic.

The non-finite guard: a non-finite loss skips the backward, so nothing
changes. A non-finite gradient under a finite loss is found only when its
parameter's turn comes: from that parameter on nothing is stepped, but the
parameters stepped before it keep their update. The step is then reported
as skipped by the guard and as partial (``optim/partial_steps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rlclip.errors import ConfigError


class OptimizerInBackward:
    """Steps ``optimizer`` one parameter at a time inside the backward pass of :meth:`backward`.

    Args:
        optimizer: the (unwrapped) torch optimizer over ``params``.
        params: the trainable parameters; each gets a post-accumulate-grad hook.
        backward: ``backward(model, loss)``, the launch layout's backward.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 backward: Callable[[torch.nn.Module, torch.Tensor], None]) -> None:
        self.optimizer = optimizer
        self._backward = backward
        self.partial_steps = 0
        self._armed = False
        self._sq_norms: list[torch.Tensor] = []
        self._bad = False
        self._stepped = 0
        for param in params:
            param.register_post_accumulate_grad_hook(self._step)

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """The backward pass, stepping each parameter on the way; a non-finite loss runs none (nothing changes)."""
        if not math.isfinite(float(loss.detach())):
            self._bad = True
            return
        self._armed = True  # a backward anywhere else (the user's, telemetry's) only accumulates
        try:
            self._backward(model, loss)
        finally:
            self._armed = False

    def _step(self, param: torch.nn.Parameter) -> None:
        if not self._armed or param.grad is None:
            return
        with torch.no_grad():
            dtype = torch.promote_types(param.grad.dtype, torch.float32)  # bf16 gradients summed in float32
            sq = torch.linalg.vector_norm(param.grad, dtype=dtype).double().square()  # []
        self._sq_norms.append(sq)
        # one sync per parameter: the decision to step must be made before the step
        if not self._bad and not bool(torch.isfinite(sq)):
            self._bad = True
        if not self._bad:
            self.optimizer.step()
            self._stepped += 1
        param.grad = None

    def finish(self) -> tuple[torch.Tensor, bool]:
        """``(global gradient norm, partial)`` of the backward just run; resets for the next step.

        The norm is NaN when a gradient was not finite; ``partial`` is True when some parameters had
        been stepped before that gradient was found."""
        norm = torch.stack(self._sq_norms).sum().sqrt() if self._sq_norms else torch.zeros(())
        partial = self._bad and self._stepped > 0
        if partial:
            self.partial_steps += 1
        if self._bad:
            norm = torch.full((), math.nan)
        self._sq_norms, self._bad, self._stepped = [], False, 0
        return norm, partial


def build_in_backward(enabled: bool, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                      layout: Any) -> OptimizerInBackward | None:
    """The hooks for ``train.optimizer_in_backward`` (None when off); a launch it cannot serve is an error."""
    if not enabled:
        return None
    if layout.deepspeed or layout.fsdp is not None or layout.accelerator.num_processes > 1:
        raise ConfigError("train.optimizer_in_backward runs in one process without DeepSpeed or FSDP (across "
                          "processes a gradient is averaged only after its hook would have stepped it); launch "
                          "one process, or turn optimizer_in_backward off")
    params = [p for p in model.parameters() if p.requires_grad]
    return OptimizerInBackward(optimizer, params, layout.backward)
