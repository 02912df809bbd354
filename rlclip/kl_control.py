"""State an objective carries from one optimizer step to the next, and the adaptive KL controller.

Most objectives are stateless: their settings never change and their
surrogate is a pure function of the batch. A few move a setting between
optimizer steps from what the step measured:

- ``objective.kl_target`` (every objective): the adaptive KL controller of
  Ziegler et al. 2019 (arXiv 1909.08593, section 2.2), as verl's
  ``AdaptiveKLController`` (volcengine/verl b178a3cd56f58b2d502255daba591e92833930a7,
  verl/trainer/ppo/core_algos.py lines 152-173). After step k, with KL_k the
  step's mean KL to the reference and n_k its number of sequences,

      e_k = clip(KL_k / target - 1, -0.2, 0.2)
      beta_{k+1} = beta_k * (1 + e_k * n_k / horizon)

  and step k + 1 applies beta_{k+1} as ``kl_coef``. verl calls ``update`` with
  ``n_steps`` = the batch's sequence count (verl/trainer/ppo/ray_trainer.py
  line 104) once per rollout; here it runs once per optimizer step with that
  step's sequence count over all processes.
- ``bapo``: the clip bounds its search chose at the last step.

The interface (:class:`ObjectiveState`, a base of :class:`rlclip.objectives.Objective`):
``state_dict()`` / ``load_state_dict()`` (empty for stateless objectives; the
trainer saves it in ``trainer_state.json`` and restores it on resume) and
``end_step(metrics, num_sequences)``, which the trainer calls once per optimizer
step, after every micro-batch's forward and before the weights move, with the
step's objective metrics already reduced over micro-batches and processes
(unprefixed: ``kl_ref``, not ``objective/kl_ref``). The surrogate stays pure: it
reads the state as ordinary attributes (``self.kl_coef``) at call time.
"""

from __future__ import annotations

import math
from typing import Any

from rlclip.errors import ConfigError

ERROR_CLIP = 0.2
"""verl's and Ziegler et al.'s bound on the proportional error."""

PREFIX = "objective/"


class AdaptiveKLController:
    """The coefficient update rule (stateless: the coefficient itself lives on the objective as ``kl_coef``).

    Args:
        target: the KL to the reference the coefficient steers toward (> 0).
        horizon: how many sequences a full proportional step takes (> 0); verl's default is 10000.
    """

    def __init__(self, target: float, horizon: float) -> None:
        if not target > 0:
            raise ConfigError(f"kl_target must be > 0 (or null to keep kl_coef fixed), got {target}")
        if not horizon > 0:
            raise ConfigError(f"kl_horizon must be > 0 (verl's default is 10000), got {horizon}")
        self.target, self.horizon = float(target), float(horizon)

    def __repr__(self) -> str:
        return f"AdaptiveKLController(target={self.target!r}, horizon={self.horizon!r})"

    def update(self, coef: float, current_kl: float, n_steps: float) -> float:
        """beta * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon)."""
        error = min(max(current_kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
        return coef * (1.0 + error * n_steps / self.horizon)


def build_kl_control(kl_target: float | None, kl_horizon: float, kl_coef: float) -> AdaptiveKLController | None:
    """The controller for ``objective.kl_target`` (None when off); it starts from ``kl_coef``, which must be > 0."""
    if kl_target is None:
        return None
    if not kl_coef > 0:
        raise ConfigError(f"kl_target={kl_target} needs kl_coef > 0 as the starting coefficient, got "
                          f"kl_coef={kl_coef}; set objective.kl_coef (e.g. 0.001, verl's default)")
    return AdaptiveKLController(kl_target, kl_horizon)


class ObjectiveState:
    """State kept across optimizer steps: this base class holds the adaptive KL coefficient (when on).

    Subclasses with their own state extend :meth:`state_dict`, :meth:`load_state_dict` and
    :meth:`end_step` (calling ``super()``).
    """

    kl_control: AdaptiveKLController | None = None
    kl_coef: float

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (plain floats; empty for a stateless objective)."""
        return {} if self.kl_control is None else {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (missing keys keep the constructor's)."""
        if self.kl_control is not None and "kl_coef" in state:
            self.kl_coef = float(state["kl_coef"])

    def end_step(self, metrics: dict[str, float], num_sequences: float) -> None:
        """Close one optimizer step: ``metrics`` are its reduced objective metrics, ``num_sequences`` its
        sequence count over all processes. Moves ``kl_coef`` toward ``kl_target``."""
        if self.kl_control is not None and math.isfinite(metrics.get("kl_ref", math.nan)):  # a NaN step moves nothing
            self.kl_coef = self.kl_control.update(self.kl_coef, metrics["kl_ref"], num_sequences)


def end_objective_step(objective: Any, result: dict[str, Any], num_sequences: Any) -> None:
    """The trainer's hook: hand ``objective.end_step`` the step's ``objective/...`` metrics, unprefixed."""
    end_step = getattr(objective, "end_step", None)
    if end_step is None:  # a duck-typed objective without state
        return
    own = {key[len(PREFIX):]: float(value) for key, value in result.items() if key.startswith(PREFIX)}
    end_step(own, float(num_sequences))
