"""``ObjectiveGRPOTrainer``: TRL's ``GRPOTrainer`` with an rlclip objective as its policy loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from rlclip.errors import ConfigError
from rlclip.integrations.trl.config import (
    _check_step_layout,
    _reference_gate,
    check_trl_args,
    check_trl_version,
    resolve_objective,
)
from rlclip.integrations.trl.loss import record_old_support, rlclip_objective_loss
from rlclip.objectives import Objective


class ObjectiveGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is an rlclip objective; everything else is TRL's.

    Args:
        objective: a registered name (``"archer"``), a dict of settings with
            ``name`` (``{"name": "troll", "kl_bound": 0.02}``) or an
            :class:`~rlclip.objectives.Objective` instance. Its aggregation
            follows ``args.loss_type`` (dapo, bnpo, grpo or dr_grpo).
        Other arguments: exactly ``trl.GRPOTrainer``'s.

    Raises :class:`~rlclip.errors.ConfigError` for an unsupported TRL version
    and for options that would bypass the objective (see ``docs/trl.md``).
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: GRPOConfig | None = None, *rest: Any,
                 objective: str | dict[str, Any] | Objective, **kwargs: Any) -> None:
        check_trl_version()
        if args is None:  # TRL's own default, made here so it can be checked first
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        check_trl_args(args)
        self.objective = resolve_objective(objective, args.loss_type, args.max_completion_length)
        _check_step_layout(self.objective, args)
        with _reference_gate(args, "ref" in self.objective.needs):
            super().__init__(model, reward_funcs, args, *rest, **kwargs)
        if "support" in self.objective.needs and self.aux_loss_enabled:
            raise ConfigError("rlclip objective in TRL: support-based objectives (troll) do not compute the MoE "
                              "router aux loss; set router_aux_loss_coef=0")
        self._rlclip_checked = True

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        """TRL's generation and scoring, plus the old policy's sparse support when the objective needs one."""
        output = super()._generate_and_score_completions(inputs)
        record_old_support(self, output, self.objective)
        return output

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        """The objective's loss in place of TRL's surrogate."""
        return rlclip_objective_loss(self, inputs, self.objective, model=model)
