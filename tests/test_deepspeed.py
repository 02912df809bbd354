"""The trainer under DeepSpeed ZeRO-2 and ZeRO-3, two CPU processes over gloo, against the 1-process step.

Each stage is one ``accelerate launch`` of the shipped config
(``recipes/accelerate/deepspeed_zero{2,3}.yaml``, fp32 on CPU) running
``tests/scripts/deepspeed_run.py``: one plain-SGD step of 4 fixed sequences
split 2 + 2 over the processes must move every parameter as the 1-process
step over all 4 does (to 1e-5), for ratio_clip and for archer (whose frozen
reference model is a second DeepSpeed engine under ZeRO-3); a 3-step run
and a 2-step run resumed from its DeepSpeed checkpoint to step 3 must end on
the same weights. Skipped where DeepSpeed is not installed.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.xdist_group("deepspeed")  # one worker launches both stages, one after the other
sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from one_step import step_once  # noqa: E402

step = functools.lru_cache(step_once)


@functools.lru_cache  # one launch per stage, however often pytest sets the module fixture up again
def launch(stage: int, out: str) -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"recipes/accelerate/deepspeed_zero{stage}.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(ROOT / "tests/scripts/deepspeed_run.py"), out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


STAGES = [2, 3]


@pytest.fixture(scope="module", params=STAGES, ids=[f"zero{stage}" for stage in STAGES])
def run(request, tmp_path_factory):
    out = os.path.join(tmp_path_factory.getbasetemp(), f"zero{request.param}")  # the same path each time
    os.makedirs(out, exist_ok=True)
    return request.param, launch(request.param, out)


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("case", ["default", "archer_response"])
def test_zero_step_matches_one_process(run, case):
    stage, out = run
    info = json.loads(open(os.path.join(out, "train.json")).read())
    assert info["stage"] == stage and info["world_size"] == 2 and info["distributed"] == "DistributedType.DEEPSPEED"
    reference = step(4, case)
    result = torch.load(os.path.join(out, f"step_{case}.pt"))
    assert_same(reference["params"], result["params"], atol=1e-5)
    assert result["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], abs=1e-6)


def test_zero_checkpoint_resume_lands_on_the_same_weights(run):
    _, out = run
    info = json.loads(open(os.path.join(out, "train.json")).read())
    assert info["straight"] == [1, 2, 3] and info["first"] == [1, 2] and info["resumed"] == [3]
    assert info["saved"]
    straight, resumed = torch.load(os.path.join(out, "straight.pt")), torch.load(os.path.join(out, "resumed.pt"))
    assert_same(straight, resumed, atol=1e-6)
