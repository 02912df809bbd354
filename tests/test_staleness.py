"""Controlled staleness (rlclip/staleness.py) and the proximal policies (rlclip/behaviour.py) on the tiny model.

The reference for staleness k is built independently of the queue: a
synchronous trainer (staleness 0, the loop that samples then trains) that keeps
a snapshot of its weights at every policy version and samples rollout j with
the snapshot of version max(0, j - k). Generation is the only consumer of the
global random stream, so both runs draw the same numbers in the same order and
must agree bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_config

BASE = ("max_steps=8", "save_steps=0", "train.optimizer=sgd", "train.learning_rate=0.05",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "train.micro_batch_size=4", "train.mini_batches=1",
        "rollout.max_new_tokens=8")


def trainer_for(tmp_path, *overrides):
    from rlclip.trainer import Trainer

    return Trainer(tiny_config(tmp_path, *BASE, *overrides))


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def record_versions(trainer) -> list[dict[str, torch.Tensor]]:
    """Snapshots of the weights at each policy version (taken as each rollout is prepared)."""
    versions: list[dict[str, torch.Tensor]] = []
    prepare = trainer.prepare

    def prepare_and_record(rollout):
        if len(versions) == trainer.rollout_index:
            versions.append(weights(trainer))
        return prepare(rollout)

    trainer.prepare = prepare_and_record
    return versions


def synchronous_reference(tmp_path, k: int, *overrides):
    """Staleness 0, sampling rollout j with the weights of version max(0, j - k); the correction on, as at k > 0."""
    trainer = trainer_for(tmp_path, *overrides)
    trainer.behaviour.corrects = True
    versions = record_versions(trainer)
    generate = trainer.generate

    def generate_with_old_weights(records):
        j = trainer.queue.sampled
        version = max(0, j - k)
        if len(versions) == trainer.rollout_index:  # the current version is sampled before it is prepared
            versions.append(weights(trainer))
        current = weights(trainer)
        trainer.model.load_state_dict(versions[version])
        try:
            return generate(records)
        finally:
            trainer.model.load_state_dict(current)

    trainer.generate = generate_with_old_weights
    return trainer


@pytest.mark.parametrize("k", [1, 2])
def test_staleness_k_equals_the_snapshot_reference_bit_for_bit(tmp_path, k):
    stale = trainer_for(tmp_path / "stale", f"rollout.staleness={k}")
    sampled_by = []
    sample = stale.sample

    def sample_and_note(index):
        rollout, metrics = sample(index)
        sampled_by.append((index, rollout.policy_version))
        return rollout, metrics

    stale.queue.sample = sample_and_note
    history = stale.train()
    reference = synchronous_reference(tmp_path / "reference", k)
    reference.train()
    assert_same_weights(weights(stale), weights(reference))
    # rollout j was sampled by version max(0, j - k), and every update is k versions behind once the queue is full
    per_rollout = stale._steps_per_rollout()
    trained = stale.config.max_steps // per_rollout
    assert sampled_by == [(j, max(0, j - k)) for j in range(trained + k)]
    lags = [h["rollout/staleness_max"] for h in history[::per_rollout]]
    assert lags == [min(n, k) for n in range(len(lags))]
    assert len(stale.queue.waiting) == k  # sampled, never trained on


def test_staleness_zero_samples_and_trains_in_turn(tmp_path):
    trainer = trainer_for(tmp_path, "max_steps=4")
    seen = []
    sample = trainer.sample

    def sample_and_note(index):
        seen.append((index, trainer.rollout_index, len(trainer.queue.waiting)))
        return sample(index)

    trainer.queue.sample = sample_and_note
    history = trainer.train()
    assert seen == [(0, 0, 0), (1, 1, 0)]  # rollout j sampled by version j, with nothing waiting (2 steps each)
    assert not trainer.behaviour.corrects and "rollout/staleness_mean" not in history[0]
    assert not any(key.startswith("rollout/is_") for key in history[0])


def test_staleness_zero_equals_a_reference_without_the_queue(tmp_path):
    """k = 0 through the queue equals the snapshot reference at k = 0 with no correction: the plain loop."""
    plain = trainer_for(tmp_path / "plain", "max_steps=6")
    plain.train()
    reference = synchronous_reference(tmp_path / "reference", 0, "max_steps=6")
    reference.behaviour.corrects = False
    reference.train()
    assert_same_weights(weights(plain), weights(reference))


def test_resume_in_the_middle_of_the_queue_is_bit_identical(tmp_path):
    straight = trainer_for(tmp_path / "straight", "rollout.staleness=2")
    straight.train()
    first = trainer_for(tmp_path / "resumed", "rollout.staleness=2", "max_steps=4", "save_steps=4")
    first.train()
    assert len(first.queue.waiting) == 2
    state = json.loads((tmp_path / "resumed/checkpoint-4/trainer_state.json").read_text())
    assert "queue" in state["extras"] and state["sampled"] == 4
    resumed = trainer_for(tmp_path / "resumed", "rollout.staleness=2", "resume_from_checkpoint=latest")
    resumed.train()
    assert_same_weights(weights(straight), weights(resumed))
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def count_behaviour_forwards(trainer) -> list[int]:
    calls = [0]
    logprobs = trainer.behaviour.logprobs

    def counting(*args, **kwargs):
        calls[0] += 1
        return logprobs(*args, **kwargs)

    trainer.behaviour.logprobs = counting
    return calls


def test_bypass_runs_no_behaviour_forward_and_takes_the_ratio_against_the_sampler(tmp_path):
    bypass = trainer_for(tmp_path / "bypass", "rollout.proximal=bypass", "rollout.staleness=1", "max_steps=4")
    calls = count_behaviour_forwards(bypass)
    rollout, _ = bypass.queue.pop()
    bypass.prepare(rollout)
    assert calls == [0]
    assert torch.equal(rollout.old_logprobs, rollout.sampler_logprobs)
    mask = rollout.completion_mask.bool()
    assert torch.equal(rollout.is_weights[mask], torch.ones_like(rollout.is_weights[mask]))  # pi_prox / mu = 1
    recompute = trainer_for(tmp_path / "recompute", "rollout.staleness=1", "max_steps=4")
    calls = count_behaviour_forwards(recompute)
    rollout, _ = recompute.queue.pop()
    recompute.prepare(rollout)
    assert calls == [2]  # one no-grad pass over the rollout's 8 sequences, in micro-batches of 4
    bypass.train()


def test_loglinear_interpolates_between_sampler_and_current_policy_by_versions(tmp_path):
    """A-3PO: log pi_prox = log mu + alpha (log pi_theta - log mu), alpha = k / (k + 1) (AReaL actor.py l.640-667)."""
    trainer = trainer_for(tmp_path, "rollout.proximal=loglinear", "rollout.staleness=2", "max_steps=2")
    rollout, _ = trainer.queue.pop()
    trainer.prepare(rollout)
    assert rollout.old_logprobs is None  # no forward pass: pi_prox is made at update time
    micro = copy.copy(rollout)
    current = torch.full_like(rollout.sampler_logprobs, -1.0)
    for lag, alpha in [(0, 0.0), (1, 0.5), (2, 2 / 3)]:
        micro.policy_version = trainer.rollout_index - lag
        prox = trainer.behaviour.loglinear(micro, current, trainer.rollout_index)
        torch.testing.assert_close(prox, rollout.sampler_logprobs + alpha * (current - rollout.sampler_logprobs),
                                   rtol=0, atol=0)
    trainer.train()


@pytest.mark.parametrize("overrides, message", [
    (["rollout.proximal=bypass", "objective.name=troll"], "needs the old policy's sparse support"),
    (["rollout.proximal=loglinear", "rollout.is_batch_normalize=true"], "batch statistics"),
    (["rollout.proximal=loglinear", "advantage.kl_in_reward=0.1"], "kl_in_reward"),
    (["rollout.proximal=bypass", "rollout.rejection=[{metric: token_k1, upper: 1.0}]"], "would do nothing"),
    (["rollout.proximal=sometimes"], "unknown rollout.proximal 'sometimes'; choose recompute, bypass or loglinear"),
    (["rollout.staleness=-1"], "rollout.staleness must be >= 0, got -1"),
])
def test_offpolicy_settings_that_cannot_work_are_refused(tmp_path, overrides, message):
    from rlclip.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, *overrides)


def test_rejected_tokens_leave_the_mask_after_the_advantages(tmp_path):
    """GAE runs over the original tokens (a rejected token must not cut its response's return), then the rejected
    tokens leave the completion mask and so the loss and its counts (verl's modified response mask)."""
    from rlclip.critic import gae_advantages

    trainer = trainer_for(tmp_path, "rollout.staleness=1", "advantage.name=gae", "rollout.is_mode=token_truncate",
                          "rollout.rejection=[{metric: token_k2, upper: 0.02}]", "max_steps=2")
    trainer.train()  # one rollout: version 1 now, and the next rollout waits, sampled by version 0
    rollout, _ = trainer.queue.pop()
    original = rollout.completion_mask.clone()
    metrics = trainer.prepare(rollout)
    keep = rollout.rejection_keep
    assert 0 < metrics["rollout/rejected_frac/token_k2"] < 1
    assert torch.equal(rollout.completion_mask, original * keep.to(original.dtype))
    reference = copy.copy(rollout)
    reference.completion_mask = original
    gae_advantages(reference, trainer.config.advantage, trainer.accelerator)
    torch.testing.assert_close(rollout.advantages, reference.advantages, rtol=0, atol=0)


def test_loglinear_logs_its_correction_each_step(tmp_path):
    history = trainer_for(tmp_path, "rollout.proximal=loglinear", "rollout.staleness=1", "max_steps=4",
                          "rollout.is_mode=token_truncate").train()
    assert all(0 < h["rollout/is_weight_mean"] <= 3.0 for h in history)
    assert history[-1]["rollout/sampler_kl_k3"] > 0  # pi_prox moved off mu once the lag is 1


def test_a_queue_resumes_only_with_its_staleness_and_process_count(tmp_path):
    from rlclip.errors import ConfigError

    trainer_for(tmp_path, "rollout.staleness=2", "max_steps=4", "save_steps=4").train()
    with pytest.raises(ConfigError, match=r"checkpoint-4 holds the rollouts of a staleness queue \(rollout.staleness"
                                          r"=2, 1 processes"):
        trainer_for(tmp_path, "rollout.staleness=1", "resume_from_checkpoint=latest").train()


def test_loglinear_corrects_each_micro_batch_once_with_whole_step_statistics(tmp_path):
    """With several micro-batches an objective's step statistics come from a no-grad pass over the mini-batch;
    that pass makes A-3PO's pi_prox too, but only the update's forward corrects and counts the statistics."""
    trainer = trainer_for(tmp_path, "rollout.proximal=loglinear", "rollout.staleness=1", "max_steps=2",
                          "rollout.is_mode=token_truncate", "objective.m2_threshold=0.01")
    corrected = []
    correct = trainer.behaviour.correct

    def counting(batch, prox, reduce):
        corrected.append(len(batch))
        return correct(batch, prox, reduce)

    trainer.behaviour.correct = counting
    trainer.train()
    assert corrected == [4, 4, 4, 4]  # 2 steps x 2 micro-batches of 4, nothing from the statistics pass
