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

With ``rollout.backend: vllm_server`` on one process the next rollout's
generation runs in a background thread while the trainer updates
(:class:`BackgroundRolloutQueue`): the weights are copied to the server in the
trainer's thread, after the previous generation finished and before the next
starts, so the server never runs ahead of the schedule above and the data are
the same as in turn (only the timing differs).

Each rollout carries the version that sampled it (``RolloutBatch.policy_version``);
the trainer logs ``rollout/staleness_mean`` and ``rollout/staleness_max``. The
queue's rollouts are part of a checkpoint, so a resume is bit-identical.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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

    def close(self) -> None:
        """Training ended: nothing runs in the background (the in-turn queue has nothing to stop)."""

    def state_dict(self) -> dict[str, Any]:
        """The waiting rollouts (with their metrics) and the sample counter, for a checkpoint."""
        return {"waiting": list(self.waiting), "sampled": self.sampled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.waiting = deque(state["waiting"])
        self.sampled = int(state["sampled"])


class BackgroundRolloutQueue(RolloutQueue):
    """:class:`RolloutQueue` whose newest rollout is generated in a background thread during the update.

    Args:
        staleness: the lag k >= 0.
        sample: ``sample(index) -> (rollout, metrics)`` in the trainer's thread (used while the queue fills).
        launch: ``launch(index) -> generate`` in the trainer's thread: copies the weights if they moved and
            returns a callable that generates rollout ``index`` (run in the background thread).
        finish: ``finish(rollout) -> (rollout, metrics)`` scores a generated rollout in the trainer's thread.
    """

    def __init__(self, staleness: int, sample: Callable[[int], Sampled], launch: Callable[[int], Callable[[], Any]],
                 finish: Callable[[Any], Sampled]) -> None:
        super().__init__(staleness, sample)
        self.launch, self.finish = launch, finish
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlclip-rollout")
        self.in_flight: Future | None = None

    def _collect(self) -> None:
        if self.in_flight is not None:
            future, self.in_flight = self.in_flight, None
            self.waiting.append(self.finish(future.result()))

    def pop(self) -> Sampled:
        """Collect the generation launched during the last update, launch the next one, hand out the oldest."""
        self._collect()
        while len(self.waiting) < self.staleness:  # at the start version 0 fills the queue in turn
            self.waiting.append(self.sample(self.sampled))
            self.sampled += 1
        self.in_flight = self.worker.submit(self.launch(self.sampled))  # weights copied before it starts
        self.sampled += 1
        if not self.waiting:  # k = 0: nothing to train on until it is done
            self._collect()
        return self.waiting.popleft()

    def close(self) -> None:
        """Training ended: the generation in flight is not waited for (nor trained on); the worker thread goes
        when it returns."""
        if self.in_flight is not None:
            self.in_flight.cancel()
            self.in_flight = None
        self.worker.shutdown(wait=False, cancel_futures=True)

    def state_dict(self) -> dict[str, Any]:
        """The in-flight generation is finished first: a checkpoint holds only scored rollouts."""
        self._collect()
        return super().state_dict()


def staleness_metrics(version: int, sampled_by: int, reduce: Any, device: Any = None) -> dict[str, float]:
    """``rollout/staleness_mean`` and ``_max``: versions between the sampler and the update, over processes.

    ``reduce``: sums and maxima across processes (``rlclip.utils.ProcessReducer``); ``device``: where the
    collective runs (the accelerator's device).
    """
    import torch

    lag = torch.tensor(float(version - sampled_by), dtype=torch.float64, device=device)
    total = reduce.sum(torch.stack([lag, torch.ones((), dtype=torch.float64, device=device)]))
    return {"rollout/staleness_mean": float(total[0] / total[1]), "rollout/staleness_max": float(reduce.max(lag))}
