"""A run of the tiny recipe killed (SIGKILL) in the middle of a checkpoint save, for the kill test.

Usage: python interrupt_run.py OUT_DIR [OVERRIDE ...]
Trains the smoke recipe with the dotted OVERRIDEs (the test's: a checkpoint
before the last step and one at it) and SIGKILLs itself once the model of the
last step's checkpoint is written and the rest of that checkpoint is not.
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
    config = tiny_config(Path(sys.argv[1]), *sys.argv[2:])
    save_model = Trainer.save_model

    def saving(self, directory, model=None):
        save_model(self, directory, model)
        if self.step == config.max_steps and directory.name.startswith(".partial-"):
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer.save_model = saving
    Trainer(config).train()


if __name__ == "__main__":
    main()
