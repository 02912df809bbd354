"""A NaN injected into one process's gradient at step 2 (run by ``two_process.py``).

Training uses the zclip gradient clipper (warm-up 2 steps), on small rollouts
(2 prompts x 4 completions of up to 8 tokens per process, four optimizer steps
each) rewarded densely (the fraction of digits), so that every step has a
gradient: the smoke recipe's reward for a "7" is zero on nearly every completion
of a rollout this small, and so are the advantages and the gradient norms that
the clipper's thresholds come from. The report holds
this process's skipped-step counts, its clipper thresholds, whether its weights
are finite, and a checksum of its weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402
from rlclip.gradient_step import GradientStep  # noqa: E402
from rlclip.rewards.math_rewards import completion_text  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402


def digit_fraction(prompts, completions, **kwargs):
    """A dense reward: the fraction of a completion's characters that are digits."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def nan_grad_report(out: Path) -> dict:
    apply = GradientStep.apply

    def poisoned(self, step, model, critic, train_policy, policy_loss, critic_loss):
        if step == 2 and PartialState().process_index == 1:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return apply(self, step, model, critic, train_policy, policy_loss, critic_loss)

    GradientStep.apply = poisoned
    try:
        trainer = Trainer(tiny_config(out, "max_steps=6", "save_steps=0",
                                      "train.grad_clip={name: zclip, warmup_steps: 2, max_grad_norm: null}",
                                      "rollout.prompts_per_step=2", "rollout.group_size=4",
                                      "rollout.max_new_tokens=8"), reward_funcs=[digit_fraction])
        history = trainer.train()
    finally:
        GradientStep.apply = apply
    weights = [p.detach() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()]
    return {"skipped": [h["optim/skipped_steps"] for h in history],
            "thresholds": [h.get("grad/threshold") for h in history],
            "finite": all(bool(torch.isfinite(w).all()) for w in weights),
            "checksum": float(sum(w.double().sum() for w in weights))}
