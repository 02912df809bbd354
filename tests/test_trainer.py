"""Tiny-model training: smoke, LoRA, reference KL, resume, learning."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from rlclip.trainer import Trainer

CONTRACT_KEYS = {"step", "loss", "reward/mean", "time/step_s"}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_smoke_three_steps_change_parameters_and_write_outputs(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=3", "save_steps=0")
    trainer = Trainer(cfg)
    before = snapshot(trainer.model)
    history = trainer.train()
    after = snapshot(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and len(history) == 3
    for line in lines:
        assert CONTRACT_KEYS <= set(line)
        assert any(k.startswith("objective/clip_frac") for k in line)
    # mu = 2, two mini-batches: later steps are off-policy, so ratios move off 1
    assert lines[-1]["objective/ratio_max"] != 1.0
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, param in reloaded.named_parameters():
        torch.testing.assert_close(param, after[name])


def test_lora_changes_only_adapter_weights(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=2", "lora.enabled=true", "lora.r=4", "train.learning_rate=0.01")
    trainer = Trainer(cfg)
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_kl_reference_with_lora_uses_base_without_copy(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=2", "lora.enabled=true", "objective.kl_coef=0.1",
                      "train.learning_rate=0.05")
    trainer = Trainer(cfg)
    assert trainer.ref_model is None  # the base with adapters disabled is the reference
    history = trainer.train()
    assert history[0]["objective/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero
    assert history[-1]["objective/kl_ref"] > 0


def test_kl_reference_full_model_is_frozen_copy(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=2", "objective.kl_coef=0.1")
    trainer = Trainer(cfg)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    ref_before = snapshot(trainer.ref_model)
    history = trainer.train()
    assert all(torch.equal(ref_before[n], p) for n, p in trainer.ref_model.named_parameters())
    assert history[-1]["objective/kl_ref"] > 0


def test_no_reference_model_without_kl(tmp_path):
    assert Trainer(tiny_config(tmp_path, "max_steps=1")).ref_model is None


def test_resume_from_latest_checkpoint(tmp_path):
    Trainer(tiny_config(tmp_path, "max_steps=4", "save_steps=4")).train()
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    (tmp_path / "checkpoint-final").mkdir()  # not a checkpoint: ignored
    (tmp_path / "checkpoint-99").mkdir()  # incomplete (no trainer_state.json): ignored
    resumed = Trainer(tiny_config(tmp_path, "max_steps=8", "resume_from_checkpoint=latest"))
    history = resumed.train()
    assert [h["step"] for h in history] == [5, 6, 7, 8]
    assert resumed.rollout_index == 2


def test_python_reward_funcs_and_dataset(tmp_path):
    calls = []

    def short(prompts, completions, tag, **kwargs):
        calls.append((len(completions), set(kwargs)))
        return [1.0 if len(c) < 8 else None for c in completions]

    data = [{"prompt": f"{i} + 1 =", "tag": "x"} for i in range(10)]
    cfg = tiny_config(tmp_path, "max_steps=1", "train.num_iterations=1", "train.mini_batches=1")
    history = Trainer(cfg, reward_funcs=[short], train_dataset=data).train()
    assert calls[0][0] == 32 and "completion_ids" in calls[0][1]
    assert "reward/short/mean" in history[0]


def test_learning_toy_task_raises_reward(tmp_path):
    # Reward = fraction of emitted characters that are "7" (about 1/99 at random init). Two optimizer steps per
    # rollout, each one micro-batch of 32. Measured: the mean reward of the last 4 steps is about 0.68 after 16
    # steps (0.49 after 14, 1.0 after 28), the first 4 about 0.016.
    cfg = tiny_config(tmp_path, "max_steps=16", "rollout.prompts_per_step=8", "rollout.max_new_tokens=8",
                      "train.learning_rate=0.01", "train.num_iterations=1", "train.mini_batches=2",
                      "train.micro_batch_size=32")
    history = Trainer(cfg).train()
    first = sum(h["reward/mean"] for h in history[:4]) / 4
    last = sum(h["reward/mean"] for h in history[-4:]) / 4
    assert last > 0.3 and last > 5 * first, (first, last)


@pytest.mark.parametrize("objective, metric", [
    ("archer", "objective/reasoning_frac"),
    ("pspo", "objective/smoothed_ratio_mean"),
    ("ratio_clip", "objective/clip_frac_high"),
    ("cispo", "objective/is_weight_mean"),
    ("sapo", "objective/gate_weight_mean"),
    ("vespo", "objective/phi_mean"),
    ("luspo", "objective/clip_frac_high"),
    ("gmpo", "objective/seq_ratio_mean"),
    ("clip_cov", "objective/cov_clip_frac"),
    ("kl_cov", "objective/cov_kl_frac"),
    ("gpg", "objective/logprob_mean"),
])
def test_each_objective_trains_three_steps_with_mu2(tmp_path, objective, metric):
    """Two mini-batches per pass: step 3 is the first of the second (off-policy) pass. Small rollouts (2 prompts x
    4 completions of up to 8 tokens): the point is that every objective trains, not what it learns."""
    cfg = tiny_config(tmp_path, f"objective.name={objective}", "max_steps=3", "train.num_iterations=2",
                      "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8")
    history = Trainer(cfg).train()
    assert len(history) == 3
    assert metric in history[-1] and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_builtin_reward_missing_its_column_is_a_reward_error(tmp_path):
    from rlclip.errors import RewardError

    cfg = tiny_config(tmp_path, "max_steps=1", "reward.funcs=[{name: correctness}]")
    data = [{"prompt": "1 + 1 =", "suite": "gsm8k"}] * 4
    with pytest.raises(RewardError, match="correctness_reward.*answer"):
        Trainer(cfg, train_dataset=data).train()


def test_tensorboard_tracker_writes_events(tmp_path):
    Trainer(tiny_config(tmp_path, "max_steps=1", "logging.report_to=tensorboard")).train()
    assert list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("clipper", ["norm", "autoclip", "zclip", "adagc"])
def test_each_gradient_clipper_trains_and_its_state_resumes(tmp_path, clipper):
    settings = {"zclip": ", warmup_steps: 2", "adagc": ", warmup_steps: 2"}.get(clipper, "")
    cfg = tiny_config(tmp_path, "max_steps=4", "save_steps=4", f"train.grad_clip={{name: {clipper}{settings}}}")
    trainer = Trainer(cfg)
    history = trainer.train()
    for key in ("grad/norm_pre", "grad/norm_post", "grad/clipped", "grad/threshold"):
        assert all(math.isfinite(h[key]) for h in history), key
    assert all(h["grad/norm_post"] <= h["grad/norm_pre"] + 1e-6 for h in history)
    assert (tmp_path / "checkpoint-4" / "clipper.pt").is_file()
    resumed = Trainer(tiny_config(tmp_path, "max_steps=4", f"train.grad_clip={{name: {clipper}{settings}}}",
                                  "resume_from_checkpoint=latest"))
    resumed.train()  # max_steps reached: loads the state, trains nothing
    assert resumed.clipper.state_dict() == trainer.clipper.state_dict()


def test_max_grad_norm_is_an_alias_of_the_norm_clipper(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "max_steps=1", "train.max_grad_norm=0.01"))
    assert type(trainer.clipper).__name__ == "NormClipper" and trainer.clipper.max_norm == 0.01
    history = trainer.train()
    assert history[0]["grad/clipped"] == 1.0 and history[0]["grad/threshold"] == 0.01


@pytest.mark.parametrize("filters", [
    ["objective.mask_truncated=true"],
    ["objective.entropy_top_quantile=0.2", "train.micro_batch_size=4"],  # step statistics from a no-grad pass
    ["objective.off_policy_mask=0.001"],
])
def test_token_filters_train_through_the_trainer(tmp_path, filters):
    history = Trainer(tiny_config(tmp_path, "max_steps=2", *filters)).train()
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_mask_truncated_takes_truncated_completions_out_of_the_token_count(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "max_steps=1", "objective.mask_truncated=true"))
    rollout = trainer.generate(trainer.next_prompts())
    rollout.truncated[:] = True
    rollout.truncated[0] = False
    mask = trainer.objective.count_mask(rollout.completion_mask, rollout.truncated)
    assert int(mask.sum()) == int(rollout.completion_mask[0].sum())
