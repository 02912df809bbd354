"""The optimizer step's last stage: non-finite guard -> gradient clipper -> optimizer and scheduler steps.

After the backward passes of an optimizer step the trainer calls
:meth:`GradientStep.apply` once. It takes one of three routes, by who holds
the gradients:

- **DeepSpeed**: the engine clips and steps, and skips a non-finite step
  itself; the guard only counts it.
- **Optimizer-in-backward** (``train.optimizer_in_backward``): the
  parameters were already stepped inside the backward; what is left is the
  guard's count, the scheduler and the metrics.
- **Ordinary**: measure the global norms (policy and critic), ask the guard,
  then clip and step both optimizers, or change nothing when the guard says
  no. The gradients are zeroed either way.

The scheduler and ``on_policy_change`` (a vLLM engine's weight sync) run
only when the policy's weights moved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlclip.grad_clip import GradClipper
from rlclip.guard import NonFiniteGuard
from rlclip.optim_in_backward import OptimizerInBackward


@dataclass
class GradientStep:
    """The objects one optimizer step's update touches (all owned by the trainer)."""

    layout: Any
    """The launch layout (rlclip/parallel.py): DeepSpeed steps through it."""
    guard: NonFiniteGuard
    """Skips a step with a non-finite loss or gradient norm, and stops after too many."""
    clipper: GradClipper
    """The policy's gradient clipper (``train.grad_clip``)."""
    optimizer: torch.optim.Optimizer
    """The policy's optimizer."""
    scheduler: Any
    """The policy's LR scheduler, stepped once per applied optimizer step."""
    on_policy_change: Callable[[], None]
    """Called when the policy's weights moved (the generation backend's weight sync)."""
    in_backward: OptimizerInBackward | None = None
    """The hooks that stepped the policy inside the backward, when ``train.optimizer_in_backward``."""
    critic_clipper: GradClipper | None = None
    """The PPO critic's norm clipper (``critic.max_grad_norm``)."""
    critic_optimizer: torch.optim.Optimizer | None = None
    """The PPO critic's optimizer."""

    def apply(self, step: int, model: torch.nn.Module, critic: torch.nn.Module | None, train_policy: bool,
              policy_loss: float, critic_loss: float) -> dict[str, float]:
        """Guard, clip and step after optimizer step ``step``'s backward passes; returns the ``optim/``,
        ``grad/`` and ``critic/grad_norm`` metrics. A non-finite step changes nothing."""
        if self.layout.deepspeed:
            applied, norm = self.layout.step(model)
            self.guard.take_step(step, policy_loss, norm)
            if applied:
                self._policy_moved()
            return {"optim/skipped_steps": float(self.guard.skipped), "optim/grad_norm": norm, "grad/norm_pre": norm}
        if self.in_backward is not None:
            norm, partial = self.in_backward.finish()
            if self.guard.take_step(step, policy_loss, norm) or partial:
                self._policy_moved()
            return {"optim/skipped_steps": float(self.guard.skipped), "optim/grad_norm": float(norm),
                    "grad/norm_pre": float(norm), "optim/partial_steps": float(self.in_backward.partial_steps)}
        return self._ordinary(step, model, critic, train_policy, policy_loss, critic_loss)

    def _ordinary(self, step: int, model: torch.nn.Module, critic: torch.nn.Module | None, train_policy: bool,
                  policy_loss: float, critic_loss: float) -> dict[str, float]:
        policy_params = [p for p in model.parameters() if p.requires_grad] if train_policy else []
        norm = self.clipper.measure(policy_params) if train_policy else torch.zeros(())
        critic_params = [p for p in critic.parameters() if p.requires_grad] if critic is not None else []
        critic_norm = self.critic_clipper.measure(critic_params) if critic is not None else torch.zeros(())
        take = self.guard.take_step(step, policy_loss, critic_loss, norm, critic_norm)
        result = {"optim/skipped_steps": float(self.guard.skipped)}
        if train_policy and take:
            result.update(self.clipper.apply(policy_params, norm))
            result["optim/grad_norm"] = result["grad/norm_pre"]
            self.optimizer.step()
            self._policy_moved()
        elif train_policy:
            result.update({"optim/grad_norm": float(norm), "grad/norm_pre": float(norm)})
        if critic is not None:
            result["critic/grad_norm"] = float(critic_norm)
            if take:
                self.critic_clipper.apply(critic_params, critic_norm)
                self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def _policy_moved(self) -> None:
        self.scheduler.step()
        self.on_policy_change()
