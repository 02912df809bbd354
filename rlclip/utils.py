"""Small helpers for the trainer: index splitting, reductions across processes, metric reduction."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor

from rlclip.objectives.base import Reducer
from rlclip.types import ObjectiveOutput


def split_indices(n: int, size: int) -> list[Tensor]:
    """``[0, n)`` in consecutive chunks of at most ``size``."""
    return list(torch.arange(n).split(size))


def rows_of(stats: dict[str, Tensor], index: Tensor, num_rows: int) -> dict[str, Tensor]:
    """Step statistics for the rows ``index`` of a ``num_rows`` mini-batch: per-row tensors sliced, others whole."""
    return {k: v[index.to(v.device)] if v.dim() > 0 and v.shape[0] == num_rows else v for k, v in stats.items()}


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def all_reduce(accelerator: Accelerator, tensor: Tensor, op: str) -> Tensor:
    """Sum, mean, min or max of ``tensor`` over processes (identity on one process)."""
    tensor = tensor.clone()
    if accelerator.num_processes > 1:
        dist.all_reduce(tensor, op=_OPS["sum" if op == "mean" else op])
        if op == "mean":
            tensor = tensor / accelerator.num_processes
    return tensor


class ProcessReducer(Reducer):
    """:class:`Reducer` over the processes of ``accelerator`` (for ``Objective.step_statistics``)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def sum(self, tensor: Tensor) -> Tensor:
        return all_reduce(self.accelerator, tensor, "sum")

    def max(self, tensor: Tensor) -> Tensor:
        return all_reduce(self.accelerator, tensor, "max")

    def min(self, tensor: Tensor) -> Tensor:
        return all_reduce(self.accelerator, tensor, "min")

    def cat(self, tensor: Tensor) -> Tensor:
        world = self.accelerator.num_processes
        if world == 1:
            return tensor
        size = torch.tensor([tensor.numel()], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        padded = tensor.new_zeros(longest)
        padded[:tensor.numel()] = tensor.reshape(-1)
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:int(n.item())] for part, n in zip(parts, sizes)])


def global_moments(accelerator: Accelerator, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of the counted ``values`` over all processes."""
    mask = mask.to(torch.float64)
    v = values.detach().to(torch.float64)
    sums = torch.stack([mask.sum(), (v * mask).sum(), (v.square() * mask).sum()])
    count, total, total_sq = all_reduce(accelerator, sums, "sum")
    count = count.clamp_min(1)
    mean = total / count
    return mean, (total_sq / count - mean.square()).clamp_min(0)


class MetricAccumulator:
    """Token-weighted means of metrics over micro-batches and processes, under ``prefix/``.

    Keys ending in ``_min`` / ``_max`` are reduced with min / max instead.
    The loss is summed: each micro-batch loss is already a share of the global
    mean; it is reported as ``loss_key``.
    """

    def __init__(self, prefix: str = "objective", loss_key: str = "loss") -> None:
        self.prefix, self.loss_key = prefix, loss_key
        self.loss = 0.0
        self.weight = 0.0
        self.sums: dict[str, float] = {}
        self.extremes: dict[str, float] = {}

    def add(self, out: ObjectiveOutput, weight: float) -> None:
        """Add one micro-batch's output, its metrics weighted by its token count."""
        self.loss += float(out.loss.detach())
        self.weight += weight
        for key, value in out.metrics.items():
            value = float(value.detach()) if isinstance(value, Tensor) else float(value)
            if key.endswith("_min"):
                self.extremes[key] = min(self.extremes.get(key, value), value)
            elif key.endswith("_max"):
                self.extremes[key] = max(self.extremes.get(key, value), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value * weight

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        device = accelerator.device
        keys = sorted(self.sums)
        sums = torch.tensor([self.loss, self.weight] + [self.sums[k] for k in keys], dtype=torch.float64,
                            device=device)
        sums = all_reduce(accelerator, sums, "sum")
        weight = max(float(sums[1]), 1.0)
        out = {self.loss_key: float(sums[0])}
        out.update({f"{self.prefix}/{k}": float(v) / weight for k, v in zip(keys, sums[2:])})
        for key in sorted(self.extremes):
            op = "min" if key.endswith("_min") else "max"
            value = all_reduce(accelerator, torch.tensor(self.extremes[key], dtype=torch.float64, device=device), op)
            out[f"{self.prefix}/{key}"] = float(value)
        return out
