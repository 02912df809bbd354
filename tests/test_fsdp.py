"""The trainer under FSDP2 (its own ``fully_shard``), two CPU processes over gloo, against the 1-process step.

One ``accelerate launch`` of the shipped config (``recipes/accelerate/fsdp.yaml``,
fp32 on CPU) runs ``tests/scripts/fsdp_run.py``: one plain-SGD step of 4
fixed sequences split 2 + 2 over the processes must move every parameter
(gathered from its shards) as the 1-process step over all 4 does (to 1e-5),
for ratio_clip, for archer (whose frozen reference model is sharded too) and
for archer with LoRA (the PEFT wrapper around the sharded model);
a 3-step AdamW run and a 2-step run resumed from its DCP checkpoint to step 3
must end on the same weights, and the final model must be a whole
``model.safetensors`` equal to the gathered parameters. A generation that
ends at a different length on each process must finish (``synced_gpus``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port

pytestmark = pytest.mark.xdist_group("fsdp")
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from one_step import step_once  # noqa: E402

step = functools.lru_cache(step_once)


def launch(out: Path) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes/accelerate/fsdp.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(ROOT / "tests/scripts/fsdp_run.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One launch, shared by every test here (the xdist_group mark keeps them on one worker)."""
    out = tmp_path_factory.mktemp("fsdp")
    launch(out)
    return str(out), json.loads((out / "train.json").read_text())


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_fsdp_launch_shards_the_model_itself(run):
    _, info = run
    # accelerate keeps FSDP off on CPU (MULTI_CPU); the trainer's own fully_shard is in force
    assert info["fsdp"] and info["sharded"] and info["world_size"] == 2
    assert info["distributed"] == "DistributedType.MULTI_CPU"


@pytest.mark.parametrize("case", ["default", "archer_response", "lora_archer"])
def test_fsdp_step_matches_one_process(run, case):
    out, _ = run
    reference = step(4, case)
    result = torch.load(os.path.join(out, f"step_{case}.pt"))
    assert_same(reference["params"], result["params"], atol=1e-5)
    assert result["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], abs=1e-6)
    # the gradient norm reduced over DTensor shards (rlclip's clipper) is the whole gradient's
    assert result["metrics"]["optim/grad_norm"] == pytest.approx(reference["metrics"]["optim/grad_norm"], rel=1e-5)


def test_fsdp_checkpoint_resume_lands_on_the_same_weights(run):
    out, info = run
    assert info["straight"] == [1, 2, 3] and info["first"] == [1, 2] and info["resumed"] == [3]
    assert info["checkpoint_shards"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # DCP, one file a process
    straight, resumed = torch.load(os.path.join(out, "straight.pt")), torch.load(os.path.join(out, "resumed.pt"))
    assert_same(straight, resumed, atol=1e-6)


def test_fsdp_final_model_is_whole_and_loads(run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, info = run
    straight = torch.load(os.path.join(out, "straight.pt"))
    assert load_file(info["model"]).keys() == straight.keys()  # gathered, the tied output layer written once
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(info["model"]))
    assert_same({n: p.detach() for n, p in model.named_parameters()}, straight, atol=0)


def test_fsdp_generation_of_uneven_lengths_finishes(run):
    _, info = run
    assert info["generated_lengths"] == [2, 6]  # process 0 stopped first and kept stepping with process 1
