"""Controlled staleness: the update at policy version n trains on a rollout sampled by version n - k.

Asynchronous RL pipelines (verl's one-step-off-policy and fully async modes,
AReaL, PipelineRL, prime-rl) sample rollouts with weights a few updates old
while the trainer updates. ``rollout.staleness: k`` reproduces exactly the data
such a pipeline with lag k produces, deterministically, on one machine:

- a *policy version* counts the rollouts the trainer has consumed (version 0 is
  the initial model; training on one rollout makes the next version);
- the queue holds up to k sampled rollouts that wait for training. Before each
  update the trainer samples one more rollout with its current weights and
  trains on the oldest, so rollout j is sampled by version max(0, j - k) and
  trained at version j: from the k-th update on, every update is exactly k
  versions behind its data (at the start, version 0 fills the queue, as the
  first rollouts of an asynchronous run all come from the initial weights);
- k = 0 samples and trains in turn: the synchronous run, unchanged.

Each rollout carries the version that sampled it (``RolloutBatch.policy_version``);
the trainer logs ``rollout/staleness_mean`` and ``rollout/staleness_max``. The
queue's rollouts are part of a checkpoint, so a resume is bit-identical.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

Sampled = tuple[Any, dict[str, float]]  # a scored RolloutBatch and its sampling metrics


class RolloutQueue:
    """Sampled rollouts waiting ``staleness`` versions before the trainer consumes them.

    Args:
        staleness: the lag k >= 0.
        sample: ``sample(index) -> (rollout, metrics)`` samples and scores rollout number ``index``
            (its prompts are the index-th share of the data order) with the current weights.
    """

    def __init__(self, staleness: int, sample: Callable[[int], Sampled]) -> None:
        self.staleness = staleness
        self.sample = sample
        self.waiting: deque[Sampled] = deque()
        self.sampled = 0  # rollouts sampled so far: the index of the next one

    def pop(self) -> Sampled:
        """Sample with the current weights until k + 1 rollouts exist, then hand out the oldest."""
        while len(self.waiting) <= self.staleness:
            self.waiting.append(self.sample(self.sampled))
            self.sampled += 1
        return self.waiting.popleft()

    def state_dict(self) -> dict[str, Any]:
        """The waiting rollouts (with their metrics) and the sample counter, for a checkpoint."""
        return {"waiting": list(self.waiting), "sampled": self.sampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.waiting = deque(state["waiting"])
        self.sampled = int(state["sampled"])


def staleness_metrics(version: int, sampled_by: int, reduce: Any, device: Any = None) -> dict[str, float]:
    """``rollout/staleness_mean`` and ``_max``: versions between the sampler and the update, over processes.

    ``reduce``: sums and maxima across processes (``rlclip.utils.ProcessReducer``); ``device``: where the
    collective runs (the accelerator's device).
    """
    import torch

    lag = torch.tensor(float(version - sampled_by), dtype=torch.float64, device=device)
    total = reduce.sum(torch.stack([lag, torch.ones((), dtype=torch.float64, device=device)]))
    return {"rollout/staleness_mean": float(total[0] / total[1]), "rollout/staleness_max": float(reduce.max(lag))}
