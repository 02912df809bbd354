"""Any rlclip objective as the policy loss of TRL's ``GRPOTrainer`` (contract 4).

TRL has no plug-in point for losses, so :class:`ObjectiveGRPOTrainer`
subclasses ``trl.GRPOTrainer`` and replaces only its loss: generation, vLLM,
rewards, advantages, logging, callbacks and checkpoints stay TRL's own. Per
micro-batch the adapter

- computes the current log-probs through TRL's own forward (its fused LM
  head, which also gives the entropy), or, for objectives that need a sparse
  support (TROLL), through ``rlclip.policy`` on the recorded old support;
- takes the old and reference log-probs TRL computed at generation time (the
  reference model is loaded whenever the objective needs it, with no TRL KL);
- maps TRL's ``loss_type`` to rlclip's aggregation with TRL's denominators,
  so the update equals TRL's for the same surrogate;
- logs the objective's metrics as ``objective/<name>`` in TRL's metrics.

Users with their own ``GRPOTrainer`` subclass call
:func:`rlclip_objective_loss` from their ``_compute_loss`` (and
:func:`record_old_support` after generation for TROLL).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlclip.errors import ConfigError
from rlclip.objectives import Objective, build_objective
from rlclip.policy import completion_logprobs
from rlclip.types import PolicyBatch

SUPPORTED_TRL = ">=1.16,<1.17"
"""The TRL versions this adapter is tested on (also pyproject's ``trl`` dependency)."""

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - trl is a dependency of rlclip
    raise ImportError(f"rlclip.integrations.trl needs TRL: pip install 'trl{SUPPORTED_TRL}'") from exc

LOSS_TYPE_AGG = {
    "dapo": "token_mean",  # over the tokens of the whole accumulation window (TRL's num_items_in_batch)
    "bnpo": "token_mean",  # over the tokens of each micro-batch
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",  # divided by max_completion_length
}
"""TRL ``loss_type`` -> rlclip ``agg``. Other loss types are TRL's own surrogates, not aggregations."""

SUPPORT_PREFIX = "rlclip_old_support_"
"""Keys under which the old policy's sparse support rides in TRL's buffered inputs."""
_SUPPORT_KEYS = ("indices", "logprobs", "mask", "token_logprobs")
_REFERENCE_GATE_BETA = 1.0  # any non-zero beta makes TRL load the reference model and score it
_TRL_FORWARD_SKIP = {"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                     "compute_entropy", "compute_aux_loss"}


# ---------------------------------------------------------------- validation


def check_trl_version(version: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``version`` (default: the installed TRL) is in :data:`SUPPORTED_TRL`.

    The adapter overrides private GRPOTrainer methods whose signatures change
    between TRL releases, so only the tested range is accepted.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = trl.__version__ if version is None else version
    try:
        ok = SpecifierSet(SUPPORTED_TRL).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ConfigError(f"rlclip.integrations.trl supports trl{SUPPORTED_TRL}, found trl {version}; "
                          f"install a supported version: pip install 'trl{SUPPORTED_TRL}'")


def _bypass_problems(args: Any, allow_beta: bool) -> Iterator[str]:
    """One message per GRPOConfig option that would bypass or silently alter the objective."""
    if getattr(args, "use_liger_kernel", False) or getattr(args, "use_liger_loss", False):
        yield ("use_liger_kernel=True (Liger) replaces the forward/loss the objective is computed from; "
               "set use_liger_kernel=False")
    if args.loss_type not in LOSS_TYPE_AGG:
        yield (f"loss_type={args.loss_type!r} is TRL's own surrogate and cannot be mapped to an rlclip "
               f"aggregation; set loss_type to one of {', '.join(LOSS_TYPE_AGG)} and choose the surrogate "
               "with objective=")
    if getattr(args, "beta", 0.0) != 0.0 and not allow_beta:
        yield (f"beta={args.beta} is TRL's KL penalty, which the objective replaces; set beta=0 and put "
               "kl_coef (and kl_estimator) in the objective's settings")
    if getattr(args, "importance_sampling_level", "token") != "token":
        yield ("importance_sampling_level='sequence' belongs to TRL's surrogate; use "
               "objective={'name': 'ratio_clip', 'level': 'sequence'} (GSPO) instead")
    if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
        yield "top_entropy_quantile < 1 is applied inside TRL's own loss only; leave it at 1.0"
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        yield "off_policy_mask_threshold is applied inside TRL's own loss only; leave it unset"
    if getattr(args, "delta", None) is not None:
        yield "delta (two-sided clipping) belongs to TRL's surrogate; use the objective's dual_clip instead"
    if getattr(args, "entropy_coef", 0.0) != 0.0 or getattr(args, "use_adaptive_entropy", False):
        yield "the entropy bonus (entropy_coef / use_adaptive_entropy) is not applied to the objective; disable it"
    if getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False):
        yield ("vLLM importance-sampling correction is applied inside TRL's own loss only; set "
               "vllm_importance_sampling_correction=False")


def check_trl_args(args: Any, *, allow_beta: bool = False) -> None:
    """Raise a one-line :class:`ConfigError` for the first GRPOConfig option that bypasses the objective.

    ``allow_beta`` is for users' own subclasses, where a non-zero ``beta``
    is how TRL is asked for reference log-probs (their loss replaces TRL's KL).
    Non-default ``epsilon`` / ``epsilon_high`` only warn: the objective's own
    clip settings apply.
    """
    for problem in _bypass_problems(args, allow_beta):
        raise ConfigError(f"rlclip objective in TRL: {problem}")
    if getattr(args, "epsilon", 0.2) != 0.2 or getattr(args, "epsilon_high", None) is not None:
        warnings.warn("TRL's epsilon / epsilon_high are not used by the rlclip objective; set its own clip "
                      "settings (e.g. objective={'name': 'ratio_clip', 'eps_low': 0.2, 'eps_high': 0.28})",
                      UserWarning, stacklevel=3)


def _check_agg(agg: str, norm_len: int | None, want: str, want_len: int | None, loss_type: str) -> None:
    if agg != want:
        raise ConfigError(f"objective agg={agg!r} disagrees with loss_type={loss_type!r}, which aggregates as "
                          f"{want!r}; drop agg from the objective or pick the loss_type that maps to it "
                          f"({', '.join(f'{k} -> {v}' for k, v in LOSS_TYPE_AGG.items())})")
    if want_len is not None and norm_len not in (None, want_len):
        raise ConfigError(f"objective agg_norm_len={norm_len} disagrees with loss_type='dr_grpo', which divides "
                          f"by max_completion_length={want_len}; drop agg_norm_len from the objective")


def resolve_objective(objective: str | dict[str, Any] | Objective, loss_type: str,
                      max_completion_length: int | None) -> Objective:
    """The objective to use under TRL's ``loss_type``: built from a name / dict, or checked if an instance.

    A name or dict gets ``agg`` (and, for ``dr_grpo``, ``agg_norm_len``) from
    ``loss_type``; an explicit ``agg`` that disagrees raises. An instance
    must already use the matching ``agg``; a copy gets the Dr. GRPO length.
    """
    if loss_type not in LOSS_TYPE_AGG:
        raise ConfigError(f"rlclip objective in TRL: loss_type={loss_type!r} cannot be mapped; use one of "
                          f"{', '.join(LOSS_TYPE_AGG)}")
    agg = LOSS_TYPE_AGG[loss_type]
    norm_len = max_completion_length if agg == "seq_mean_token_sum_norm" else None
    if isinstance(objective, str):
        objective = {"name": objective}
    if isinstance(objective, dict):
        settings = dict(objective)
        name = settings.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"objective dict needs a 'name' (a registered objective), got {objective!r}")
        _check_agg(settings.setdefault("agg", agg), settings.get("agg_norm_len"), agg, norm_len, loss_type)
        if norm_len is not None:
            settings.setdefault("agg_norm_len", norm_len)
        return build_objective(name, **settings)
    if isinstance(objective, Objective):
        _check_agg(objective.agg, objective.agg_norm_len, agg, norm_len, loss_type)
        if norm_len is not None and objective.agg_norm_len is None:
            objective = copy.copy(objective)
            objective.agg_norm_len = norm_len
        return objective
    raise ConfigError(f"objective must be a registered name, a dict with 'name', or an Objective instance; "
                      f"got {type(objective).__name__}")


# ---------------------------------------------------------------- the trainer


@contextlib.contextmanager
def _reference_gate(args: Any, needed: bool) -> Iterator[None]:
    """While TRL's __init__ runs, a non-zero ``beta`` when the objective needs a reference model.

    TRL loads the reference model (or keeps the PEFT base as reference) and
    scores it after generation only when ``beta != 0``; the adapter opens that
    gate and never applies TRL's KL. The user's config is restored.
    """
    if not needed:
        yield
        return
    saved = args.beta
    args.beta = _REFERENCE_GATE_BETA
    try:
        yield
    finally:
        args.beta = saved


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


def _check_step_layout(objective: Objective, args: Any) -> None:
    """Step statistics (e.g. Archer's KL token counts) need each accumulation window inside one generation."""
    if not getattr(objective, "step_needs", None):
        return
    spg = args.steps_per_generation or args.gradient_accumulation_steps
    if spg % args.gradient_accumulation_steps:
        raise ConfigError(f"objective {objective.name!r} computes statistics over each optimizer step, which "
                          f"needs steps_per_generation ({spg}) to be a multiple of gradient_accumulation_steps "
                          f"({args.gradient_accumulation_steps})")


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
