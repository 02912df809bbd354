"""LoRA merged for decoding, unmerged after, without touching the base weights (``lora.merge_for_decoding``).

Unmerged, every decoding step of every adapted linear layer runs three
matmuls, W x + s B (A x); merged it runs one, W' x with W' = W + s B A. The
sampling loop calls the model once per generated token, so the adapters'
small matmuls and their dispatch cost add up (issue #29 measured LoRA decoding
slower than full-model decoding).

PEFT's own ``merge_adapter`` / ``unmerge_adapter`` add and then subtract
s B A in place: the base weight comes back with float rounding (W + d - d is
not W), so a frozen base would drift by an ulp per rollout and runs would
depend on how often they sampled. Here the merged weight is a new tensor
W + s B A that stands in for W during decoding (``base_layer.weight`` is
swapped, the adapters disabled with PEFT's ``disable_adapter``); on exit the
original parameter object goes back, bit for bit. The cost is one extra copy
of the adapted weights while decoding.

Only where each process holds whole weights (one process, DDP, DeepSpeed
ZeRO-1/2): under ZeRO-3 or FSDP the weights are shards gathered for
generation, and decoding stays unmerged. Layers PEFT does not merge as a
plain delta (DoRA and other variants) keep their adapter path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def mergeable_layers(model: nn.Module) -> list[Any]:
    """The model's LoRA linear layers that a plain delta W + s B A merges (no variant, not merged already)."""
    from peft.tuners.lora.layer import Linear

    layers = []
    for module in model.modules():
        if isinstance(module, Linear) and not module.merged and isinstance(module.base_layer, nn.Linear):
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active and not any(a in module.lora_variant for a in active):
                layers.append(module)
    return layers


@contextmanager
def merged_for_decoding(model: nn.Module, enabled: bool = True, pack_rows: int | None = None) -> Iterator[int]:
    """Inside the block a PEFT model computes with W + s B A in place of each adapted W; yields the number of
    layers merged (0: nothing to do, or ``enabled`` False).

    ``pack_rows``: where a layer's weight can be packed for oneDNN (rlclip/packed_linear.py), W + s B A is packed
    for decoding batches of that many rows and only the packed copy is kept, one layer at a time, instead of a
    merged copy per layer."""
    from rlclip.packed_linear import install_packed, packable_layers, remove_packed

    layers = mergeable_layers(model) if enabled and hasattr(model, "disable_adapter") else []
    if not layers:
        yield 0
        return
    packable = {id(m) for m in packable_layers(model)} if pack_rows else set()
    originals, packed = [], []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.base_layer.weight
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
                merged = (weight + delta).to(weight.dtype)
                if id(layer.base_layer) in packable:
                    install_packed(layer.base_layer, merged, pack_rows)
                    packed.append(layer.base_layer)
                else:
                    originals.append((layer, weight))
                    layer.base_layer.weight = nn.Parameter(merged, requires_grad=False)
                del merged
        with model.disable_adapter():  # the adapters' path off: the merged weight carries them
            yield len(layers)
    finally:
        for layer, weight in originals:
            layer.base_layer.weight = weight
        for base in packed:
            remove_packed(base)
