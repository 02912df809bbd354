"""Linear layers decoded from weights pre-packed for oneDNN, on CPU (``rollout.prepack_weights``).

A decoding step multiplies a few rows (the B sequences being sampled) by every
weight of the model, so it streams all the weights from memory once per token.
torch's CPU linear (MKL's sgemm on the row-major ``[out, in]`` weight) streams
them poorly at small M: on SmolLM2-135M with 16 rows the output layer
(49,152 x 576) took 18.8 ms a step and a 1536 x 576 MLP weight 0.44 ms. The
same products from a weight reordered once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, then ``_linear_pointwise``, the
kernels inductor's CPU freezing pass uses) took 5.9 ms and 0.22 ms, and the
176-row prefill of the output layer 57 ms against 86 ms
(eval/results/perf_notes.md).

The weights change after every optimizer step, so they are packed when a
rollout starts (about 0.1 s for that model) and dropped when it ends; the
parameters themselves are not touched. The cost is one more copy of the
weights while decoding. A LoRA layer merged for decoding
(rlclip/lora_decoding.py) packs W + s B A one layer at a time and keeps only
the packed copy (``install_packed``), so LoRA decoding holds no merged copy.
The products are float32 either way, with another summation order: they agree with ``F.linear`` to about 1e-6
relative, like any two BLAS libraries; the trainer recomputes every log-prob
it trains on, and the sampler's own log-probs (``sampler_logprobs``) are
those of what was sampled.

Only float32 ``nn.Linear`` layers on CPU with whole weights (not FSDP or
ZeRO-3 shards), in no-grad decoding, where torch has oneDNN; elsewhere
nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def packable_layers(model: nn.Module) -> list[nn.Linear]:
    """The plain float32 CPU ``nn.Linear`` layers of ``model`` with whole weights (each module once)."""
    if not torch.backends.mkldnn.is_available():
        return []
    return [m for m in model.modules()
            if type(m) is nn.Linear and type(m.weight.data) is torch.Tensor  # not a DTensor shard (FSDP2)
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" and "forward" not in m.__dict__]


def _packed_forward(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def install_packed(layer: nn.Linear, weight: Tensor, rows: int) -> None:
    """``layer`` computes from ``weight`` (no grad), packed, until :func:`remove_packed`."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(rows, 1))
    bias = None if layer.bias is None else layer.bias.detach()
    layer.forward = lambda x, w=packed, b=bias: _packed_forward(w, b, x)


def remove_packed(layer: nn.Module) -> None:
    layer.__dict__.pop("forward", None)


@contextmanager
def packed_for_decoding(model: nn.Module, rows: int | None) -> Iterator[int]:
    """Inside the block (no grad) each packable linear layer of ``model`` computes from a oneDNN-packed copy of
    its weight; ``rows`` is the decoding batch the packing is tuned for (None: nothing is packed). Yields the
    number of layers packed."""
    layers = packable_layers(model) if rows is not None else []
    try:
        for layer in layers:
            install_packed(layer, layer.weight, rows)
        yield len(layers)
    finally:
        for layer in layers:
            remove_packed(layer)
