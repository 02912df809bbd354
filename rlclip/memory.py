"""Handing freed heap memory back to the OS between the phases of a step (``train.release_free_memory``).

glibc's malloc serves blocks under its mmap threshold (which rises to 32 MiB
after the first large free) from a heap that it only shrinks from the top.
A training step frees gigabytes of such blocks (generation's caches and
logits, the update pass's activations, per-parameter gradients) below blocks
that live on (AdamW moments, rollout tensors), so the freed pages stay
resident: on the SmolLM2-135M benchmark of eval/bench/step_vs_trl.py
``mallinfo2`` counted 400-650 MiB free inside the heap at the peak
(eval/results/perf_notes.md). ``malloc_trim(0)`` hands every free page in
the heap back (``MADV_DONTNEED``); the pages fault in again only if they are
reused. It is called where the next phase's allocations begin:

- after generation, before the training pass;
- in the update pass's forward, after every 5th decoder layer (under LoRA
  the forward's RSS grew by about 30 MiB per layer while its live memory
  grew by 3-4 MiB: its blocks wandered over the heap's free space);
- before each backward pass;
- in the backward, after every 64 MiB of parameters whose gradient is done
  (each decoder layer's backward left about 24 MiB more resident without
  it), and just before the input embedding's gradient, the last and (for a
  large vocabulary) one of the largest allocations of the backward.

Each call took 10-40 ms on that model. Nothing here changes a value: only
where freed memory lives. Other allocators and platforms (macOS, musl, a
``LD_PRELOAD``-ed jemalloc or tcmalloc) have no ``malloc_trim``, and the
calls are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

import torch


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of decoder layers (the longest ModuleList named ``layers``), or []."""
    stacks = [m for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")]
    return list(max(stacks, key=len)) if stacks else []


class FreeMemoryRelease:
    """Calls ``malloc_trim(0)`` at the phase boundaries of a step, when enabled.

    Args:
        enabled: ``train.release_free_memory``; off, every method does nothing.
        every: in the backward, release after gradients of this many bytes of parameters are done.
        layers_between: in a forward with grad (the update pass), release after every this many decoder layers.
    """

    def __init__(self, enabled: bool, every: int = 64 * 2**20, layers_between: int = 5) -> None:
        self.trim = _malloc_trim() if enabled else None
        self.every = every
        self.layers_between = layers_between
        self.calls = 0
        self._done = 0

    def __call__(self) -> None:
        """Hand the heap's free pages back now."""
        if self.trim is not None:
            self.trim(0)
            self.calls += 1

    def watch_backward(self, model: torch.nn.Module) -> None:
        """Release inside every backward of ``model``: after each ``every`` bytes of parameters whose gradient
        is done (post-accumulate-grad hooks; registered after optimizer-in-backward's, they run after its
        step), and when the gradient reaches the input embedding's output."""
        if self.trim is None:
            return
        for param in model.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._count)
        layers = _decoder_layers(model)
        for layer in layers[self.layers_between - 1::self.layers_between]:
            layer.register_forward_hook(self._release_in_training_forward)
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embedding is None:
            return

        def hook_output(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(self._release_on_grad)

        embedding.register_forward_hook(hook_output)

    def _release_on_grad(self, grad: torch.Tensor) -> None:
        self()

    def _release_in_training_forward(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():  # not in generation, the behaviour pass or evaluation
            self()

    def _count(self, param: torch.Tensor) -> None:
        self._done += param.numel() * param.element_size()
        if self._done >= self.every:
            self._done = 0
            self()
