"""Everything the suite checks across two processes, in one ``accelerate launch --multi_gpu`` run.

Usage: accelerate launch --multi_gpu --num_processes 2 two_process.py OUT_DIR
One launch instead of one per check: each process start imports torch,
transformers and accelerate, which costs far more than the checks themselves.
Writes into OUT_DIR:
  step_<case>.pt     parameters and metrics after one step of each ``one_step.CASES`` case (rank 0)
  train.json         world size, GRPO and PPO step numbers, PPO explained variance (rank 0)
  nan_rank<R>.json   the NaN-gradient report of each rank (``nan_grad.py``)
  sharded_rank<R>.json  clipper norms on DTensor gradients of each rank (``sharded_norms.py``)
  compare/           ``rlclip compare`` of ratio_clip x seeds 0,1 (5 held-out problems: 3 on rank 0, 2 on rank 1)
  correction_rank0.pt  rank 0's rollout correction (SNIS, every rejection criterion) of its half of a fixed batch
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nan_grad import nan_grad_report  # noqa: E402
from one_step import CASES, correction_once, step_once, train_two_modes  # noqa: E402
from sharded_norms import sharded_norms  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    results = {case: step_once(2, case) for case in CASES}
    from accelerate import Accelerator

    from rlclip.utils import ProcessReducer

    corrected = correction_once(ProcessReducer(Accelerator()))
    runs = train_two_modes()
    nan_report = nan_grad_report(out / "nan_run")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    sharded = sharded_norms()
    from rlclip.compare import main as compare

    recipe = Path(__file__).resolve().parents[2] / "recipes/smoke/tiny.yaml"
    compare(["--config", str(recipe), "--objectives", "ratio_clip", "--seeds", "0,1", f"--output_dir={out / 'compare'}",
             "--max_steps=2", "--eval.limit=5", "--eval.max_new_tokens=4", "--logging.progress_bar=false",
             "--rollout.prompts_per_step=2", "--rollout.max_new_tokens=8"])
    (out / f"nan_rank{rank}.json").write_text(json.dumps(nan_report))
    (out / f"sharded_rank{rank}.json").write_text(json.dumps(sharded))
    if rank == 0:
        for case, result in results.items():
            torch.save(result, out / f"step_{case}.pt")
        (out / "train.json").write_text(json.dumps({"world_size": world, **runs}))
        torch.save(corrected, out / "correction_rank0.pt")


if __name__ == "__main__":
    main()
