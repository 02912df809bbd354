"""PyTorch FSDP2 (``fully_shard``) applied by rlclip itself, for ``recipes/accelerate/fsdp.yaml``.

accelerate only turns FSDP on for GPU process groups: on CPU (gloo) its
state stays ``MULTI_CPU`` and ``prepare`` would wrap the model in DDP. So
the trainer shards the model here, on CPU and GPU alike (one code path),
and never hands the policy or its optimizer to ``accelerator.prepare``:

- :func:`shard`: each decoder layer is one FSDP unit, then the root (embeddings,
  final norm, output layer). The root keeps its parameters gathered after its
  forward, which is what ``rlclip.policy`` relies on when it multiplies the
  final hidden states by the output layer's weight after the forward.
- gradients are reduce-scattered at every micro-batch and averaged over the
  processes, as DDP's all-reduce is, so the trainer's ``loss * num_processes``
  keeps its meaning;
- :func:`full_state_dict` gathers the model for ``save_pretrained``;
  :class:`ShardedState` writes and reads model and optimizer shards with
  torch's distributed checkpoint (DCP) beside accelerate's ``save_state``
  (scheduler, RNG states).

The launch config reaches the worker processes as the environment variables
``accelerate launch`` sets (``ACCELERATE_USE_FSDP``, ``FSDP_*``), read by
:func:`settings_from_env`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlclip.errors import ConfigError

DCP_DIR = "fsdp"  # model + optimizer shards inside a checkpoint's state directory


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).strip().lower() in ("true", "1", "yes")


@dataclass(frozen=True)
class FsdpSettings:
    """What the accelerate FSDP config asks for (``fsdp_config`` in the YAML)."""

    reshard_after_forward: bool = True
    """Free a decoder layer's gathered parameters after its forward (ZeRO-3-like); False keeps them (ZeRO-2-like)."""
    offload_params: bool = False
    """Keep parameters, gradients and optimizer state on the CPU (``CPUOffloadPolicy``)."""
    layer_classes: tuple[str, ...] = ()
    """Class names of the units to shard one by one; empty: the model's ``_no_split_modules``."""
    bf16: bool = False
    """Compute in bf16 (parameters gathered in bf16), reduce gradients and keep the shards in fp32."""


def requested() -> bool:
    """True when launched with an FSDP accelerate config (``accelerate launch`` sets this variable)."""
    return _flag("ACCELERATE_USE_FSDP")


def settings_from_env(mixed_precision: str = "no") -> FsdpSettings | None:
    """The FSDP settings of this launch, None without FSDP; FSDP1 is refused in one line."""
    if not requested():
        return None
    version = os.environ.get("FSDP_VERSION", "1").strip()
    if version != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {version}, which rlclip does not run; "
                          "set fsdp_version: 2 in its fsdp_config (recipes/accelerate/fsdp.yaml)")
    if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError("fsdp_activation_checkpointing is not applied by rlclip's FSDP sharding; set it to false "
                          "in the accelerate config and use model.gradient_checkpointing: true in the recipe")
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    return FsdpSettings(reshard_after_forward=reshard not in ("false", "no_reshard", "shard_grad_op"),
                        offload_params=_flag("FSDP_OFFLOAD_PARAMS"),
                        layer_classes=tuple(n.strip() for n in names.split(",") if n.strip()),
                        bf16=str(mixed_precision) == "bf16")


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself without one)."""
    from rlclip.policy import unwrap

    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layer_classes(base: nn.Module, settings: FsdpSettings) -> set[str]:
    """The units' class names: the config's, else the model's ``_no_split_modules``."""
    if settings.layer_classes:
        return set(settings.layer_classes)
    return set(getattr(base, "_no_split_modules", None) or [])


def shard(model: nn.Module, settings: FsdpSettings) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root; returns the same (now sharded) module.

    Must run before the optimizer is built: the parameters become DTensor
    shards and the optimizer has to hold those. The root is sharded with the
    default ``reshard_after_forward`` (FSDP keeps a root's parameters gathered
    after the forward, as backward needs them at once), the layers with the
    config's. With LoRA the root is the transformers model inside the PEFT
    wrapper: PEFT's ``generate`` calls that model's ``generate`` directly, so a
    root hook on the wrapper would never gather the embeddings for sampling.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = dict(
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if settings.bf16 else MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy() if settings.offload_params else OffloadPolicy())
    root = _base(model)
    names = _layer_classes(root, settings)
    layers = [m for m in root.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, reshard_after_forward=settings.reshard_after_forward, **policy)
    fully_shard(root, **policy)
    return model


def reshard(model: nn.Module) -> None:
    """Free the root's gathered parameters (a no-op when they are sharded already)."""
    _base(model).reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or the transformers model it wraps) is an FSDP2 module."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(_base(model), FSDPModule)


def synced_generation(model: nn.Module) -> bool:
    """Whether decoding must step in sync over processes (rlclip/decoding.py's ``synced``, ``generate``'s
    ``synced_gpus``): every decoding step all-gathers the sharded layers, so a process whose completions end
    early must keep stepping until all have ended (else the others hang). transformers only detects its own
    FSDP wrapping, not a bare ``fully_shard``; DeepSpeed ZeRO-3 counts too (its forward gathers, unless the
    generation already holds the full parameters)."""
    import torch.distributed as dist
    from transformers.integrations import is_deepspeed_zero3_enabled

    many = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return many and (is_sharded(model) or is_deepspeed_zero3_enabled())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU on process 0 (empty elsewhere); collective: call on every process.

    A tied weight (output layer = embeddings) is kept once, under its first name, as in the state dict
    ``save_pretrained`` writes for an unsharded model: the gathered copies no longer share storage, so
    transformers would not see the tie and would write the matrix twice.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole on every process (DTensor shards gathered): for tests and debugging."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for name, p in model.named_parameters()}


class ShardedState:
    """A checkpoint's state: accelerate's ``save_state`` (scheduler, RNG) plus the DCP shards of model and
    optimizer, which accelerate would save wrongly (process 0's shards only) for a model it did not wrap."""

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.accelerator.save_state(directory)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(directory) / DCP_DIR))

    def load(self, directory: str) -> None:
        """Load in place into the current shards (DCP reads each process's part), then set them."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(directory) / DCP_DIR
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} has no FSDP model/optimizer shards (not written under FSDP)")
        self.accelerator.load_state(directory)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
