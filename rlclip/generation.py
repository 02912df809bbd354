"""Generation backends (``rollout.backend``): who samples a rollout's completions.

- ``hf``: rlclip's decoding loop on the training model itself (:func:`rlclip.rollout.sample_completions`).
- ``vllm_colocate``: a vLLM engine inside each training process, on its GPU.
- ``vllm_server``: a vLLM server of its own (``trl vllm-serve --model ...``), the
  main process sends every process's prompts and hands each its share back.

The vLLM backends drive TRL 1.16's engine wrapper
(``trl.generation.vllm_generation.VLLMGeneration``): its colocated ``vllm.LLM``
(built with ``logprobs_mode="processed_logprobs"``, so that the returned
log-probs are of the temperature-scaled distribution the tokens were drawn
from), its server client (``VLLMClient``) and its weight sync
(``sync_weights``: a PEFT adapter is merged for the copy and unmerged after,
names are cleaned of ``base_model.model.`` and ``.base_layer``, LoRA tensors
are skipped; DeepSpeed ZeRO-3 and FSDP parameters are gathered; the prefix
cache is reset). rlclip adds the bookkeeping: the trainer calls
:meth:`Generator.policy_changed` after every optimizer step that moved the
policy, and the weights are copied once, lazily, before the next generation.

Every backend returns the fields of ``sample_completions``, ``RolloutBatch.sampler_logprobs``
included: log mu(a_t) of each sampled token under the distribution it was drawn
from (hf: rlclip/decoding.py's loop records it; vLLM: its processed log-probs),
which the trainer turns into importance-sampling weights (rlclip/is_correction.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from rlclip.config import TrainConfig, check_backend_installed
from rlclip.errors import ConfigError
from rlclip.modeling import GRADIENT_CHECKPOINTING_KWARGS, resolve_model_path
from rlclip.rollout import (
    SamplingSettings,
    completion_mask_and_truncation,
    eos_ids,
    prompt_texts,
    sample_completions,
)
from rlclip.types import RolloutBatch

PROCESSED_LOGPROBS = "processed_logprobs"


class Generator(Protocol):
    """What the trainer needs from a backend."""

    corrects: bool
    """True when another engine samples (not the training model); every backend fills
    ``RolloutBatch.sampler_logprobs``."""

    def generate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
                 settings: SamplingSettings) -> RolloutBatch:
        """``settings.group_size`` completions for each record's ``prompt``."""

    def policy_changed(self) -> None:
        """The policy's weights moved (an optimizer step); the sampler's copy is stale."""

    def close(self) -> None:
        """Training ended: release what the backend started (a launched server)."""


def build_generator(config: TrainConfig, accelerator: Accelerator) -> Generator:
    """The backend of ``config.rollout.backend``; a vLLM one without vllm installed is a one-line ConfigError.

    Nothing heavy happens here: the vLLM engine starts at the first generation.
    """
    backend = config.rollout.backend
    if backend == "hf":
        # a compiled decoding step cannot take the packed weights' oneDNN tensors (inductor's lowering fails)
        prepack = config.rollout.prepack_weights and config.model.compile not in ("decode", "all")
        return HFGenerator(accelerator, config.lora.merge_for_decoding, prepack)
    check_backend_installed(backend)
    if config.model.gguf_file:
        raise ConfigError(f"rollout.backend={backend} cannot load model.gguf_file; use rollout.backend: hf or "
                          "convert the model to safetensors")
    return VLLMGenerator(config, accelerator)


class HFGenerator:
    """rlclip's decoding loop on the training model (unwrapped for generation, back in train mode after); its
    rollouts carry the loop's own log mu(a_t) in ``sampler_logprobs``."""

    corrects = False

    def __init__(self, accelerator: Accelerator, merge_lora: bool = True, prepack: bool = True) -> None:
        self.accelerator = accelerator
        self.merge_lora = merge_lora
        """``lora.merge_for_decoding``: a LoRA policy decodes with its adapters merged (rlclip/lora_decoding.py)."""
        self.prepack = prepack
        """``rollout.prepack_weights``: decode from oneDNN-packed weights on CPU (rlclip/packed_linear.py)."""

    def generate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
                 settings: SamplingSettings) -> RolloutBatch:
        from rlclip.lora_decoding import merged_for_decoding
        from rlclip.packed_linear import packed_for_decoding

        whole = holds_whole_weights(self.accelerator)
        with unwrap_model_for_generation(model, self.accelerator,
                                         gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS) as policy:
            policy.eval()
            rows = len(records) * settings.group_size if self.prepack and whole else None
            with merged_for_decoding(policy, self.merge_lora and whole, pack_rows=rows), \
                    packed_for_decoding(policy, rows):
                rollout = sample_completions(policy, tokenizer, records, settings, self.accelerator.device)
        model.train()
        return rollout

    def policy_changed(self) -> None:
        """The training model samples itself: nothing to copy."""

    def close(self) -> None:
        """Nothing was started."""


class VLLMGenerator:
    """vLLM sampling through TRL's ``VLLMGeneration``, with lazy weight sync and the sampler's log-probs.

    The engine starts at the first :meth:`generate` (its vLLM copy loads
    ``name_or_path`` itself, so it equals the initial policy: no sync then).
    A resumed run has other weights: the trainer calls :meth:`policy_changed`
    after loading them.
    """

    corrects = True

    def __init__(self, config: TrainConfig, accelerator: Accelerator) -> None:
        self.config = config
        self.accelerator = accelerator
        self.mode = config.rollout.backend.removeprefix("vllm_")
        self.engine: Any = None
        self.stale = False
        self.syncs = 0
        """Weight copies made so far (for tests and logs)."""
        self.server: Any = None
        """The vLLM server this generator launched (``rollout.vllm_server_launch``), stopped by :meth:`close`."""

    def policy_changed(self) -> None:
        self.stale = True

    def sync(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
             settings: SamplingSettings) -> Any:
        """Build the engine on first use and copy the weights if the policy moved; returns the engine.

        Called by :meth:`generate`, and by the trainer in its own thread before a generation it runs in the
        background (rlclip/staleness.py), so that the copy never overlaps an update or a generation.
        """
        engine = self._engine(model, tokenizer, settings, len(records) * settings.group_size)
        engine.seeds = completion_seeds(len(records), settings.group_size)
        if self.stale:
            engine.sync_weights()  # every process takes part: gathering sharded parameters is collective
            self.stale = False
            self.syncs += 1
        return engine

    def generate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
                 settings: SamplingSettings) -> RolloutBatch:
        return self.sample(self.sync(model, tokenizer, records, settings), model, tokenizer, records, settings)

    def sample(self, engine: Any, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]],
               settings: SamplingSettings) -> RolloutBatch:
        """Sample on ``engine`` as it is (no weight copy: :meth:`sync` made it; safe in a background thread)."""
        prompt_ids, prompt_mask, overflow = encode_prompts(tokenizer, [r["prompt"] for r in records], settings)
        prompt_ids = prompt_ids.repeat_interleave(settings.group_size, dim=0)  # [B, P]
        prompt_mask = prompt_mask.repeat_interleave(settings.group_size, dim=0)  # [B, P]
        stop_ids = eos_ids(self.accelerator.unwrap_model(model), tokenizer)
        self._set_sampling(engine, settings, stop_ids)
        # one entry per completion, each prompt repeated group_size times: the layout both of TRL's modes expect
        unpadded = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
        _, completions, logprobs, _ = engine.generate(unpadded, None, settings.group_size)
        if logprobs is None:
            raise RuntimeError("the vLLM engine returned no log-probs; it must be asked for logprobs=0 "
                               "(a vllm_server must run with --logprobs-mode processed_logprobs)")
        return self._batch(tokenizer, records, settings, prompt_ids, prompt_mask, completions, logprobs,
                           stop_ids, overflow)

    def _engine(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, settings: SamplingSettings,
                completions: int) -> Any:
        """TRL's ``VLLMGeneration`` for this model, built on first use."""
        # TRL's weight iteration walks the unwrapped model, except under FSDP where it summons the wrapped one's
        policy = model if self.accelerator.distributed_type == DistributedType.FSDP else \
            self.accelerator.unwrap_model(model)
        if self.engine is None:
            context = None if settings.max_prompt_length is None else \
                settings.max_prompt_length + settings.max_new_tokens
            self.engine = self._build_engine(policy, tokenizer, context, completions)
        self.engine.model = policy
        return self.engine

    def _build_engine(self, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, context: int | None,
                      completions: int) -> Any:
        """The engine; ``context`` bounds vLLM's sequence length (prompt + completion), None: the model's."""
        r = self.config.rollout
        if self.mode == "server" and server_api(r) == "openai":
            return self._openai_server(policy, tokenizer, context)
        from trl.generation.vllm_generation import VLLMGeneration

        settings = dict(
            model=policy, accelerator=self.accelerator, processing_class=tokenizer, mode=self.mode,
            server_host=r.vllm_server_host, server_port=r.vllm_server_port, server_timeout=r.vllm_server_timeout,
            tensor_parallel_size=r.vllm_tensor_parallel_size, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            max_model_length=context, max_num_seqs=completions * r.vllm_tensor_parallel_size,
            trust_remote_code=self.config.model.trust_remote_code, max_completion_length=r.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only: all the IS correction needs
        )
        from rlclip import vllm_engine  # imports vllm: only for a vLLM backend

        with kept_rng_state():  # vLLM seeds the global generators; the run's own seed must keep driving sampling
            if self.mode == "colocate":
                engine = vllm_engine.ColocatedEngine(dtype=next(policy.parameters()).dtype, **settings)
            else:
                engine = VLLMGeneration(**settings)
        if self.mode == "server" and self.accelerator.is_main_process:
            self._check_server_logprobs(engine.vllm_client.get_server_info())
        return engine

    def _openai_server(self, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, context: int | None) -> Any:
        """vLLM's OpenAI server (rlclip/vllm_server.py), started here with ``vllm_server_launch``."""
        from rlclip.vllm_server import OpenAIServerEngine, ServerProcess

        r, acc = self.config.rollout, self.accelerator
        url = f"http://{r.vllm_server_host}:{r.vllm_server_port}"
        if r.vllm_server_launch and acc.is_main_process:
            dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
            self.server = ServerProcess(resolve_model_path(self.config.model.name_or_path), r.vllm_server_host,
                                        r.vllm_server_port,
                                        dtype, context, r.vllm_server_timeout,
                                        Path(self.config.output_dir) / "vllm_server.log",
                                        context or policy.config.max_position_embeddings,
                                        r.vllm_gpu_memory_utilization)
            self.server.wait_ready()
        acc.wait_for_everyone()
        engine = OpenAIServerEngine(url=url, model=policy, accelerator=acc, processing_class=tokenizer,
                                    server_timeout=r.vllm_server_timeout, max_completion_length=r.max_new_tokens,
                                    trust_remote_code=self.config.model.trust_remote_code)
        if acc.is_main_process:
            self._check_server_logprobs({"model_config": {"logprobs_mode": engine.logprobs_mode()}})
        return engine

    def close(self) -> None:
        """Training ended: stop a server this generator launched."""
        if self.server is not None:
            self.server.close()
            self.server = None

    def _check_server_logprobs(self, info: dict[str, Any]) -> None:
        """A server returning raw log-probs would bias the IS ratios at temperature != 1: refuse it."""
        if self.config.rollout.is_mode == "none":
            return
        mode = info.get("model_config", {}).get("logprobs_mode", PROCESSED_LOGPROBS)
        if mode != PROCESSED_LOGPROBS:
            raise ConfigError(f"the vLLM server returns logprobs_mode={mode}, which biases the importance-sampling "
                              "correction; restart it with --logprobs-mode processed_logprobs (trl vllm-serve does), "
                              "or set rollout.is_mode: none")

    @staticmethod
    def _set_sampling(engine: Any, settings: SamplingSettings, stop_ids: list[int]) -> None:
        """This rollout's decoding settings on the engine (TRL reads them at each ``generate``)."""
        engine.temperature = settings.temperature  # 0: greedy in vLLM too
        engine.top_p, engine.top_k = settings.top_p, settings.top_k  # top_k 0: off in vLLM too
        engine.max_completion_length = settings.max_new_tokens
        extra: dict[str, Any] = {"stop_token_ids": stop_ids}  # the same stops as the hf backend
        if settings.min_new_tokens:
            extra["min_tokens"] = settings.min_new_tokens
        engine.generation_kwargs = extra

    def _batch(self, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, Any]], settings: SamplingSettings,
               prompt_ids: Tensor, prompt_mask: Tensor, completions: list[list[int]],
               logprobs: list[list[list[float | None]]], stop_ids: list[int], overflow: int) -> RolloutBatch:
        """The RolloutBatch of ``sample_completions`` from vLLM's token lists, plus the sampler's log-probs."""
        device = self.accelerator.device
        completion_ids, length_mask = pad_right(completions, tokenizer.pad_token_id)  # [B, T]
        sampler = sampled_logprobs(logprobs, completion_ids.shape[1])  # [B, T]
        mask, truncated = completion_mask_and_truncation(completion_ids, stop_ids)
        mask = mask * length_mask  # [B, T] vLLM stops each row on its own: nothing past a row's end counts
        completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)  # [B, T]
        sampler = sampler.masked_fill(mask == 0, 0.0)  # [B, T]
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [r["prompt"] for r in records]
        chat = bool(prompts) and is_conversational({"prompt": prompts[0]})
        group = settings.group_size
        return RolloutBatch(
            prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
            completion_ids=completion_ids.to(device), completion_mask=mask.to(device), truncated=truncated.to(device),
            prompts=[p for p in prompts for _ in range(group)],
            completions=[[{"role": "assistant", "content": t}] for t in texts] if chat else texts,
            columns={k: [r[k] for r in records for _ in range(group)] for k in records[0] if k != "prompt"},
            prompts_truncated=overflow, sampler_logprobs=sampler.to(device),
        )


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Any],
                   settings: SamplingSettings) -> tuple[Tensor, Tensor, int]:
    """Left-padded prompt ids and mask ``[n, P]`` as the hf backend makes them, and how many were cut.

    Prompts longer than ``settings.max_prompt_length`` keep their end (as ``sample_completions``).
    """
    tokenizer.padding_side = "left"
    enc = tokenizer(prompt_texts(prompts, tokenizer), return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # [n, P]
    limit = settings.max_prompt_length
    if limit is None or ids.shape[1] <= limit:
        return ids, mask, 0
    return ids[:, -limit:], mask[:, -limit:], int((mask.sum(-1) > limit).sum())


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``[B, T]`` ids right-padded with ``pad_id`` (T: the longest row, at least 1) and the mask of real ids."""
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    real = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        real[i, :len(row)] = 1
    return ids, real


def sampled_logprobs(logprobs: list[list[list[float | None]]], width: int) -> Tensor:
    """``[B, T]`` float32 from vLLM's per-token lists (entry 0: the sampled token), right-padded with 0.

    A log-prob vLLM could not give (None, from NaN) becomes NaN: the IS correction gives that token ratio 1.
    """
    out = torch.zeros((len(logprobs), width), dtype=torch.float32)  # [B, T]
    for i, seq in enumerate(logprobs):
        values = [float("nan") if not lp or lp[0] is None else float(lp[0]) for lp in seq[:width]]
        out[i, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def holds_whole_weights(accelerator: Accelerator) -> bool:
    """Each process holds every weight whole (not FSDP, not DeepSpeed ZeRO-3 shards)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return False
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is None or plugin.zero_stage != 3


def server_api(rollout: Any) -> str:
    """``rollout.vllm_server_api`` resolved: ``auto`` is trl where CUDA is (NCCL weight copies), openai elsewhere
    and whenever rlclip launches the server itself."""
    from rlclip import vllm_engine  # imports vllm: only for a vLLM backend

    if rollout.vllm_server_api != "auto":
        return rollout.vllm_server_api
    return "openai" if rollout.vllm_server_launch or vllm_engine.on_cpu() else "trl"


def completion_seeds(prompts: int, group_size: int) -> list[int]:
    """One vLLM seed per completion, drawn from the run's torch generator (so a checkpoint carries them):
    prompt i draws s_i, its completions take s_i + j, j < group_size (what vLLM gives the children of one
    seeded request with ``n = group_size``, so that both vLLM backends sample alike)."""
    base = torch.randint(0, 2**31 - 1 - group_size, (prompts,)).tolist()
    return [s + j for s in base for j in range(group_size)]


@contextmanager
def kept_rng_state() -> Iterator[None]:
    """Restore the Python, NumPy, torch CPU and CUDA generators on exit (vLLM reseeds them at start-up)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
