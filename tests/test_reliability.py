"""A NaN, a broken reward or a typo never destroys a run (issue 10).

The non-finite guard, reward faults, the objective output contract, run
directories (refusal, lock, overwrite), atomic checkpoints with keep_last and
a fallback for damaged ones, exact resume after a signal, and long prompts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tiny_config
from rlclip.errors import ConfigError, ObjectiveError, RewardError, TrainingError, UserCodeError
from rlclip.guard import mask_nonfinite
from rlclip.objectives import Objective, register_objective
from rlclip.objectives.base import _REGISTRY
from rlclip.trainer import Trainer

SCRIPT = ROOT / "tests" / "scripts" / "interrupt_run.py"


def rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _NaNAt(Objective):
    """-A * logprob, but NaN on the calls listed in ``bad`` (0-based)."""

    bad: set[int] = set()

    def __init__(self, **shared):
        super().__init__(**shared)
        self.calls = 0

    def surrogate(self, batch):
        loss = -batch.advantages * batch.logprobs
        if self.calls in self.bad:
            loss = loss * float("nan")
        self.calls += 1
        return loss, {}


@pytest.fixture
def nan_objective():
    """Register a NaN-injecting objective for one test (removed afterwards)."""
    names = []

    def make(name, bad):
        cls = type(f"NaN_{name}", (_NaNAt,), {"bad": set(bad)})
        register_objective(name)(cls)
        names.append(name)
        return name

    yield make
    for name in names:
        _REGISTRY.pop(name, None)


# --- the non-finite guard ---------------------------------------------------------------------------

@pytest.mark.parametrize("in_backward", [(), ("train.optimizer_in_backward=true", "train.max_grad_norm=0")],
                         ids=["ordinary", "optimizer_in_backward"])
def test_one_nan_loss_skips_the_step_and_training_recovers(tmp_path, nan_objective, in_backward):
    name = nan_objective("nan_once", bad={1})  # one micro-batch per step: call 1 is the second step
    cfg = tiny_config(tmp_path, f"objective.name={name}", "max_steps=4", "save_steps=0",
                      "train.micro_batch_size=16", *in_backward)
    trainer = Trainer(cfg)
    history = trainer.train()
    assert [h["optim/skipped_steps"] for h in history] == [0, 1, 1, 1]
    assert history[1]["loss"] is None or math.isnan(history[1]["loss"])
    assert all_finite(trainer.model)
    # the skipped step changed nothing: optimizer state still has the first step only
    assert all(int(s["step"]) == 3 for s in trainer.optimizer.state.values())


def test_consecutive_nans_stop_with_finite_weights_and_the_last_checkpoint_intact(tmp_path, nan_objective):
    name = nan_objective("nan_later", bad=set(range(4, 100)))  # from the 5th optimizer step on
    cfg = tiny_config(tmp_path, f"objective.name={name}", "max_steps=12", "save_steps=4",
                      "train.micro_batch_size=16", "train.max_consecutive_skips=3")
    trainer = Trainer(cfg)
    with pytest.raises(TrainingError, match=r"3 consecutive optimizer steps \(steps 5-7\)"):
        trainer.train()
    assert all_finite(trainer.model)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (tmp_path / "model.safetensors").exists()  # no final model from a failed run
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_nonfinite_behaviour_logprobs_mask_their_tokens(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "max_steps=1"))
    rollout = trainer.generate(trainer.next_prompts())
    trainer.score(rollout)
    trainer.record_behaviour(rollout)
    before = int(rollout.completion_mask.sum())
    rollout.old_logprobs[0, 0] = float("nan")
    rollout.old_logprobs[1, 0] = float("inf")
    metrics = mask_nonfinite(rollout, trainer.accelerator)
    assert metrics["behaviour/nonfinite_tokens"] == 2
    assert int(rollout.completion_mask.sum()) == before - 2
    assert bool(torch.isfinite(rollout.old_logprobs).all())


# --- reward faults ----------------------------------------------------------------------------------

def nan_reward(prompts, completions, **_):
    return [float("nan")] * len(completions)


def inf_at_3(prompts, completions, **_):
    return [math.inf if i == 3 else 0.5 for i in range(len(completions))]


def always_none(prompts, completions, **_):
    return [None] * len(completions)


def test_nan_reward_is_an_error_by_default(tmp_path):
    with pytest.raises(RewardError, match=r"'nan_reward' returned nan for completion 0 \(32 of 32"):
        Trainer(tiny_config(tmp_path, "max_steps=1"), reward_funcs=[nan_reward]).train()


def test_inf_reward_is_an_error_by_default(tmp_path):
    with pytest.raises(RewardError, match=r"'inf_at_3' returned inf for completion 3 \(1 of 32"):
        Trainer(tiny_config(tmp_path, "max_steps=1"), reward_funcs=[inf_at_3]).train()


def test_raising_reward_names_function_exception_and_sample(tmp_path):
    def picky(prompts, completions, n, **_):
        for value in n:
            if value == 3:
                raise KeyError("no such field")
        return [1.0] * len(completions)

    data = [{"prompt": f"{i} + 1 =", "n": i} for i in range(4)]  # every rollout holds record 3
    with pytest.raises(UserCodeError) as info:
        Trainer(tiny_config(tmp_path, "max_steps=1"), reward_funcs=[picky], train_dataset=data).train()
    message = str(info.value)
    assert "reward function 'picky' raised KeyError: 'no such field' at " in message
    assert "test_reliability.py:" in message
    index = int(message.split("on completion ")[1].split()[0])
    assert index % 8 == 0 and "of 32" in message  # the first completion of record 3's group


def test_skip_masks_failing_completions_and_counts_them(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=2", "reward.on_error=skip")
    history = Trainer(cfg, reward_funcs=[inf_at_3]).train()
    assert history[0]["reward/errors"] == 1
    assert history[0]["reward/mean"] == pytest.approx(0.5)
    assert all(math.isfinite(h["loss"]) for h in history)


def test_all_none_rewards_give_zero_advantage_not_nan(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "max_steps=1"), reward_funcs=[always_none])
    history = trainer.train()
    assert history[0]["reward/unscored"] == 32 and history[0]["loss"] == 0.0
    assert all_finite(trainer.model)


def test_none_for_part_of_a_group_uses_the_scored_members():
    from rlclip.advantages import grpo, rloo

    rewards = torch.tensor([1.0, 0.0, math.nan, 0.5, math.nan, math.nan, math.nan, 2.0])
    adv = grpo(rewards, 4, eps=0.0)
    # group 1: scored 1, 0, 0.5 -> mean 0.5, unbiased std 0.5
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # one scored member: no baseline, zero advantage
    # rloo: 1 - mean(0, 0.5) = 0.75; 0 - 0.75 = -0.75; 0.5 - 0.5 = 0
    torch.testing.assert_close(rloo(rewards, 4)[:4], torch.tensor([0.75, -0.75, 0.0, 0.0]))


# --- the objective output contract ------------------------------------------------------------------

def test_wrong_shape_objective_is_a_one_line_error(tmp_path, nan_objective):
    @register_objective("reduced_too_early")
    class Reduced(Objective):
        def surrogate(self, batch):
            return (-batch.advantages * batch.logprobs).sum(-1), {}

    try:
        with pytest.raises(ObjectiveError, match=r"'reduced_too_early'.*shape \[8\], expected \[8, \d+\]"):
            Trainer(tiny_config(tmp_path, "objective.name=reduced_too_early", "max_steps=1")).train()
    finally:
        _REGISTRY.pop("reduced_too_early")


# --- run directories ---------------------------------------------------------------------------------

def test_used_output_dir_is_refused_then_overwritten(tmp_path):
    Trainer(tiny_config(tmp_path, "max_steps=1")).train()
    with pytest.raises(ConfigError, match="already holds a run.*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        Trainer(tiny_config(tmp_path, "max_steps=1"))
    Trainer(tiny_config(tmp_path, "max_steps=2", "overwrite_output_dir=true")).train()
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]


def test_output_dir_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        Trainer(tiny_config(target, "max_steps=1"))


def test_lock_keeps_a_second_run_out(tmp_path):
    from rlclip.checkpoint import RunLock

    holder = RunLock(tmp_path)
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            Trainer(tiny_config(tmp_path, "max_steps=1"))
    finally:
        holder.release()
    Trainer(tiny_config(tmp_path, "max_steps=1")).train()  # free again once released


# --- checkpoints -------------------------------------------------------------------------------------

def test_keep_last_and_metrics_written_once_after_resume(tmp_path):
    # one optimizer step per rollout, so a checkpoint can fall on every step; small rollouts
    small = ["train.num_iterations=1", "train.mini_batches=1", "rollout.prompts_per_step=2",
             "rollout.group_size=4", "rollout.max_new_tokens=8"]
    Trainer(tiny_config(tmp_path, "max_steps=6", "save_steps=2", "keep_last=2", *small)).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # resume from an older checkpoint than the last logged step: rows after it are rewritten, not repeated
    Trainer(tiny_config(tmp_path, "max_steps=6", "save_steps=2", "keep_last=2", *small,
                        f"resume_from_checkpoint={tmp_path / 'checkpoint-4'}")).train()
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 7))


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
    """A finished 8-step run with checkpoint-4 and checkpoint-8 (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("eight_steps")
    Trainer(tiny_config(out, "max_steps=8", "save_steps=4")).train()
    return out


@pytest.mark.parametrize("damage", ["state/model.safetensors", "state/optimizer.bin", "trainer_state.json"])
def test_latest_falls_back_from_a_damaged_checkpoint(tmp_path, damage, capsys, eight_steps):
    shutil.copytree(eight_steps, tmp_path, dirs_exist_ok=True)
    target = tmp_path / "checkpoint-8" / damage
    data = target.read_bytes()
    target.write_bytes(b"" if damage.endswith(".json") else data[: len(data) // 2])
    # named explicitly, a damaged checkpoint is a one-line error
    with pytest.raises(ConfigError, match="checkpoint-8 cannot be loaded"):
        Trainer(tiny_config(tmp_path, "max_steps=9", f"resume_from_checkpoint={tmp_path / 'checkpoint-8'}")).train()
    capsys.readouterr()
    history = Trainer(tiny_config(tmp_path, "max_steps=5", "resume_from_checkpoint=latest")).train()
    err = capsys.readouterr().err
    assert "checkpoint-8 cannot be loaded" in err and "falling back to checkpoint-4" in err
    assert "resumed from" in err and "checkpoint-4 at step 4" in err
    assert [h["step"] for h in history] == [5]


def test_partial_checkpoint_from_a_killed_save_is_never_picked(tmp_path, eight_steps):
    shutil.copytree(eight_steps, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoint-8")
    partial = tmp_path / ".partial-checkpoint-8"  # what a SIGKILL during the save of checkpoint-8 leaves
    (partial / "state").mkdir(parents=True)
    (partial / "trainer_state.json").write_text('{"step": 8, "rollout_index": 2}')
    history = Trainer(tiny_config(tmp_path, "max_steps=5", "resume_from_checkpoint=latest")).train()
    assert [h["step"] for h in history] == [5]


KILLED_RUN = ["max_steps=2", "save_steps=1", "train.num_iterations=1", "train.mini_batches=1",
              "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8"]
"""One optimizer step per small rollout, a checkpoint after each: checkpoint-1 is complete, checkpoint-2 is the
save that the kill interrupts."""


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """A real SIGKILL (a separate process) after the model of checkpoint-2 is written and before the rest is."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), *KILLED_RUN], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    assert (tmp_path / ".partial-checkpoint-2").is_dir()  # killed mid-save: only the staging directory
    assert not (tmp_path / "checkpoint-2").exists()
    history = Trainer(tiny_config(tmp_path, *KILLED_RUN, "resume_from_checkpoint=latest")).train()
    assert [h["step"] for h in history] == [2]


def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, monkeypatch, capsys):
    """A real SIGTERM, delivered to this process right after optimizer step 3 (mid-rollout: mu = 2 and two
    mini-batches make four optimizer steps per rollout; the rollouts are small, 2 prompts x 4 completions)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    small = ["rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8"]
    a = Trainer(tiny_config(straight, "max_steps=8", "save_steps=4", *small))
    a.train()
    step = Trainer.optimizer_step

    def stepping(self, mini_batch):
        result = step(self, mini_batch)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "optimizer_step", stepping)
    capsys.readouterr()
    b = Trainer(tiny_config(stopped, "max_steps=8", "save_steps=4", *small))
    b.train()
    err = capsys.readouterr().err
    assert b.stopped_by == "SIGTERM" and b.step == 3
    assert "stopped by SIGTERM after step 3" in err and "--resume_from_checkpoint latest" in err
    assert (stopped / "checkpoint-3" / "rollout_0.pt").is_file()  # mid-rollout: the rollout is saved
    monkeypatch.setattr(Trainer, "optimizer_step", step)
    Trainer(tiny_config(stopped, "max_steps=8", "save_steps=4", *small, "resume_from_checkpoint=latest")).train()
    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(stopped)] == list(range(1, 9))
    assert [r["loss"] for r in rows(stopped)] == [r["loss"] for r in rows(straight)]


# --- input limits ------------------------------------------------------------------------------------

def test_huge_prompt_is_truncated_from_the_left_and_counted(tmp_path):
    data = [{"prompt": "7 " * 50_000}] + [{"prompt": f"{i} + 1 ="} for i in range(7)]
    cfg = tiny_config(tmp_path, "max_steps=1", "rollout.prompts_per_step=8", "rollout.max_prompt_length=64",
                      "train.num_iterations=1")
    start = time.perf_counter()
    history = Trainer(cfg, train_dataset=data).train()
    assert time.perf_counter() - start < 120
    assert history[0]["rollout/prompts_truncated"] == 1


def test_huge_prompt_rejected_by_config(tmp_path, capsys):
    data = [{"prompt": "7 " * 50_000}] + [{"prompt": f"{i} + 1 ="} for i in range(7)]
    cfg = tiny_config(tmp_path, "max_steps=1", "rollout.max_prompt_length=64", "rollout.prompt_overflow=reject",
                      "train.num_iterations=1")
    trainer = Trainer(cfg, train_dataset=data)
    assert len(trainer.records) == 7
    assert "rejected 1 of 8 prompts longer than 64 tokens" in capsys.readouterr().err


@pytest.mark.xdist_group("two_process")
def test_nan_in_one_process_gradient_skips_the_step_on_both(two_process):
    """Also: the adaptive clipper's thresholds are identical on both processes (issue 17)."""
    ranks = [json.loads((two_process / f"nan_rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["skipped"] == [0, 1, 1, 1, 1, 1] and report["finite"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["thresholds"] == ranks[1]["thresholds"]
    assert ranks[0]["thresholds"][1] is None  # the skipped step never reached the clipper
    assert all(t > 0 for t in ranks[0]["thresholds"][3:])  # adaptive after the two warm-up steps
