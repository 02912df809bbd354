"""The first launch of tests/test_multinode.py: one process on each of two "machines" (loopback, gloo).

Usage, once per machine rank R in 0, 1 (both at once, the same OUT_DIR: the shared storage):
  accelerate launch --config_file recipes/accelerate/multi_gpu.yaml --num_processes 2 --num_machines 2
      --machine_rank R --main_process_ip 127.0.0.1 --main_process_port PORT --mixed_precision no
      multinode_run.py OUT_DIR
Writes into OUT_DIR (the global rank 0, on machine 0):
  step_default.pt   parameters and metrics after one step of ``one_step.CASES["default"]`` (2 processes x
                    micro-batch 2, the same global batch as the 1-process reference)
  train.json        world size, distributed type, this machine's rank, the steps of each run
  runs/straight/    a 4-step run (AdamW, one optimizer step per rollout), its final model
  runs/resumed/     the same run stopped after step 2 with checkpoint-2, which the test's second launch
                    (``rlclip train --resume_from_checkpoint latest`` on both machines) continues to step 4
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from one_step import step_once  # noqa: E402

from conftest import tiny_config  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402

# the run both launches train: AdamW (its state must come back on resume), one optimizer step per rollout
RUN = ["train.learning_rate=1e-2", "rollout.prompts_per_step=2", "train.micro_batch_size=4",
       "train.num_iterations=1", "train.mini_batches=1"]


def main() -> None:
    import faulthandler

    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where it waits instead of a bare timeout
    out = Path(sys.argv[1])
    step = step_once(2, "default")
    runs = {}
    for name, extra in (("straight", ["max_steps=4", "save_steps=0"]), ("first", ["max_steps=2", "save_steps=2"])):
        directory = out / "runs" / ("straight" if name == "straight" else "resumed")
        trainer = Trainer(tiny_config(directory, *RUN, *extra, "overwrite_output_dir=true"))
        runs[name] = [h["step"] for h in trainer.train()]
    acc = trainer.accelerator
    if acc.is_main_process:
        import torch

        torch.save(step, out / "step_default.pt")
        (out / "train.json").write_text(json.dumps({
            "world_size": acc.num_processes, "distributed": str(acc.distributed_type),
            "machine_rank": int(os.environ.get("GROUP_RANK", -1)), "local_rank": acc.local_process_index,
            **runs}))


if __name__ == "__main__":
    main()
