"""Runs of the tiny recipe for the signal and kill tests (each in its own process).

Usage: python interrupt_run.py OUT_DIR MODE
  plain         train 8 steps (save_steps 4); with RLCLIP_TEST_SIGTERM_AT=N the process
                sends itself SIGTERM right after optimizer step N
  resume        resume OUT_DIR from latest to 8 steps
  kill-in-save  train 8 steps and SIGKILL itself in the middle of the second checkpoint's save
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402


def main() -> int:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    overrides = ["max_steps=8", "save_steps=4"]
    if mode == "resume":
        overrides.append("resume_from_checkpoint=latest")
    sigterm_at = int(os.environ.get("RLCLIP_TEST_SIGTERM_AT", "0"))
    if sigterm_at:
        step = Trainer.optimizer_step

        def stepping(self, mini_batch):
            result = step(self, mini_batch)
            if self.step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        Trainer.optimizer_step = stepping
    if mode == "kill-in-save":
        save_model = Trainer.save_model

        def saving(self, directory, model=None):
            save_model(self, directory, model)
            if self.step == 8 and directory.name.startswith(".partial-"):
                os.kill(os.getpid(), signal.SIGKILL)  # the model is written, the rest of the checkpoint is not

        Trainer.save_model = saving
    config = tiny_config(out, *overrides)
    trainer = Trainer(config)
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
