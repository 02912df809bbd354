"""Statistics of a whole optimizer step for objectives that filter or weight tokens by the batch.

Some objectives (Clip-Cov, KL-Cov, the entropy top-quantile and M2PO filters,
...) choose tokens by a statistic of the whole optimizer step: a quantile or a
covariance over every token of every micro-batch on every process. The trainer
computes it once per step from a no-grad pass over the mini-batch (several
micro-batches) or from the single micro-batch's own forward, and hands each
micro-batch its rows (``PolicyBatch.step_stats``), so micro-batching and the
number of processes leave the update unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rlclip.lazy import torch
from rlclip.types import PolicyBatch

if TYPE_CHECKING:
    from torch import Tensor

    from rlclip.types import RolloutBatch


def whole_step_statistics(objective: Any, mini_batch: RolloutBatch, parts: list[dict[str, Tensor]],
                          proximal: Callable[[RolloutBatch, Tensor], Tensor], num_tokens: Tensor,
                          num_sequences: Tensor, reduce: Any) -> dict[str, Tensor]:
    """``objective.step_statistics`` of the mini-batch from its micro-batches' no-grad passes ``parts``.

    ``proximal(batch, logprobs)``: log pi_prox of the batch's tokens (the trainer's rule for the objective's
    ``old_logprobs``); ``reduce``: reductions across processes.
    """
    step_needs = objective.step_needs
    logprobs = torch.cat([p["logprobs"] for p in parts])  # [b, T]
    batch = PolicyBatch(
        logprobs=logprobs, old_logprobs=proximal(mini_batch, logprobs), advantages=mini_batch.advantages,
        mask=mini_batch.completion_mask.to(logprobs.dtype), ref_logprobs=mini_batch.ref_logprobs,
        num_tokens=num_tokens, num_sequences=num_sequences,
        entropy=torch.cat([p["entropy"] for p in parts]) if "entropy" in step_needs else None,
        truncated=mini_batch.truncated)
    return objective.step_statistics(batch, reduce)


def own_step_statistics(objective: Any, batch: PolicyBatch, single: bool, reduce: Any) -> dict[str, Tensor] | None:
    """With one micro-batch per process its own (detached) inputs give the step statistics; else None."""
    if not (single and objective.step_needs):
        return None
    detached = replace(batch, logprobs=batch.logprobs.detach(),
                       entropy=None if batch.entropy is None else batch.entropy.detach())
    return objective.step_statistics(detached, reduce)
