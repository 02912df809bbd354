"""A run of the tiny recipe killed (SIGKILL) in the middle of a checkpoint save, for the kill test.

Usage: python interrupt_run.py OUT_DIR
Trains 8 steps with save_steps 4 and SIGKILLs itself once the model of the
second checkpoint is written and the rest of that checkpoint is not.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    save_model = Trainer.save_model

    def saving(self, directory, model=None):
        save_model(self, directory, model)
        if self.step == 8 and directory.name.startswith(".partial-"):
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.save_model = saving
    Trainer(tiny_config(out, "max_steps=8", "save_steps=4")).train()


if __name__ == "__main__":
    main()
