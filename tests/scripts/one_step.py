"""One optimizer step on a fixed batch, for the micro-batch and process-count invariance tests.

``step_once`` runs in the test process (1 process, micro-batch 4 or 1) and in
``two_process.py`` (2 processes x micro-batch 2). Each process takes its
contiguous share of the same 4 sequences. ``CASES`` are the settings compared:
ratio_clip with eps_high 0.28 and dual clip 3 (``default``), and the objectives
whose statistics span the optimizer step.
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

CASES = {
    "default": ["objective.eps_high=0.28", "objective.dual_clip=3.0"],
    # archer with strong per-class KL terms: step-wide class counts (and the batch quantile)
    "archer_response": ["objective.name=archer", "objective.kl_knowledge=1.0", "objective.kl_reasoning=0.5"],
    "archer_batch": ["objective.name=archer", "objective.kl_knowledge=1.0", "objective.kl_reasoning=0.5",
                     "objective.threshold=batch"],
    # covariance over the step, and every token filter (a step-wide entropy quantile, truncated rows out
    # of the denominators, off-policy sequences)
    "clip_cov_filters": ["objective.name=clip_cov", "objective.clip_cov_ratio=0.2", "objective.clip_cov_lb=-1.0",
                         "objective.entropy_top_quantile=0.5", "objective.mask_truncated=true",
                         "objective.off_policy_mask=0.05"],
    "kl_cov": ["objective.name=kl_cov", "objective.kl_cov_ratio=0.2"],
    # the entropy bonus over the step's filtered tokens (its count comes from the step statistics)
    "entropy_bonus": ["entropy.coef=0.3", "objective.entropy_top_quantile=0.5", "objective.mask_truncated=true"],
    # M2PO's mask: the largest squared log-ratios of the whole step until the rest's mean is below the threshold
    "m2po": ["objective.m2_threshold=0.02"],
    # BAPO's bounds are searched over the whole step (sums over every micro-batch and process): c_low runs to
    # 0.8 and c_high stops at 1.32 inside its range; a micro-batch of only positive advantages alone keeps 0.6 / 1.2
    "bapo": ["objective.name=bapo", "objective.adv_ratio_target=2.45", "objective.ratio_upper_step=0.02"],
    # penalty surrogates (a small eps / large weights so the penalties move the step) and TOPR's sequence ratio
    "spo": ["objective.name=spo", "objective.eps=0.05"],
    "dro": ["objective.name=dro", "objective.beta=0.5"],
    "dppo_kimi": ["objective.name=dppo_kimi", "objective.kl_tau=0.1", "objective.eps_low=1e-4",
                  "objective.eps_high=1e-4"],
    "topr": ["objective.name=topr", "objective.agg=seq_mean_token_sum"],
    # CE-GPPO: narrow clips so that tokens clipped on both sides keep their bounded gradients
    "gppo": ["objective.eps_low=0.1", "objective.eps_high=0.1", "objective.gppo_beta_low=0.25",
             "objective.gppo_beta_high=1.0", "objective.dual_clip=3.0"],
    # ASPO: per-response entropy split and soft dual clips low enough to act on the perturbed ratios
    "aspo": ["objective.name=aspo", "objective.dual_clip_neg=1.2", "objective.dual_clip_pos=1.2"],
    # DCPO: per-token bounds from the old probability, small constants so that some bounds bind
    "dcpo": ["objective.name=dcpo", "objective.eps_low=1e-3", "objective.eps_high=1e-3"],
    # token_sum has no denominator; prompt_mean needs each prompt group's token count over the step (rows 0-1
    # and 2-3 are two prompts: split by micro-batch 1, one per process with 2); k3_plus / abs KL terms
    "token_sum": ["objective.agg=token_sum", "objective.kl_coef=0.5", "objective.kl_estimator=k3_plus"],
    "prompt_mean": ["objective.agg=prompt_mean", "objective.kl_coef=0.5", "objective.kl_estimator=abs",
                    "objective.mask_truncated=true"],
}

# Rollout correction over the global batch: SNIS and every rejection criterion (tests/test_distributed.py)
CORRECTION_CASES = {
    "token_truncate": {"mode": "token_truncate", "cap": 1.6, "floor": 0.7},
    "sequence_mask": {"mode": "sequence_mask", "cap": 3.0, "floor": 0.4},
}
REJECTION = [{"metric": "token_k1", "upper": 0.5}, {"metric": "token_k2", "upper": 0.2},
             {"metric": "token_k3", "upper": 0.25}, {"metric": "seq_sum_k1", "upper": 1.0},
             {"metric": "seq_sum_k2", "upper": 0.6}, {"metric": "seq_sum_k3", "upper": 0.7},
             {"metric": "seq_mean_k1", "upper": 0.3}, {"metric": "seq_mean_k2", "upper": 0.15},
             {"metric": "seq_mean_k3", "upper": 0.2}, {"metric": "seq_max_k2", "upper": 0.4},
             {"metric": "seq_max_k3", "upper": 0.5}]


def correction_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log pi_prox, log mu and the mask ``[8, 6]`` of a fixed batch whose weights and statistics differ by row."""
    g = torch.Generator().manual_seed(7)
    prox = -torch.rand(8, 6, generator=g, dtype=torch.float64) * 2
    sampler = prox + torch.randn(8, 6, generator=g, dtype=torch.float64) * 0.5
    lengths = torch.tensor([6, 2, 5, 1, 4, 6, 3, 5])
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).double()
    return prox, sampler, mask


def correction_once(reduce) -> dict:
    """Each process's contiguous share of ``correction_batch``, corrected with statistics over ``reduce``."""
    from rlclip.is_correction import rollout_correction

    rank, world = (0, 1) if reduce is None else (reduce.accelerator.process_index, reduce.accelerator.num_processes)
    share = 8 // world
    rows = slice(rank * share, (rank + 1) * share)
    prox, sampler, mask = (t[rows] for t in correction_batch())
    out = {}
    for name, case in CORRECTION_CASES.items():
        weights, keep, metrics = rollout_correction(prox, sampler, mask, batch_normalize=True, rejection=REJECTION,
                                                    reduce=reduce, **case)
        out[name] = {"weights": weights, "keep": keep, "metrics": metrics}
    return out

# compared only under sharding (tests/test_fsdp.py), not in the DDP sweep over CASES: LoRA (the PEFT
# wrapper around the sharded model; its reference is the model with the adapter off)
EXTRA_CASES = {"lora_archer": [*CASES["archer_response"], "lora.enabled=true"]}


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
                        prompts=["p"] * 4, completions=["c"] * 4, advantages=advantages,
                        group_ids=torch.tensor([0, 0, 1, 1]))


def step_once(micro: int, case: str) -> dict:
    """One plain-SGD step (no clipping, so any loss-normalisation error shows in the update) of ``case``;
    returns this process's parameters after the step and the step's metrics."""
    cfg = tiny_config(Path(tempfile.mkdtemp()), f"train.micro_batch_size={micro}", "train.optimizer=sgd",
                      "train.learning_rate=0.5", "train.max_grad_norm=0", *{**CASES, **EXTRA_CASES}[case])
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
    return {"params": current_params(trainer), "metrics": metrics}


def current_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    """This process's view of every policy parameter, whole (gathered first under DeepSpeed ZeRO-3 and FSDP:
    collective there, so every process calls it)."""
    from contextlib import nullcontext

    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.layout.fsdp is not None:
        from rlclip.fsdp import full_parameters

        return full_parameters(model)
    gather = nullcontext()
    if trainer.layout.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gather:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def train_two_modes() -> dict:
    """Two steps in GRPO mode and two in PPO mode (critic, GAE with globally whitened advantages)."""
    runs = {}
    for mode, extra in (("grpo", []), ("ppo", ["advantage.name=gae", "critic.learning_rate=1e-3"])):
        history = Trainer(tiny_config(Path(tempfile.mkdtemp()), "max_steps=2", *extra)).train()
        runs[mode] = [h["step"] for h in history]
        if mode == "ppo":
            runs["ppo_explained_variance"] = history[-1]["critic/explained_variance"]
    return runs


def resume_runs(shared: Path) -> dict:
    """A 3-step run, and a 2-step run (checkpoint at step 2) resumed to step 3, under ``shared`` (one path on
    every process). One optimizer step per rollout, so the resumed step 3 starts where the straight run's
    does: with a fresh rollout; AdamW, so the optimizer state must come back too. Returns each run's steps,
    the parameters after the straight and the resumed run, and the straight run's trainer."""

    def train(directory: Path, *overrides: str) -> tuple[list[int], dict[str, torch.Tensor], Trainer]:
        trainer = Trainer(tiny_config(directory, "train.learning_rate=1e-2", "rollout.prompts_per_step=2",
                                      "train.micro_batch_size=4", "train.num_iterations=1", "train.mini_batches=1",
                                      *overrides))
        history = trainer.train()
        return [h["step"] for h in history], current_params(trainer), trainer

    straight_steps, straight, trainer = train(shared / "straight", "max_steps=3", "save_steps=0",
                                              "overwrite_output_dir=true")
    first_steps, _, _ = train(shared / "resumed", "max_steps=2", "save_steps=2", "overwrite_output_dir=true")
    resumed_steps, resumed, _ = train(shared / "resumed", "max_steps=3", "resume_from_checkpoint=latest")
    return {"straight": straight_steps, "first": first_steps, "resumed": resumed_steps,
            "straight_params": straight, "resumed_params": resumed, "trainer": trainer}


def write_launch_results(out: Path, steps: dict[str, dict], runs: dict, **info) -> None:
    """Process 0 of a multi-process launch writes its results for the test: ``step_<case>.pt`` per
    ``steps`` entry, ``straight.pt`` / ``resumed.pt`` from :func:`resume_runs`, and ``train.json`` (world size,
    distributed type, the runs' steps, plus ``info``)."""
    acc = runs["trainer"].accelerator
    if not acc.is_main_process:
        return
    for case, result in steps.items():
        torch.save(result, out / f"step_{case}.pt")
    torch.save(runs["straight_params"], out / "straight.pt")
    torch.save(runs["resumed_params"], out / "resumed.pt")
    (out / "train.json").write_text(json.dumps({
        "world_size": acc.num_processes, "distributed": str(acc.distributed_type), "straight": runs["straight"],
        "first": runs["first"], "resumed": runs["resumed"], **info}))
