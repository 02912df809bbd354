"""Two processes, a NaN injected into one process's gradient at step 2 (run under accelerate launch).

Usage: python nan_grad.py OUT_DIR
Training uses the zclip gradient clipper (warm-up 2 steps). Each process writes
OUT_DIR/rank<R>.json with its skipped-step counts, its clipper thresholds,
whether its weights are finite, and a checksum of its weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    apply = Trainer._apply_gradients

    def poisoned(self, train_policy, policy_loss, critic_loss):
        if self.step == 2 and self.accelerator.process_index == 1:
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return apply(self, train_policy, policy_loss, critic_loss)

    Trainer._apply_gradients = poisoned
    trainer = Trainer(tiny_config(out / "run", "max_steps=6", "save_steps=0",
                                  "train.grad_clip={name: zclip, warmup_steps: 2, max_grad_norm: null}"))
    history = trainer.train()
    weights = [p.detach() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    report = {"skipped": [h["optim/skipped_steps"] for h in history],
              "thresholds": [h.get("grad/threshold") for h in history],
              "finite": all(bool(torch.isfinite(w).all()) for w in weights),
              "checksum": float(sum(w.double().sum() for w in weights))}
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
