"""The data-parallel layout the trainer runs under: DDP (accelerate's default), DeepSpeed ZeRO-2/3 or FSDP2.

The trainer builds its ``Accelerator`` here and routes every micro-batch's
backward and every optimizer step through a :class:`Layout`, so its loop
does not branch on DeepSpeed:

- **DDP / one process.** ``accelerator.backward``; the gradient all-reduce is
  skipped on all but the last micro-batch of an optimizer step
  (``no_sync``); rlclip measures and clips the gradient itself and steps the
  optimizer (rlclip/gradient_step.py).
- **DeepSpeed ZeRO-2/3** (``accelerate launch --config_file
  recipes/accelerate/deepspeed_zero2.yaml``). DeepSpeed owns the gradient
  partitions, so it also owns the step: ``engine.backward`` per micro-batch
  with the accumulation boundary at the last one (DeepSpeed reduces the
  gradient there, averaging over processes as DDP does), then one
  ``engine.step()`` per optimizer step. DeepSpeed clips to
  ``train.max_grad_norm`` and, in fp32 as in bf16, skips a step whose
  gradient norm is not finite (``engine.was_step_applied()``), which rlclip's
  non-finite guard then counts.
- **FSDP2** (``recipes/accelerate/fsdp.yaml``, ``fsdp_version: 2``). rlclip
  shards the model itself (``rlclip.fsdp``: accelerate does not enable FSDP
  on CPU, where it would wrap the model in DDP instead) before the optimizer
  is built, and keeps model and optimizer out of ``accelerator.prepare``.
  Gradients are reduce-scattered (averaged over processes) at every
  micro-batch, so ``no_sync`` does nothing; rlclip clips the sharded
  gradients (``grad_clip`` reduces DTensor norms) and steps as under DDP.
  The final model is gathered for ``save_pretrained``; checkpoints hold the
  model and optimizer shards (DCP) beside accelerate's state.

On a machine without GPUs DeepSpeed runs on its CPU accelerator over gloo.
accelerate's ``cpu=True`` would silently turn DeepSpeed off, and with
``cpu=False`` it only learns the process group's size when told the backend
(``InitProcessGroupKwargs(backend="gloo")``): without it every rank believes
it is alone.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from rlclip import fsdp
from rlclip.errors import ConfigError


def deepspeed_requested() -> bool:
    """True when launched with a DeepSpeed accelerate config (``accelerate launch`` sets this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(log_with: str | None, project_dir: str) -> Accelerator:
    """The run's ``Accelerator``: CPU (gloo) or GPU, DeepSpeed when the launch config asks for it."""
    has_gpu = torch.cuda.is_available()
    fsdp.settings_from_env()  # FSDP1 is refused before any process group starts
    if deepspeed_requested():
        if importlib_missing("deepspeed"):
            raise ConfigError("the accelerate config asks for DeepSpeed but it is not installed; "
                              "pip install deepspeed, or launch with a DDP or FSDP config")
        handlers = [] if has_gpu else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(cpu=False, kwargs_handlers=handlers, log_with=log_with, project_dir=project_dir)
    return Accelerator(cpu=not has_gpu, log_with=log_with, project_dir=project_dir)


def importlib_missing(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is None


class Layout:
    """Backward and optimizer-step routing for the run's accelerator (see the module docstring)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        plugin = accelerator.state.deepspeed_plugin if self.deepspeed else None
        self.zero_stage = int(plugin.zero_stage) if plugin is not None else 0
        self.fsdp = None if self.deepspeed else fsdp.settings_from_env(getattr(accelerator, "mixed_precision", "no"))

    def configure(self, config: Any) -> None:
        """Check the recipe against the layout and fill DeepSpeed's config before ``prepare``.

        accelerate refuses ``train_micro_batch_size_per_gpu: auto`` without a
        data loader, and would set ``gradient_clipping: auto`` to 1.0; rlclip
        accumulates micro-batches itself, so DeepSpeed sees one micro-batch
        per step boundary (``gradient_accumulation_steps: 1``) and is told
        where the boundary is (``set_gradient_accumulation_boundary``).
        """
        if self.fsdp is not None and config.advantage.name == "gae":
            raise ConfigError("PPO mode (advantage.name: gae) trains a critic as a second model, which the trainer "
                              "does not yet shard for FSDP; use a group advantage (grpo, dr_grpo, rloo) or "
                              "launch with DDP")
        if not self.deepspeed:
            return
        train = config.train
        if train.grad_clip and train.grad_clip.get("name", "norm") != "norm":
            raise ConfigError(f"train.grad_clip {train.grad_clip.get('name')!r} needs the full gradient, which "
                              "DeepSpeed ZeRO shards; under DeepSpeed use train.max_grad_norm (DeepSpeed clips), "
                              "or launch with DDP or FSDP")
        if config.advantage.name == "gae":
            raise ConfigError("PPO mode (advantage.name: gae) trains a critic as a second model, which the trainer "
                              "does not yet wrap for DeepSpeed; use a group advantage (grpo, dr_grpo, rloo) or "
                              "launch with DDP")
        max_norm = (train.grad_clip or {}).get("max_norm", train.max_grad_norm)
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["gradient_clipping"] = float(max_norm or 0.0)
        ds.pop("train_batch_size", None)  # recomputed by accelerate from the two above
        if self.zero_stage == 3:  # save_pretrained gathers the weights through accelerate's get_state_dict
            ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True

    @property
    def fused_optimizer(self) -> bool:
        """torch's fused AdamW is kept for plain parameters; ZeRO hands the optimizer flat partitions, FSDP
        DTensor shards."""
        return not self.deepspeed and self.fsdp is None

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP: shard the policy (after LoRA, before its optimizer is built); other layouts: unchanged."""
        return fsdp.shard(model, self.fsdp) if self.fsdp is not None else model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """``accelerator.prepare`` of policy and optimizer (DDP wrapping, DeepSpeed engine). Under FSDP both
        stay as they are: prepare would DDP-wrap the sharded model on CPU and save only process 0's shards.
        The optimizer then reshards the root before it steps, so it never updates a gathered copy."""
        if self.fsdp is None:
            return self.accelerator.prepare(model, optimizer)
        optimizer.register_step_pre_hook(lambda *_: fsdp.reshard(model))
        return model, optimizer


    def no_sync(self, models: tuple[torch.nn.Module | None, ...], last: bool) -> ExitStack:
        """DDP: skip the gradient all-reduce on all but the last micro-batch. DeepSpeed: its boundary flag."""
        stack = ExitStack()
        for model in models:
            if model is None:
                continue
            if self.deepspeed:
                model.set_gradient_accumulation_boundary(last)
            elif self.fsdp is not None:
                continue  # reduce-scatter at every micro-batch: the gradients stay sharded
            elif not last:
                stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def backward(self, model: torch.nn.Module, loss: torch.Tensor) -> None:
        """One micro-batch's backward; the loss is already this process's share of the global mean."""
        if self.deepspeed:
            # not accelerator.backward: under DeepSpeed it also steps the optimizer, once per micro-batch
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def step(self, model: torch.nn.Module) -> tuple[bool, float]:
        """DeepSpeed's clip-and-step at the boundary: (applied, gradient norm before clipping; inf if skipped)."""
        model.step()
        applied = bool(model.was_step_applied())
        norm = model.get_global_grad_norm()
        return applied, float(norm) if applied and norm is not None else float("inf")

    def gather_output_layer(self, model: torch.nn.Module) -> Any:
        """ZeRO-3 partitions every weight outside its module's forward: gather the output layer for the
        chunked log-prob path, which multiplies by it directly (a null context otherwise)."""
        if self.zero_stage != 3:
            return nullcontext()
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        from rlclip.policy import unwrap

        head = unwrap(model).get_output_embeddings()
        return maybe_gather_lm_head_ctx(head.weight, getattr(head, "bias", None))

    def reference(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen reference model for this layout: under ZeRO-3 an inference engine sharded like the
        policy (it was built partitioned), under FSDP sharded like the policy (forward only); otherwise the
        module on this process's device."""
        if self.fsdp is not None:
            return fsdp.shard(model, self.fsdp)
        if self.zero_stage == 3:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        return model.to(self.accelerator.device)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict for ``save_pretrained`` (collective: call on every process)."""
        if self.fsdp is not None:
            return fsdp.full_state_dict(model)
        return self.accelerator.get_state_dict(model)

    def state_io(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """What writes and reads a checkpoint's ``state`` directory: accelerate (``save_state`` /
        ``load_state``), plus DCP shards of model and optimizer under FSDP."""
        if self.fsdp is not None:
            return fsdp.ShardedState(self.accelerator, model, optimizer)
        return AccelerateState(self.accelerator)


class AccelerateState:
    """A checkpoint's state through accelerate alone: prepared models and optimizers, registered objects
    (the scheduler), RNG states."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def save(self, directory: str) -> None:
        self.accelerator.save_state(directory)

    def load(self, directory: str) -> None:
        self.accelerator.load_state(directory)
