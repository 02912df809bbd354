"""A NaN injected into one process's gradient at step 2 (run by ``two_process.py``).

Training uses the zclip gradient clipper (warm-up 2 steps). The report holds
this process's skipped-step counts, its clipper thresholds, whether its weights
are finite, and a checksum of its weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402


def nan_grad_report(out: Path) -> dict:
    apply = Trainer._apply_gradients

    def poisoned(self, train_policy, policy_loss, critic_loss):
        if self.step == 2 and self.accelerator.process_index == 1:
            next(p for p in self.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return apply(self, train_policy, policy_loss, critic_loss)

    Trainer._apply_gradients = poisoned
    try:
        trainer = Trainer(tiny_config(out, "max_steps=6", "save_steps=0",
                                      "train.grad_clip={name: zclip, warmup_steps: 2, max_grad_norm: null}"))
        history = trainer.train()
    finally:
        Trainer._apply_gradients = apply
    weights = [p.detach() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    return {"skipped": [h["optim/skipped_steps"] for h in history],
            "thresholds": [h.get("grad/threshold") for h in history],
            "finite": all(bool(torch.isfinite(w).all()) for w in weights),
            "checksum": float(sum(w.double().sum() for w in weights))}
