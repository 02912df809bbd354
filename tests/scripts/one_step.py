"""One optimizer step on a fixed batch, for the invariance test (run alone or under a launcher).

Usage: python one_step.py OUT.pt MICRO_BATCH_SIZE [train] [key=value ...]
Each process takes its contiguous share of the same 4 sequences; rank 0 saves
the parameters after the step. With ``train`` it then also trains two steps in
GRPO mode and two in PPO mode and records the world size (the 2-process runs).
``key=value`` arguments are config overrides (e.g. ``objective.name=archer``);
the default objective is ratio_clip with eps_high 0.28 and dual clip 3.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402
from rlclip.trainer import Trainer  # noqa: E402
from rlclip.types import RolloutBatch  # noqa: E402


def fixed_rollout(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(123)
    prompt_ids = torch.randint(3, vocab, (4, 5), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(3, vocab, (4, 6), generator=g)
    lengths = torch.tensor([6, 2, 5, 1])
    completion_mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).long()
    advantages = torch.tensor([1.0, -1.5, 0.5, -0.7]).unsqueeze(1).expand(4, 6).clone()
    return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                        completion_mask=completion_mask, truncated=torch.tensor([False, False, True, False]),
                        prompts=["p"] * 4, completions=["c"] * 4, advantages=advantages)


def main() -> None:
    out, micro = sys.argv[1], int(sys.argv[2])
    extra = [a for a in sys.argv[3:] if "=" in a]
    train = "train" in sys.argv[3:]
    objective = extra or ["objective.eps_high=0.28", "objective.dual_clip=3.0"]
    tmp = Path(tempfile.mkdtemp())
    cfg = tiny_config(tmp, f"train.micro_batch_size={micro}", "train.optimizer=sgd", "train.learning_rate=0.5",
                      "train.max_grad_norm=0", *objective)
    trainer = Trainer(cfg)
    acc = trainer.accelerator
    rollout = fixed_rollout(trainer.tokenizer.vocab_size)
    # behaviour log-probs from a perturbed model state, so ratios differ from 1 and some tokens clip
    trainer.record_behaviour(rollout)
    rollout.old_logprobs = rollout.old_logprobs + torch.linspace(-0.4, 0.4, 24).view(4, 6)
    if rollout.ref_logprobs is not None:  # a reference away from the policy, so KL terms have gradients
        rollout.ref_logprobs = rollout.ref_logprobs + torch.linspace(0.6, -0.3, 24).view(4, 6)
    share = 4 // acc.num_processes
    local = rollout.select(torch.arange(acc.process_index * share, (acc.process_index + 1) * share))
    metrics = trainer.optimizer_step(local)
    if acc.is_main_process:
        params = {n: p.detach().cpu() for n, p in acc.unwrap_model(trainer.model).named_parameters()}
        torch.save({"params": params, "metrics": metrics}, out)
    if train:
        runs = {}
        for mode, extra in (("grpo", []), ("ppo", ["advantage.name=gae", "critic.learning_rate=1e-3"])):
            history = Trainer(tiny_config(tmp / mode, "max_steps=2", *extra)).train()
            runs[mode] = [h["step"] for h in history]
            if mode == "ppo":
                runs["ppo_explained_variance"] = history[-1]["critic/explained_variance"]
        if acc.is_main_process:
            Path(out).with_suffix(".json").write_text(json.dumps({"world_size": acc.num_processes, **runs}))


if __name__ == "__main__":
    main()
