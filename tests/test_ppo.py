"""PPO mode: GAE, the clipped value loss, the critic on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from rlclip.advantages import gae, outcome_token_rewards, whiten
from rlclip.critic import clipped_value_loss, explained_variance
from rlclip.objectives import available_objectives
from rlclip.trainer import Trainer

D = torch.float64


def test_gae_hand_computed():
    # r = [0, 0, 1], V = [0.5, 0.4, 0.8], gamma = 0.9, lambda = 0.5
    # delta_2 = 1 - 0.8 = 0.2;  delta_1 = 0 + 0.9*0.8 - 0.4 = 0.32;  delta_0 = 0.9*0.4 - 0.5 = -0.14
    # A_2 = 0.2;  A_1 = 0.32 + 0.45*0.2 = 0.41;  A_0 = -0.14 + 0.45*0.41 = 0.0445
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]], dtype=D), torch.tensor([[0.5, 0.4, 0.8]], dtype=D), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0445, 0.41, 0.2]], dtype=D))
    torch.testing.assert_close(ret, adv + v)


def test_gae_gamma_lambda_one_is_returns_minus_values_and_lambda_zero_is_td():
    g = torch.Generator().manual_seed(0)
    r, v, m = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D), torch.ones(3, 5)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    reward_to_go = r.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, reward_to_go - v)
    torch.testing.assert_close(ret, reward_to_go)
    adv0, _ = gae(r, v, m, gamma=0.7, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=D)], 1)
    torch.testing.assert_close(adv0, r + 0.7 * next_v - v)


def test_gae_masked_padding_changes_nothing():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(1, 3, generator=g, dtype=D), torch.randn(1, 3, generator=g, dtype=D)
    adv, ret = gae(r, v, torch.ones(1, 3), 0.95, 0.9)
    padded_r = torch.cat([r, torch.randn(1, 4, generator=g, dtype=D)], 1)  # garbage in the padding
    padded_v = torch.cat([v, torch.randn(1, 4, generator=g, dtype=D)], 1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]])
    adv_p, ret_p = gae(padded_r, padded_v, mask, 0.95, 0.9)
    torch.testing.assert_close(adv_p[:, :3], adv)
    torch.testing.assert_close(ret_p[:, :3], ret)
    assert (adv_p[:, 3:] == 0).all() and (ret_p[:, 3:] == 0).all()


def test_outcome_reward_on_last_token_with_kl_penalty():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.full((2, 4), 0.5)
    tr = outcome_token_rewards(torch.tensor([2.0, -1.0]), mask, kl, kl_coef=0.1)
    torch.testing.assert_close(tr, torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-1.05, 0.0, 0.0, 0.0]]))


def test_whiten_uses_given_global_moments():
    x, m = torch.tensor([[1.0, 3.0, 99.0]]), torch.tensor([[1, 1, 0]])
    out = whiten(x, m, torch.tensor(2.0), torch.tensor(1.0), eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_clipped_value_loss_hand_computed():
    # V_old = 0, R = 1, clip 0.2:
    #   V = 0.5: clipped V = 0.2 -> (0.2-1)^2 = 0.64 > (0.5-1)^2 = 0.25 -> 0.5*0.64 = 0.32, clipped, no grad
    #   V = 0.1: inside, (0.1-1)^2 = 0.81 -> 0.405, grad V - R = -0.9
    values = torch.tensor([[0.5, 0.1]], dtype=D, requires_grad=True)
    loss, clipped = clipped_value_loss(values, torch.zeros(1, 2, dtype=D), torch.ones(1, 2, dtype=D), 0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405]], dtype=D))
    assert clipped.tolist() == [[True, False]]
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9]], dtype=D))
    plain, _ = clipped_value_loss(values, torch.zeros(1, 2, dtype=D), torch.ones(1, 2, dtype=D), None)
    torch.testing.assert_close(plain, 0.5 * (values - 1) ** 2)


def test_explained_variance_over_global_moments():
    from accelerate import Accelerator

    from rlclip.utils import global_moments

    acc = Accelerator(cpu=True)
    ret, m = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]]), torch.tensor([[1, 1, 1, 1, 0]])

    def ev(values):
        return explained_variance(global_moments(acc, ret, m)[1], global_moments(acc, ret - values, m)[1]).item()

    assert ev(ret) == pytest.approx(1.0)
    assert ev(torch.full((1, 5), 2.5)) == pytest.approx(0.0)  # a constant predicts nothing
    assert ev(torch.tensor([[2.0, 1.0, 4.0, 3.0, 0.0]])) == pytest.approx(1 - 1.0 / 1.25)  # Var[R-V] = 1, Var[R] = 1.25


def test_explained_variance_is_undefined_when_returns_do_not_vary():
    """All rewards 0: Var[R] = 0, so the metric is NaN (logged as null), not -residual / 1e-12."""
    assert math.isnan(explained_variance(torch.tensor(0.0), torch.tensor(0.3)).item())
    assert explained_variance(torch.tensor(2.0), torch.tensor(0.5)).item() == pytest.approx(0.75)


@pytest.mark.parametrize("objective", [n for n in available_objectives() if not n.startswith("test_")])
def test_every_objective_runs_in_ppo_mode(tmp_path, objective):
    """3 steps with mu = 2 (step 3 is off-policy) on a small rollout, two micro-batches per mini-batch."""
    extra = ["max_steps=3", "train.num_iterations=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
             "rollout.max_new_tokens=8", "train.micro_batch_size=2"]
    cfg = tiny_config(tmp_path, "advantage.name=gae", f"objective.name={objective}", "critic.learning_rate=1e-3",
                      *extra)
    history = Trainer(cfg).train()
    assert len(history) == cfg.max_steps
    for key in ("critic/value_loss", "critic/explained_variance", "critic/value_clip_frac",
                "critic/returns_mean", "critic/returns_std", "loss"):
        assert key in history[-1] and torch.isfinite(torch.tensor(history[-1][key]))
    assert (tmp_path / "critic" / "model.safetensors").is_file()


def test_critic_warmup_trains_critic_alone(tmp_path):
    cfg = tiny_config(tmp_path, "advantage.name=gae", "max_steps=2", "critic.warmup_steps=2",
                      "train.learning_rate=0.1", "critic.learning_rate=1e-2")
    trainer = Trainer(cfg)
    policy = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    critic = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    trainer.train()
    assert all(torch.equal(policy[n], p) for n, p in trainer.model.named_parameters())
    assert any(not torch.equal(critic[n], p) for n, p in trainer.critic.named_parameters())


def first_char_is_alnum(prompts, completions, **kwargs):
    """The value after the first emitted token is predictable from that token alone."""
    return [float(c[0]["content"][:1].isalnum()) for c in completions]


def test_value_loss_falls_and_explained_variance_is_defined(tmp_path):
    """The critic alone trains: critic.warmup_steps = max_steps keeps the policy, and so the value target, fixed.
    One micro-batch per step. The value loss falls from the random value head's to about the variance of the
    returns (measured over seeds 0-2: 0.27-0.9 over the first 10 steps, 0.11-0.15 over the last 10 of 50).

    The explained variance is only asked to be defined and not to get worse: over seeds 0-2 it stayed within
    0.05 of 0 over 50-80 steps with both rlclip's sampler and transformers' ``generate``, except one seed of
    ``generate`` (0.26 over steps 40-50), which this test used to rely on."""
    cfg = tiny_config(tmp_path, "advantage.name=gae", "advantage.lam=1.0", "max_steps=30", "critic.warmup_steps=30",
                      "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=4",
                      "train.num_iterations=1", "train.mini_batches=1", "train.micro_batch_size=32",
                      "critic.learning_rate=1e-2", "critic.value_clip=null")
    history = Trainer(cfg, reward_funcs=[first_char_is_alnum]).train()

    def mean(key, part):
        return sum(h[key] for h in part) / len(part)

    first, last = history[:10], history[-10:]
    assert mean("critic/value_loss", last) < 0.85 * mean("critic/value_loss", first)
    assert all(math.isfinite(h["critic/explained_variance"]) for h in history)
    assert mean("critic/explained_variance", last) > mean("critic/explained_variance", first) - 0.05


def test_lora_critic_trains_adapters_and_value_head(tmp_path):
    cfg = tiny_config(tmp_path, "advantage.name=gae", "critic.lora_r=4", "max_steps=2", "critic.learning_rate=1e-2")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.critic.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.critic.named_parameters() if not torch.equal(before[n], p)}
    assert any("lora_" in n for n in changed) and any("score" in n for n in changed)
    assert all("lora_" in n or "score" in n for n in changed)
