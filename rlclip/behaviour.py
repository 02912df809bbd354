"""The stage between sampling and the update: pi_prox, reference and value estimates, rollout correction.

Three policies meet in an off-policy update (docs/offpolicy.md): mu, the
sampler (``RolloutBatch.sampler_logprobs``: a stale copy of the weights, another
engine, or both); pi_prox, the policy the objective's ratio is taken against
(``old_logprobs``); and pi_theta, the policy being trained. ``rollout.proximal``
says how pi_prox is obtained:

- ``recompute``: a no-grad pass of the trainer at train time (the default; with
  a fresh rollout from the trainer itself this is the PPO/GRPO behaviour policy);
- ``bypass``: pi_prox := mu, no pass (verl's bypass mode): one forward per
  rollout saved, the ratio pi_theta / mu carries the whole off-policy gap;
- ``loglinear``: A-3PO (arXiv 2512.06547; AReaL ``areal/trainer/ppo/actor.py``
  ``compute_prox_logp_approximations``, lines 604-677 at 4aef98d):
  log pi_prox = log mu + alpha * (log pi_theta - log mu), pi_theta detached, with
  alpha = (v_prox - v_mu) / (v_theta - v_mu) from the policy versions. Here the
  rollout is trained at version n = v_prox with lag k = n - v_mu, and pi_theta is
  the version being made (v_theta = n + 1), so alpha = k / (k + 1): no forward
  pass, pi_prox moves from mu (k = 0) towards pi_theta as the data age.

Where the sampler is not the trainer's current policy (a vLLM backend,
staleness > 0, or a proximal other than recompute) the weight pi_prox / mu goes
through the rollout correction (rlclip/is_correction.py) and multiplies each
objective's per-token loss (``PolicyBatch.token_weights``). So ``ratio_clip``
with token IS at staleness k is AReaL's decoupled PPO (arXiv 2505.24298).

TROLL also needs the old policy's sparse support, a KL penalty the reference
model's log-probs and PPO mode the critic's values: this stage computes exactly
what the objective and the config ask for, in micro-batches, and masks
non-finite tokens out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlclip.critic import completion_values
from rlclip.guard import mask_nonfinite
from rlclip.is_correction import rollout_correction
from rlclip.lazy import torch
from rlclip.objectives.base import Reducer
from rlclip.policy import unwrap
from rlclip.types import ObjectiveOutput
from rlclip.utils import MetricAccumulator, ProcessReducer, split_indices

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
        other_sampler: another engine samples (a vLLM backend: ``Generator.corrects``).
    """

    def __init__(self, config: Any, objective: Any, accelerator: Any, logprobs: Callable[..., dict[str, Tensor]],
                 needs_reference: bool, other_sampler: bool = False) -> None:
        self.config, self.objective, self.accelerator = config, objective, accelerator
        self.logprobs, self.needs_reference = logprobs, needs_reference
        rollout = config.rollout
        self.proximal = rollout.proximal
        # the sampler is the trainer's current policy only with its own engine, no lag and a recomputed pi_prox
        self.corrects = other_sampler or rollout.staleness > 0 or rollout.proximal != "recompute"
        self.step_metrics = MetricAccumulator("rollout")  # A-3PO corrects at each update step

    def old_logprobs_needed(self) -> bool:
        """Whether pi_old differs from the current policy at update time, or the reward needs it.

        With one pass of one mini-batch over the trainer's own samples, pi_old is the
        current policy, and the objective gets ``logprobs.detach()`` of the update's own forward.
        """
        cfg = self.config.train
        off_policy = cfg.num_iterations > 1 or cfg.mini_batches > 1 or self.corrects
        return off_policy or self.config.advantage.kl_in_reward > 0

    @torch.no_grad()
    def record(self, rollout: RolloutBatch, model: nn.Module, ref_model: nn.Module | None,
               critic: nn.Module | None) -> dict[str, float]:
        """Fill the rollout's behaviour fields; returns ``behaviour/...`` and ``rollout/...`` metrics."""
        record_support = "support" in self.objective.needs
        keep_old = self.old_logprobs_needed()
        recompute = self.proximal == "recompute"
        behaviour_pass = (keep_old and recompute) or record_support  # TROLL records the old top set even on-policy
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
        # [N, T]; None: the current policy, detached (on-policy), or A-3PO's pi_prox made at update time
        rollout.old_logprobs = torch.cat(old) if keep_old and recompute else \
            rollout.sampler_logprobs.clone() if self.proximal == "bypass" else None
        rollout.old_values = torch.cat(values) if values else None
        rollout.ref_logprobs = torch.cat(ref) if ref else None
        if record_support:
            rollout.old_support = {k: torch.cat([s[k] for s in supports]) for k in supports[0]}
        metrics = mask_nonfinite(rollout, self.accelerator)
        if self.corrects and self.proximal != "loglinear":
            metrics.update(self.correct(rollout, rollout.old_logprobs, ProcessReducer(self.accelerator)))
        return metrics

    def correct(self, batch: Any, prox_logprobs: Tensor, reduce: Any) -> dict[str, float]:
        """pi_prox / mu through the rollout correction: sets ``batch.is_weights`` and drops rejected tokens."""
        r = self.config.rollout
        batch.is_weights, keep, metrics = rollout_correction(
            prox_logprobs, batch.sampler_logprobs, batch.completion_mask, mode=r.is_mode, cap=r.is_cap,
            floor=r.is_floor, batch_normalize=r.is_batch_normalize, rejection=r.rejection, reduce=reduce)  # [N, T]
        if r.rejection:  # applied after the advantages (GAE runs over the original tokens, as verl's)
            batch.rejection_keep = keep  # [N, T]
        return metrics

    def loglinear(self, micro: RolloutBatch, logprobs: Tensor, version: int, correct: bool = True) -> Tensor:
        """A-3PO's pi_prox ``[b, T]`` from the update's own log-probs; with ``correct``, also sets
        ``micro.is_weights`` (pi_prox / mu) and counts the step's correction statistics (the update's forward
        does; the no-grad pass for whole-step statistics does not, so nothing is counted twice).

        ``version``: the policy version being trained (the rollouts consumed so far).
        """
        lag = version - micro.policy_version
        alpha = lag / (lag + 1)
        current = logprobs.detach()  # [b, T]
        sampler = torch.where(torch.isnan(micro.sampler_logprobs), current, micro.sampler_logprobs)  # NaN: no mu
        prox = sampler + alpha * (current - sampler)  # [b, T]
        if not correct:
            return prox
        metrics = self.correct(micro, prox, Reducer())  # rows are whole responses: token and sequence modes are row-local
        self.step_metrics.add(ObjectiveOutput(loss=prox.new_zeros(()), metrics={
            k.removeprefix("rollout/"): v for k, v in metrics.items()}), float(micro.completion_mask.sum()))
        return prox

    def end_step(self) -> dict[str, float]:
        """A-3PO's correction statistics of the optimizer step (token-weighted over micro-batches and processes)."""
        if self.proximal != "loglinear":
            return {}
        metrics, self.step_metrics = self.step_metrics.reduce(self.accelerator), MetricAccumulator("rollout")
        metrics.pop("loss")
        return metrics

    def reference_logprobs(self, micro: RolloutBatch, model: nn.Module, ref_model: nn.Module | None) -> Tensor:
        """log pi_ref of ``micro``'s tokens: the frozen reference, or with LoRA the base model (adapters off)."""
        if ref_model is not None:
            return self.logprobs(ref_model, micro)["logprobs"]
        with unwrap(model).disable_adapter():
            return self.logprobs(model, micro)["logprobs"]
