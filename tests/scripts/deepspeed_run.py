"""The trainer under DeepSpeed ZeRO on two CPU processes (gloo), for tests/test_deepspeed.py.

Usage: accelerate launch --config_file recipes/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2
       --mixed_precision no deepspeed_run.py OUT_DIR
Writes into OUT_DIR (rank 0):
  step_<case>.pt   parameters and metrics after one step of ``one_step.CASES[case]`` (2 processes x micro-batch 2,
                   the same global batch as the 1-process reference)
  train.json       the stage, world size, the steps of a 3-step run and of a 2-step run resumed to 3
  straight.pt / resumed.pt   the parameters after those two runs (a resume must land on the same weights)
"""

from __future__ import annotations

import sys
from pathlib import Path

# DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce (a C++ build of minutes on
# 2 cores) that only its inference path uses; marking the op unavailable keeps plain gloo collectives.
import deepspeed.ops  # noqa: E402

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from one_step import resume_runs, step_once, write_launch_results  # noqa: E402

CASES = ("default", "archer_response")  # archer: a frozen reference model beside the engine


def main() -> None:
    out = Path(sys.argv[1])
    results = {case: step_once(2, case) for case in CASES}
    shared = out / "runs"  # one path on both ranks, and its own for each launch
    runs = resume_runs(shared)
    write_launch_results(out, results, runs, stage=runs["trainer"].layout.zero_stage,
                         saved=(shared / "straight" / "model.safetensors").exists())


if __name__ == "__main__":
    main()
