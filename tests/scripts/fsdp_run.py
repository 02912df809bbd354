"""The trainer under FSDP2 (rlclip's own ``fully_shard``) on two CPU processes (gloo), for tests/test_fsdp.py.

Usage: accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no
       fsdp_run.py OUT_DIR
Writes into OUT_DIR (rank 0):
  step_<case>.pt   parameters (gathered to full tensors) and metrics after one step of ``one_step.CASES[case]``
                   (2 processes x micro-batch 2, the same global batch as the 1-process reference)
  train.json       the layout, world size, the steps of a 3-step run and of a 2-step run resumed to 3, the
                   completion lengths of a generation that ends at a different length on each process
  straight.pt / resumed.pt   the parameters after those two runs (a resume must land on the same weights)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from one_step import resume_runs, step_once, write_launch_results  # noqa: E402

from rlclip.fsdp import is_sharded  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402

CASES = ("default", "archer_response", "lora_archer")  # archer: a frozen reference model, sharded too;
# lora_archer: the PEFT wrapper around the sharded model, the adapter switched off for the reference


def uneven_generation(trainer: Trainer) -> list[int]:
    """Each process's completion length when process r stops after 2 + 4r tokens: without ``synced_gpus``
    the process that ends first stops all-gathering and the other hangs."""
    from accelerate.utils import gather_object

    from rlclip.rollout import SamplingSettings

    acc = trainer.accelerator
    settings = SamplingSettings(group_size=2, max_new_tokens=2 + 4 * acc.process_index)
    rollout = trainer.generator.generate(trainer.model, trainer.tokenizer, trainer.records[:1], settings)
    return gather_object([rollout.completion_ids.shape[1]])


def main() -> None:
    import faulthandler

    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where it waits instead of a bare timeout
    out = Path(sys.argv[1])
    results = {case: step_once(2, case) for case in CASES}
    shared = out / "runs"  # one path on both ranks, and its own for each launch
    runs = resume_runs(shared)
    trainer = runs["trainer"]
    lengths = uneven_generation(trainer)  # collective: every process
    write_launch_results(out, results, runs, fsdp=trainer.layout.fsdp is not None, sharded=is_sharded(trainer.model),
                         generated_lengths=lengths, model=str(shared / "straight" / "model.safetensors"),
                         checkpoint_shards=sorted(p.name for p in (shared / "resumed" / "checkpoint-2" / "state"
                                                                   / "fsdp").iterdir()))
    faulthandler.cancel_dump_traceback_later()
    # tear the process group down before the interpreter exits: a live gloo group's threads at exit can abort
    # the process ("terminate called without an active exception") after every result is written
    trainer.accelerator.wait_for_everyone()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
