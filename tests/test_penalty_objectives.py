"""Penalty surrogates without a clip: ``spo``, ``dro`` and ``dppo_kimi`` (prime-rl's default loss).

Peers, read at these commits (line numbers cited per function and test):

- SPO, the authors' code: github.com/MyRepositories-hub/Simple-Policy-Optimization
  9fdeda315b00cee82d1dc4e10c01db200c97e909, atari/trainer.py (lines 29-30, 88-92), atari/main.py (line 42);
- verl: github.com/verl-project/verl 1dda039b9c6311889a9c9a26040677e1254814f9,
  verl/trainer/ppo/core_algos.py ``compute_policy_loss_dro`` (lines 2013-2043);
- prime-rl: github.com/PrimeIntellect-ai/prime-rl 559b44772e471d1538537b8805cc77f3824a5e64,
  src/prime_rl/trainer/rl/loss.py ``default_loss_fn`` (lines 109-161) and
  packages/prime-rl-configs/src/prime_rl/configs/trainer.py ``DefaultLossConfig`` (lines 494-507).

``spo_authors`` and ``dro_verl`` transcribe the peers (torch only, float64); prime-rl's transcription is
``dppo_prime_rl`` in tests/test_offpolicy_objectives.py. The hand-value tests spell the numbers out.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_offpolicy_objectives import (
    D,
    assert_same,
    dppo_prime_rl,
    fresh,
    log_ratio_batch,
    ours,
    peer,
    prob_batch,
    random_batch,
    token_mean,
)

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective

# --------------------------------------------------------------------------------------------- spo

def spo_authors(new_log_prob, old_log_prob, advantages, mask, epsilon=0.2):
    """SPO's compute_policy_loss (atari/trainer.py lines 88-92), ratios as lines 29-30; the mean over the
    mini-batch's actions is the token mean over counted tokens."""
    ratios = (new_log_prob - old_log_prob).exp()
    per_token = -(advantages * ratios - torch.abs(advantages) * torch.pow(ratios - 1, 2) / (2 * epsilon))
    return token_mean(per_token, mask)


def test_spo_hand_values_from_the_authors_code():
    # L = -(A r - |A| (r - 1)^2 / (2 eps)), eps 0.2; dL/dlogp = -r (A - |A| (r - 1) / eps); token mean of 5
    #   t0 r 1.5, A  1: L = -(1.5 - 0.25 / 0.4)   = -0.875   grad = -1.5 (1 - 0.5 / 0.2)    =  2.25
    #   t1 r 0.5, A -2: L = -(-1 - 2 * 0.25 / 0.4) =  2.25   grad = -0.5 (-2 + 2 * 0.5 / 0.2) = -1.5
    #   t2 r 1.2, A  1: L = -(1.2 - 0.04 / 0.4)   = -1.1     grad = 0  (the optimum rho = 1 + eps)
    #   t3 r 0.8, A -1: L = -(-0.8 - 0.04 / 0.4)  =  0.9     grad = 0  (the optimum rho = 1 - eps)
    #   t4 r 1.0, A  2: L = -2                               grad = -2 (the policy gradient)
    b = log_ratio_batch([[math.log(r) for r in (1.5, 0.5, 1.2, 0.8, 1.0)]], [[1.0, -2.0, 1.0, -1.0, 2.0]])
    loss, grad, m = ours("spo", b)
    assert loss.item() == pytest.approx((-0.875 + 2.25 - 1.1 + 0.9 - 2.0) / 5, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[2.25, -1.5, 0.0, 0.0, -2.0]], dtype=D) / 5,
                               rtol=1e-12, atol=1e-14)
    assert m["penalty_mean"].item() == pytest.approx((0.625 + 1.25 + 0.1 + 0.1) / 5, rel=1e-12)
    assert_same((loss, grad), peer(spo_authors, b))
    # eps 0.1: t2 and t3 are now outside the trust region and their gradient points back (toward r = 1.1 / 0.9)
    _, grad, m = ours("spo", b, eps=0.1)
    torch.testing.assert_close(grad, torch.tensor([[-1.5 * (1 - 5), -0.5 * (-2 + 10), -1.2 * (1 - 2),
                                                    -0.8 * (-1 + 2), -2.0]], dtype=D) / 5)
    assert m["outside_frac"].item() == pytest.approx(0.8)


@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_spo_equals_the_authors_code_on_random_batches(eps):
    b = random_batch(11, scale=0.5)
    assert_same(ours("spo", b, eps=eps)[:2], peer(spo_authors, b, epsilon=eps))


def test_spo_reduces_to_the_policy_gradient_near_ratio_one():
    b = random_batch(12, scale=0.5)
    # on-policy, r = 1 exactly: the gradient -A of ratio_clip (and its loss), and of REINFORCE (gpg)
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    spo = ours("spo", on)
    assert_same(spo[:2], ours("ratio_clip", on)[:2])
    torch.testing.assert_close(spo[1], ours("gpg", on)[1], rtol=1e-12, atol=1e-12)
    # small steps: |log r| <= 1e-6, the gradients differ by r |A| (r - 1) / eps = O(1e-6 / eps)
    near = fresh(b, old_logprobs=b.logprobs.detach() + 1e-6 * torch.randn(b.mask.shape, dtype=D,
                                                                              generator=torch.Generator().manual_seed(0)))
    gap = (ours("spo", near)[1] - ours("ratio_clip", near)[1]).abs().max().item()
    assert 0 < gap < 1e-6
    # a step of 0.3 in log r: no longer the same (the penalty acts inside PPO's clip range too)
    far = (ours("spo", b)[1] - ours("ratio_clip", b, eps_low=1e9, eps_high=1e9)[1]).abs().max().item()
    assert far > 1e-2
    # eps -> infinity: no penalty, the unclipped ratio objective -A r (ratio_clip without clipping)
    torch.testing.assert_close(ours("spo", b, eps=1e12)[1], ours("ratio_clip", b, eps_low=1e9, eps_high=1e9)[1],
                               rtol=1e-9, atol=1e-12)


def test_spo_defaults_and_bad_settings():
    obj = build_objective("spo")
    assert (obj.eps, obj.agg, obj.kl_coef) == (0.2, "token_mean", 0.0)
    for bad in (0.0, -0.2, math.nan):
        with pytest.raises(ConfigError, match="spo: eps"):
            build_objective("spo", eps=bad)


# --------------------------------------------------------------------------------------------- dro

def dro_verl(log_prob, old_log_prob, advantages, response_mask, beta=0.05, rollout_is_weights=None):
    """verl core_algos.py compute_policy_loss_dro, lines 2031-2037 (token-mean)."""
    log_ratio = log_prob - old_log_prob  # 2031
    pg_losses = -(log_prob * advantages - 0.5 * beta * log_ratio.square())  # 2032
    if rollout_is_weights is not None:  # 2034-2035
        pg_losses = pg_losses * rollout_is_weights
    return token_mean(pg_losses, response_mask)  # 2037


def test_dro_hand_values_from_verl():
    # verl's own test batch (tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py at 1dda039b):
    # log-ratios [0.2, -0.2, (0.1 masked)], beta 0.05:
    #   t0: -(-0.8 * 2 - 0.025 * 0.04) = 1.601        grad -2 + 0.05 * 0.2 = -1.99
    #   t1: -(-0.9 * -1.5 - 0.025 * 0.04) = -1.349    grad 1.5 - 0.05 * 0.2 = 1.49
    b = PolicyBatch(logprobs=torch.tensor([[-0.8, -0.9, -0.1]], dtype=D).requires_grad_(),
                    old_logprobs=torch.tensor([[-1.0, -0.7, -0.2]], dtype=D),
                    advantages=torch.tensor([[2.0, -1.5, 9.0]], dtype=D), mask=torch.tensor([[1.0, 1.0, 0.0]], dtype=D))
    loss, grad, m = ours("dro", b)
    assert loss.item() == pytest.approx((1.601 - 1.349) / 2, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-1.99, 1.49, 0.0]], dtype=D) / 2, rtol=1e-12, atol=1e-14)
    assert m["penalty_mean"].item() == pytest.approx(0.001, rel=1e-9)
    assert m["log_ratio_mean"].item() == pytest.approx(0.0, abs=1e-15)
    assert_same((loss, grad), peer(dro_verl, b))


@pytest.mark.parametrize("beta", [0.05, 1.0])
def test_dro_equals_verl_on_random_batches_with_and_without_correction_weights(beta):
    b = random_batch(13, scale=0.5)
    assert_same(ours("dro", b, beta=beta)[:2], peer(dro_verl, b, beta=beta))
    # rlclip's PolicyBatch.token_weights multiply the whole per-token loss, as verl's rollout_is_weights
    w = torch.rand(b.mask.shape, dtype=D, generator=torch.Generator().manual_seed(1)) + 0.5
    assert_same(ours("dro", fresh(b, token_weights=w), beta=beta)[:2],
                peer(dro_verl, b, beta=beta, rollout_is_weights=w))


def test_dro_reductions():
    b = random_batch(14, scale=0.5)
    # on-policy the penalty and its gradient vanish: REINFORCE (gpg), loss and gradient
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("dro", on, beta=0.7)[:2], ours("gpg", on)[:2])
    # off-policy: gpg plus beta / 2 times the token mean of the squared log-ratio (gradient beta * log r)
    dro, gpg = ours("dro", b, beta=0.3), ours("gpg", b)
    lr = b.logprobs.detach() - b.old_logprobs
    assert dro[0].item() == pytest.approx(gpg[0].item() + 0.15 * token_mean(lr ** 2, b.mask).item(), rel=1e-12)
    torch.testing.assert_close(dro[1], gpg[1] + 0.3 * lr * b.mask / b.mask.sum(), rtol=1e-12, atol=1e-14)


def test_dro_defaults_and_bad_settings():
    obj = build_objective("dro")
    assert (obj.beta, obj.agg, obj.kl_coef) == (0.05, "token_mean", 0.0)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="dro: beta"):
            build_objective("dro", beta=bad)


# --------------------------------------------------------------------------------------------- dppo_kimi

def test_dppo_kimi_hand_values_from_prime_rl():
    # prime-rl loss.py 130-146: Binary-TV mask at 0.2 (A > 0: p - p_old > 0.2 masked; A < 0: < -0.2 masked),
    # policy term -A rho keep, plus kl_tau (1e-3) (log rho)^2 on every token; token mean of 4
    #   t0 p .5 / .4, A  1: +0.1 valid, rho 1.25      t1 p .7 / .4, A  1: +0.3 masked
    #   t2 p .1 / .4, A -1: -0.3 masked               t3 p .3 / .4, A -2: -0.1 valid, rho 0.75
    p, p_old, adv = [[0.5, 0.7, 0.1, 0.3]], [[0.4] * 4], [[1.0, 1.0, -1.0, -2.0]]
    b = prob_batch(p, p_old, adv)
    lr = [math.log(x / 0.4) for x in p[0]]
    loss, grad, m = ours("dppo_kimi", b)
    pen = 1e-3 * sum(x * x for x in lr)
    assert loss.item() == pytest.approx((-1.25 * math.log(0.5) + 2 * 0.75 * math.log(0.3) + pen) / 4, rel=1e-12)
    expected = torch.tensor([[-1.25, 0.0, 0.0, 1.5]], dtype=D) + 2e-3 * torch.tensor([lr], dtype=D)
    torch.testing.assert_close(grad, expected / 4, rtol=1e-12, atol=1e-14)
    assert m["penalty_mean"].item() == pytest.approx(pen / 4, rel=1e-12)
    assert (m["clip_frac_high"].item(), m["clip_frac_low"].item(), m["masked_frac"].item()) == \
        pytest.approx((0.25, 0.25, 0.5))
    # prime-rl keeps the gradient in rho: the same gradient, its loss differs only in the policy term
    prime = peer(dppo_prime_rl, b, kl_tau=1e-3)
    torch.testing.assert_close(grad, prime[1], rtol=1e-12, atol=1e-14)
    assert prime[0].item() == pytest.approx((-1.25 + 2 * 0.75 + pen) / 4, rel=1e-12)


@pytest.mark.parametrize("kl_tau, eps", [(1e-3, 0.2), (0.5, 0.05)])
def test_dppo_kimi_gradient_equals_prime_rl_on_random_batches(kl_tau, eps):
    b = random_batch(15, scale=0.8)
    loss, grad, m = ours("dppo_kimi", b, kl_tau=kl_tau, eps_low=eps, eps_high=eps)
    assert 0 < m["masked_frac"] < 1
    prime_loss, prime_grad = peer(dppo_prime_rl, b, low=eps, high=eps, kl_tau=kl_tau)
    torch.testing.assert_close(grad, prime_grad, rtol=1e-12, atol=1e-12)
    # the penalty parts agree exactly: subtract each side's penalty-free loss
    plain = ours("dppo", b, eps_low=eps, eps_high=eps, is_cap=None)[0]
    prime_plain = peer(dppo_prime_rl, b, low=eps, high=eps)[0]
    assert (loss - plain).item() == pytest.approx((prime_loss - prime_plain).item(), rel=1e-12)


def test_dppo_kimi_reductions():
    b = random_batch(16, scale=0.8)
    # kl_tau = 0: dppo with prime-rl's thresholds and no cap (one implementation of the mask)
    assert_same(ours("dppo_kimi", b, kl_tau=0.0)[:2], ours("dppo", b, eps_low=0.2, eps_high=0.2, is_cap=None)[:2])
    assert_same(ours("dppo_kimi", b, kl_tau=0.0, variant="kl")[:2], ours("dppo", b, variant="kl", is_cap=None)[:2])
    # on-policy: nothing masked, no penalty: REINFORCE (gpg)
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("dppo_kimi", on, kl_tau=0.3)[:2], ours("gpg", on)[:2])
    # the penalty is dro's: dppo_kimi - dppo = (2 kl_tau / beta) (dro - gpg)
    kimi = ours("dppo_kimi", b, kl_tau=0.1)[0] - ours("dppo", b, eps_low=0.2, eps_high=0.2, is_cap=None)[0]
    dro = ours("dro", b, beta=0.2)[0] - ours("gpg", b)[0]
    assert kimi.item() == pytest.approx(dro.item(), rel=1e-12)


def test_dppo_kimi_defaults_and_bad_settings():
    obj = build_objective("dppo_kimi")
    assert (obj.variant, obj.eps_low, obj.eps_high, obj.is_cap, obj.kl_tau, obj.agg) == \
        ("tv", 0.2, 0.2, None, 1e-3, "token_mean")
    kl = build_objective("dppo_kimi", variant="kl")
    assert (kl.eps_low, kl.eps_high) == (0.05, 0.05)
    assert build_objective("dppo_kimi", eps_high=0.1).eps_low == 0.2
    with pytest.raises(ConfigError, match="kl_tau"):
        build_objective("dppo_kimi", kl_tau=-1e-3)
    for bad in ({"variant": "js"}, {"eps_low": -0.1}, {"is_cap": 0.0}):
        with pytest.raises(ConfigError, match="dppo"):
            build_objective("dppo_kimi", **bad)


# --------------------------------------------------------------------------------------------- recipes, trainer

@pytest.mark.parametrize("name", ["spo", "dro", "dppo_kimi"])
def test_gsm8k_recipe(name):
    from conftest import ROOT
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / f"recipes/gsm8k/grpo_{name}.yaml")
    assert config.objective["name"] == name and config.data.name == "gsm8k"
    assert build_objective_from_config(config).name == name


@pytest.mark.parametrize("overrides, metric", [
    (["objective.name=spo", "objective.eps=0.001"], "objective/outside_frac"),
    (["objective.name=dro"], "objective/penalty_mean"),
    (["objective.name=dppo_kimi", "objective.kl_tau=0.1"], "objective/penalty_mean"),
])
def test_trains_through_the_trainer(tmp_path, overrides, metric):
    """Two mini-batches, mu = 2: from step 2 on the policy has moved, so the penalties act."""
    from conftest import train_tiny

    history = train_tiny(tmp_path, *overrides)
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    # step 1: the policy is the behaviour policy; not exactly 0 since the update pass packs each shuffled
    # mini-batch's prompt groups differently from the behaviour pass (train.shared_prompt): float sums, ~1e-16
    assert abs(history[0][metric]) < 1e-12 and max(h[metric] for h in history) > 1e-6
