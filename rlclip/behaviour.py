"""The no-grad passes between generation and the update: behaviour, reference and value estimates.

After a rollout is scored, each objective's ratio needs the log-probs of the
policy it is taken against (pi_old, recorded once per rollout), TROLL needs the
old policy's sparse support, a KL penalty needs the reference model's log-probs
and PPO mode needs the critic's values. This stage computes exactly what the
objective and the config ask for, in micro-batches, then masks non-finite
tokens out and, where another engine sampled (vLLM), computes the
importance weights pi_old / mu (rlclip/is_correction.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlclip.critic import completion_values
from rlclip.guard import mask_nonfinite
from rlclip.is_correction import importance_weights
from rlclip.lazy import torch
from rlclip.policy import unwrap
from rlclip.utils import ProcessReducer, split_indices

if TYPE_CHECKING:
    from torch import Tensor, nn

    from rlclip.types import RolloutBatch


class BehaviourPass:
    """Records ``old_logprobs``, ``old_support``, ``ref_logprobs``, ``old_values`` and ``is_weights`` on a rollout.

    Args:
        config: the run's ``TrainConfig``.
        objective: the objective (its ``needs`` decide the support and reference passes).
        accelerator: for the statistics over all processes.
        logprobs: ``(model, micro, record_support=...) -> {"logprobs": [b, T], "old_support": ...}``,
            the trainer's one route to ``rlclip.policy``.
        needs_reference: whether reference log-probs are needed (a KL term or KL in the reward).
    """

    def __init__(self, config: Any, objective: Any, accelerator: Any, logprobs: Callable[..., dict[str, Tensor]],
                 needs_reference: bool) -> None:
        self.config, self.objective, self.accelerator = config, objective, accelerator
        self.logprobs, self.needs_reference = logprobs, needs_reference

    def old_logprobs_needed(self, rollout: RolloutBatch) -> bool:
        """Whether pi_old differs from the current policy at update time, or the reward needs it.

        With one pass of one mini-batch over the trainer's own samples, pi_old is the
        current policy, and the objective gets ``logprobs.detach()`` of the update's own forward.
        """
        cfg = self.config.train
        off_policy = cfg.num_iterations > 1 or cfg.mini_batches > 1 or rollout.sampler_logprobs is not None
        return off_policy or self.config.advantage.kl_in_reward > 0

    @torch.no_grad()
    def record(self, rollout: RolloutBatch, model: nn.Module, ref_model: nn.Module | None,
               critic: nn.Module | None) -> dict[str, float]:
        """Fill the rollout's behaviour fields; returns ``behaviour/...`` and ``rollout/...`` metrics."""
        record_support = "support" in self.objective.needs
        keep_old = self.old_logprobs_needed(rollout)
        behaviour_pass = keep_old or record_support  # TROLL records the old top set even on-policy
        old, supports, ref, values = [], [], [], []
        for idx in split_indices(len(rollout), self.config.train.micro_batch_size):
            micro = rollout.select(idx)
            if behaviour_pass:
                stats = self.logprobs(model, micro, record_support=record_support)
                old.append(stats["logprobs"])  # [b, T]
                supports.append(stats.get("old_support"))
            if self.needs_reference:
                ref.append(self.reference_logprobs(micro, model, ref_model))  # [b, T]
            if critic is not None:
                values.append(completion_values(critic, micro.prompt_ids, micro.prompt_mask,
                                                micro.completion_ids, micro.completion_mask))  # [b, T]
        rollout.old_logprobs = torch.cat(old) if keep_old else None  # [N, T]; None: the current policy, detached
        rollout.old_values = torch.cat(values) if values else None
        rollout.ref_logprobs = torch.cat(ref) if ref else None
        if record_support:
            rollout.old_support = {k: torch.cat([s[k] for s in supports]) for k in supports[0]}
        metrics = mask_nonfinite(rollout, self.accelerator)
        if rollout.sampler_logprobs is not None:
            rollout.is_weights, is_metrics = importance_weights(
                rollout.old_logprobs, rollout.sampler_logprobs, rollout.completion_mask, self.config.rollout.is_mode,
                self.config.rollout.is_cap, reduce=ProcessReducer(self.accelerator))  # [N, T]
            metrics.update(is_metrics)
        return metrics

    def reference_logprobs(self, micro: RolloutBatch, model: nn.Module, ref_model: nn.Module | None) -> Tensor:
        """log pi_ref of ``micro``'s tokens: the frozen reference, or with LoRA the base model (adapters off)."""
        if ref_model is not None:
            return self.logprobs(ref_model, micro)["logprobs"]
        with unwrap(model).disable_adapter():
            return self.logprobs(model, micro)["logprobs"]
