"""``torch.compile`` of the policy's decoder layers, in place (``model.compile``: none | train | decode | all).

Regional compilation: every repeated decoder layer (transformers' ``GradientCheckpointingLayer``) gets a
compiled ``forward`` as an instance attribute, the way accelerate's hooks replace ``forward``. The layer
objects, their names, parameters and ``state_dict`` stay as they are, so PEFT, DDP, FSDP and
``save_pretrained`` see the model they saw before; module hooks and activation checkpointing run outside the
compiled region, around it. All layers of one class call one compiled function: with transformers' layers as
graph inputs (torch's ``inline_inbuilt_nn_modules``), SmolLM2's 30 layers share one graph per kind of call.

Two kinds of call, told apart by whether a KV cache is passed:

- **train**: forwards without a cache: the training pass (forward and backward) and the no-grad log-prob
  passes (behaviour, reference);
- **decode**: forwards with a cache: the prefill and the per-token steps of the decoding loop (and of HF
  ``generate``). The cache's ``update`` runs eagerly (a graph break): traced, it indexes the cache's list of
  layers by ``layer_idx``, which would make one graph per layer (30 compiles and torch's recompile limit).
  For the same reason ``layer_idx`` is left unspecialised (``allow_unspec_int_on_nn_module``) in those calls.

Calls of the kind not selected run the eager forward. Shapes are dynamic (``dynamic=True``): completion
lengths change every rollout and the KV length every decoding step. What remains are separate graphs for
grad / no-grad, train / eval mode and prefill / one-token steps: about 8 compiles per layer class in all,
independent of the number of layers. Compile time is torch's own count (:func:`compile_seconds`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

MODES = ("none", "train", "decode", "all")
RECOMPILE_LIMIT = 32
"""Graphs per layer class before torch falls back to eager (torch's default 8 is close to what one run uses)."""

logger = logging.getLogger(__name__)
_COMPILED: dict[type, Any] = {}  # layer class -> its compiled forward, shared by every instance
_EAGER_UPDATE: dict[type, type] = {}  # cache class -> subclass whose update runs eagerly
_reported = 0.0  # compile seconds already handed out by compile_metrics
_active = False  # compile_policy compiled something in this process


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: transformers' ``GradientCheckpointingLayer`` instances, else the classes the model
    names in ``_no_split_modules``."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_policy(model: nn.Module, mode: str) -> nn.Module:
    """Compile ``model``'s decoder layers in place for ``mode`` (one of :data:`MODES`); returns ``model``.

    ``none`` does nothing. A model without recognisable decoder layers is left eager, with a logged reason."""
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return model
    layers = decoder_layers(model)
    if not layers:
        logger.warning("model.compile=%s: no decoder layers found in %s; the model stays eager", mode,
                       type(model).__name__)
        return model
    global _active
    _active = True
    for layer in layers:
        cls = type(layer)
        if cls not in _COMPILED:
            _COMPILED[cls] = torch.compile(cls.forward, dynamic=True)
        layer.forward = functools.partial(_dispatch, layer, _COMPILED[cls], mode)
    return model


def uncompile_policy(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_policy`: the layers' class ``forward`` again (compiled graphs stay cached)."""
    for layer in decoder_layers(model):
        if isinstance(layer.__dict__.get("forward"), functools.partial):
            del layer.forward
    return model


def _dispatch(layer: nn.Module, compiled: Any, mode: str, *args: Any, **kwargs: Any) -> Any:
    """One layer call: compiled when its kind (cache: decode, none: train) is selected, eager otherwise."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    decoding = cache is not None
    if mode != "all" and decoding != (mode == "decode"):
        return type(layer).forward(layer, *args, **kwargs)
    if decoding:
        _eager_update(cache)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, allow_unspec_int_on_nn_module=decoding):
        return compiled(layer, *args, **kwargs)


def _eager_update(cache: Any) -> None:
    """Give ``cache`` (once) a subclass of its class whose ``update`` is kept out of the compiled graph.

    A subclass, not a patch of transformers' class: other caches in the process (a user's compiled static
    cache) keep tracing their update. One subclass per cache class, so the graphs' type guards hold."""
    cls = type(cache)
    if getattr(cls, "_rlclip_eager_update", False):
        return
    if cls not in _EAGER_UPDATE:
        _EAGER_UPDATE[cls] = type(cls.__name__, (cls,), {"update": torch.compiler.disable(cls.update),
                                                         "_rlclip_eager_update": True,
                                                         "__module__": cls.__module__})
    cache.__class__ = _EAGER_UPDATE[cls]


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (torch's count of frame and backward compiles)."""
    try:
        from torch._dynamo.utils import calculate_time_spent
    except ImportError:  # a torch that moved its counter: report nothing rather than fail a run
        return 0.0
    return float(calculate_time_spent().get("total_wall_time", 0.0))


def compile_metrics() -> dict[str, float]:
    """``{"time/compile_s": seconds}`` this process spent compiling since the previous call (every compile in
    the process, the layers' being nearly all of it); ``{}`` when nothing compiled since, or when
    :func:`compile_policy` never compiled anything here."""
    global _reported
    if not _active:
        return {}
    total = compile_seconds()
    if total <= _reported:
        return {}
    spent, _reported = total - _reported, total
    return {"time/compile_s": spent}

