"""The TRL adapter's loss hook: what runs inside ``GRPOTrainer._compute_loss`` for an rlclip objective.

Per micro-batch: the current policy's log-probs (TRL's forward, or
``rlclip.policy`` on the old sparse support recorded at generation for
TROLL), TRL's denominators under its ``loss_type``, the
:class:`~rlclip.types.PolicyBatch`, step statistics over the accumulation
window (across processes), the objective's loss, and its metrics logged
into TRL's.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlclip.errors import ConfigError
from rlclip.integrations.trl.config import check_trl_args, check_trl_version, resolve_objective
from rlclip.objectives import Objective
from rlclip.policy import completion_logprobs
from rlclip.types import PolicyBatch

SUPPORT_PREFIX = "rlclip_old_support_"
"""Keys under which the old policy's sparse support rides in TRL's buffered inputs."""
_SUPPORT_KEYS = ("indices", "logprobs", "mask", "token_logprobs")
_TRL_FORWARD_SKIP = {"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                     "compute_entropy", "compute_aux_loss"}


# ---------------------------------------------------------------- old sparse support (TROLL)


def _completion_logprobs(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], **kwargs: Any) -> dict:
    """``rlclip.policy.completion_logprobs`` on TRL's batch layout, at TRL's sampling temperature."""
    if inputs.get("pixel_values") is not None:
        raise ConfigError("rlclip objective in TRL: support-based objectives (troll) support text-only models")
    return completion_logprobs(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                               inputs["completion_mask"], temperature=trainer.temperature, **kwargs)


def record_old_support(trainer: Any, output: dict[str, Any], objective: Objective) -> None:
    """Add the old policy's sparse top sets to TRL's generation output (no-op unless the objective needs them).

    Call it on the dict returned by ``_generate_and_score_completions``: a
    no-grad pass in micro-batches records, per completion token, the old top
    set ``[B, T, top_k]`` and the sampled token's old log-prob under keys
    ``rlclip_old_support_*``; TRL's shuffling and splitting carry them along.
    """
    if "support" not in objective.needs:
        return
    spec = getattr(objective, "support_spec", None)
    if spec is None:
        raise ConfigError(f"objective {objective.name!r} needs a support but has no support_spec")
    size = (trainer.args.per_device_train_batch_size if trainer.model.training
            else trainer.args.per_device_eval_batch_size)
    rows = output["completion_ids"].shape[0]
    parts = []
    with torch.no_grad():
        for start in range(0, rows, size):
            micro = {k: output[k][start:start + size] for k in
                     ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
            micro["pixel_values"] = output.get("pixel_values")
            parts.append(_completion_logprobs(trainer, trainer.model, micro, record_support=spec)["old_support"])
    for key in _SUPPORT_KEYS:
        output[SUPPORT_PREFIX + key] = torch.cat([p[key] for p in parts])  # [B, T, top_k] or [B, T]


def _old_support(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any],
                 objective: Objective) -> dict[str, Tensor]:
    """The recorded old support; recorded now only when TRL treats the batch as on-policy."""
    if all(SUPPORT_PREFIX + k in inputs for k in _SUPPORT_KEYS):
        return {k: inputs[SUPPORT_PREFIX + k] for k in _SUPPORT_KEYS}
    if inputs.get("old_per_token_logps") is not None:
        raise ConfigError(f"objective {objective.name!r} needs the old policy's support recorded at generation: "
                          "call rlclip.integrations.trl.record_old_support(self, output, objective) at the end "
                          "of your _generate_and_score_completions, or use ObjectiveGRPOTrainer")
    with torch.no_grad():  # on-policy: the current policy is the old one
        return _completion_logprobs(trainer, model, inputs, record_support=objective.support_spec)["old_support"]


# ---------------------------------------------------------------- the loss


def _trl_forward_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs of TRL's forward helper found in the batch (multimodal fields: pixel_values, ...)."""
    params = inspect.signature(trainer._get_per_token_logps_and_entropies).parameters
    return {k: inputs[k] for k in params if k not in _TRL_FORWARD_SKIP and inputs.get(k) is not None}


def _current_policy(trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], objective: Objective,
                    need_entropy: bool) -> dict[str, Any]:
    """Log-probs of the current policy (grad follows the caller), entropy, support or MoE aux loss."""
    if "support" in objective.needs:
        old = _old_support(trainer, model, inputs, objective)
        out = _completion_logprobs(trainer, model, inputs, need_entropy=need_entropy,
                                   support=objective.support_spec, old_support=old)
        out["old_logprobs"] = old["token_logprobs"]  # [B, T], same forward path as the update
        return out
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)  # [B, P+T]
    # TRL's fused LM head yields the entropy with the log-probs, so it is always taken (TRL logs it too).
    logprobs, entropy, aux_loss = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled, **_trl_forward_inputs(trainer, inputs))
    return {"logprobs": logprobs, "entropy": None if entropy is None else entropy.detach(), "aux_loss": aux_loss}


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    mask = inputs["completion_mask"]  # [B, T]
    return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]


def _accumulation(trainer: Any, training: bool) -> int:
    return trainer.current_gradient_accumulation_steps if training else 1


def _denominators(trainer: Any, inputs: dict[str, Any], mask: Tensor, training: bool) -> tuple[Any, Any]:
    """Global (all processes, whole accumulation window) token and sequence counts under TRL's loss_type.

    The loss is multiplied by the number of processes afterwards (DDP
    averages gradients), which reproduces TRL's per-process normalisers.
    """
    accum, world = _accumulation(trainer, training), trainer.accelerator.num_processes
    rows = mask.shape[0]
    if trainer.loss_type == "dapo":  # TRL's num_items_in_batch spans the generation batch
        tokens = inputs["num_items_in_batch"].clamp(min=1.0)
        if training:
            tokens = tokens * accum / trainer.args.steps_per_generation
        return tokens, None
    if trainer.loss_type == "bnpo":
        return mask.sum().clamp(min=1.0) * accum * world, None
    return None, rows * accum * world  # grpo, dr_grpo: mean over the micro-batch's rows


def _make_batch(**fields: Any) -> PolicyBatch:
    """A PolicyBatch from the fields this rlclip version has."""
    names = {f.name for f in dataclasses.fields(PolicyBatch)}
    return PolicyBatch(**{k: v for k, v in fields.items() if k in names})


def _truncated(trainer: Any, inputs: dict[str, Any]) -> Tensor:
    """``[B]`` True where no counted token is an EOS (the completion hit the length limit)."""
    ids = inputs["completion_ids"]  # [B, T]
    eos = torch.tensor(list(trainer.eos_token_ids), device=ids.device)
    return ~(torch.isin(ids, eos) & inputs["completion_mask"].bool()).any(-1)  # [B]


def _policy_batch(trainer: Any, inputs: dict[str, Any], stats: dict[str, Any], objective: Objective,
                  num_tokens: Any, num_sequences: Any) -> PolicyBatch:
    """The objective's view of one micro-batch (contract 1)."""
    logprobs = stats["logprobs"]  # [B, T]
    mask = _loss_mask(inputs).to(logprobs.dtype)  # [B, T]
    old = stats.get("old_logprobs", inputs.get("old_per_token_logps"))
    advantages = inputs["advantages"]
    advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logprobs)  # [B, T]
    ref = inputs.get("ref_per_token_logps")
    if "ref" in objective.needs and ref is None:
        raise ConfigError(f"objective {objective.name!r} needs reference log-probs: use ObjectiveGRPOTrainer, "
                          "or set beta != 0 so TRL computes them (your _compute_loss replaces TRL's KL)")
    need_entropy = "entropy" in objective.needs or "entropy" in getattr(objective, "step_needs", ())
    return _make_batch(
        logprobs=logprobs, old_logprobs=logprobs.detach() if old is None else old, advantages=advantages,
        mask=mask, ref_logprobs=ref, entropy=stats.get("entropy") if need_entropy else None,
        support_logprobs=stats.get("support_logprobs"), old_support_logprobs=stats.get("old_support_logprobs"),
        support_mask=stats.get("support_mask"), num_tokens=num_tokens, num_sequences=num_sequences,
        truncated=_truncated(trainer, inputs))


def _resolved(trainer: Any, objective: Any) -> Objective:
    """Check the trainer once, and build (and cache) the objective under its loss_type."""
    if not getattr(trainer, "_rlclip_checked", False):
        check_trl_version()
        check_trl_args(trainer.args, allow_beta=True)
        trainer._rlclip_checked = True
    if isinstance(objective, Objective) and getattr(trainer, "objective", None) is objective:
        return objective
    key = repr(sorted(objective.items())) if isinstance(objective, dict) else id(objective)
    cache = trainer.__dict__.setdefault("_rlclip_objectives", {})
    if key not in cache:
        cache[key] = (objective, resolve_objective(objective, trainer.loss_type, trainer.max_completion_length))
    return cache[key][1]


def rlclip_objective_loss(trainer: Any, inputs: dict[str, Any], objective: str | dict[str, Any] | Objective,
                          model: torch.nn.Module | None = None) -> Tensor:
    """The loss of ``objective`` on one TRL micro-batch, normalised as TRL's ``loss_type`` (drop-in for ``_compute_loss``).

    For users with their own ``GRPOTrainer`` subclass::

        def _compute_loss(self, model, inputs):
            return rlclip_objective_loss(self, inputs, self.my_objective, model=model)

    (TROLL also needs :func:`record_old_support` after generation when the
    batch is reused, i.e. ``num_iterations`` > 1.) Logs ``objective/...``
    metrics into ``trainer._metrics``.
    """
    objective = _resolved(trainer, objective)
    model = trainer.model if model is None else model
    training = trainer.model.training
    mask = _loss_mask(inputs)  # [B, T]
    need_entropy = "entropy" in objective.needs or "entropy" in getattr(objective, "step_needs", ())
    stats = _current_policy(trainer, model, inputs, objective, need_entropy)
    num_tokens, num_sequences = _denominators(trainer, inputs, mask, training)
    batch = _policy_batch(trainer, inputs, stats, objective, num_tokens, num_sequences)
    if getattr(objective, "step_needs", None):
        batch.step_stats = _step_statistics(trainer, model, objective, inputs, batch, training)
    out = objective(batch)
    loss = out.loss * trainer.accelerator.num_processes  # DDP averages; the denominators above are global
    aux_loss = stats.get("aux_loss")
    if aux_loss is not None:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / _accumulation(trainer, training)
    _log_metrics(trainer, out.metrics, stats, mask, aux_loss, training)
    return loss


# ---------------------------------------------------------------- step statistics (e.g. Archer's KL counts)


class _AcceleratorReducer:
    """``Objective.step_statistics`` reductions over the processes of ``accelerator``."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def _all_reduce(self, tensor: Tensor, op: Any) -> Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=op)
        return tensor

    def sum(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def min(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MIN)

    def cat(self, tensor: Tensor) -> Tensor:
        world = self.accelerator.num_processes
        if world == 1:
            return tensor
        sizes = self.accelerator.gather(torch.tensor([tensor.numel()], device=tensor.device))  # [P]
        padded = self.accelerator.pad_across_processes(tensor.reshape(-1), dim=0)  # [n_max]
        gathered = self.accelerator.gather(padded).view(world, -1)  # [P, n_max]
        return torch.cat([gathered[i, :n] for i, n in enumerate(sizes.tolist())])


def _detached(batch: PolicyBatch) -> PolicyBatch:
    return dataclasses.replace(batch, logprobs=batch.logprobs.detach(),
                               entropy=None if batch.entropy is None else batch.entropy.detach())


def _window(trainer: Any, inputs: dict[str, Any], training: bool) -> tuple[list[dict], int, int] | None:
    """The micro-batches of the current accumulation window, this one's position and the window's start.

    None when the window is this micro-batch alone (or TRL's buffer does not
    hold ``inputs``, e.g. in a custom loop: the statistics are then per micro-batch).
    """
    accum = _accumulation(trainer, training)
    if accum == 1:
        return None
    buffer, spg, step = getattr(trainer, "_buffered_inputs", None), trainer.args.steps_per_generation, trainer._step
    if buffer is None or buffer[step % spg] is not inputs:
        warnings.warn("rlclip: the micro-batch is not in TRL's generation buffer; step statistics are "
                      "computed per micro-batch", UserWarning, stacklevel=4)
        return None
    position = step % accum
    start = step - position
    return [buffer[(start + i) % spg] for i in range(accum)], position, start


def _window_statistics(trainer: Any, model: torch.nn.Module, objective: Objective, window: list[dict],
                       training: bool) -> dict[str, Tensor]:
    """Step statistics from a no-grad pass over every micro-batch of the window, across processes."""
    need_entropy = "entropy" in objective.step_needs
    parts = []
    with torch.no_grad():
        for inputs in window:
            stats = _current_policy(trainer, model, inputs, objective, need_entropy)
            parts.append(_policy_batch(trainer, inputs, stats, objective, None, None))
    whole = {}
    for name in ("logprobs", "old_logprobs", "advantages", "mask", "ref_logprobs", "entropy", "truncated"):
        values = [getattr(p, name, None) for p in parts]
        whole[name] = None if any(v is None for v in values) else torch.cat(values)  # [window rows, ...]
    reducer = _AcceleratorReducer(trainer.accelerator)
    counts = torch.stack([whole["mask"].sum(), whole["mask"].new_tensor(float(whole["mask"].shape[0]))])
    tokens, sequences = reducer.sum(counts)  # the step's global token and sequence counts
    batch = _make_batch(**whole, num_tokens=tokens, num_sequences=sequences)
    return objective.step_statistics(batch, reducer)


def _step_statistics(trainer: Any, model: torch.nn.Module, objective: Objective, inputs: dict[str, Any],
                     batch: PolicyBatch, training: bool) -> dict[str, Tensor]:
    """This micro-batch's rows of the statistics over its whole optimizer step (all micro-batches, processes)."""
    reducer = _AcceleratorReducer(trainer.accelerator)
    found = _window(trainer, inputs, training)
    if found is None:
        return objective.step_statistics(_detached(batch), reducer)
    window, position, start = found
    key = (start, id(trainer._buffered_inputs))
    cached = getattr(trainer, "_rlclip_step_stats", None)
    if cached is None or cached[0] != key:
        cached = (key, _window_statistics(trainer, model, objective, window, training))
        trainer._rlclip_step_stats = cached
    rows = batch.logprobs.shape[0]
    total = rows * len(window)
    return {k: v[position * rows:(position + 1) * rows] if v.dim() > 0 and v.shape[0] == total else v
            for k, v in cached[1].items()}


# ---------------------------------------------------------------- metrics


def _log_metrics(trainer: Any, metrics: dict[str, Any], stats: dict[str, Any], mask: Tensor,
                 aux_loss: Tensor | None, training: bool) -> None:
    """Objective metrics as ``objective/<name>`` (mean over processes; ``_min`` / ``_max`` keys: min / max)."""
    mode = "train" if training else "eval"
    values = dict(metrics)
    entropy = stats.get("entropy")
    if entropy is not None:  # TRL's own `entropy` metric, kept under its name
        counted = mask.to(entropy.dtype)
        totals = trainer.accelerator.reduce(torch.stack([(entropy * counted).sum(), counted.sum()]), "sum")
        trainer._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
    if aux_loss is not None:
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather(aux_loss.detach()).mean().item())
    if not values:
        return
    keys = sorted(values)
    device = mask.device
    local = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device).detach().reshape(())
                         for k in keys])  # [K]
    gathered = trainer.accelerator.gather(local[None]).view(-1, len(keys))  # [P, K]
    for i, key in enumerate(keys):
        column = gathered[:, i]
        if key.endswith("_min"):
            value = column.min()
        elif key.endswith("_max"):
            value = column.max()
        else:
            value = column.nanmean()
        trainer._metrics[mode][f"objective/{key}"].append(value.item())
