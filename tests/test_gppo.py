"""GPPO / CE-GPPO: gradient-preserving clipping as ``ratio_clip`` settings ``gppo_beta_low`` / ``gppo_beta_high``.

Reference, read at this commit (line numbers cited per function and test): github.com/Kwai-Klear/CE-GPPO
10558fe017ac776773fd7f29753d8353a11c0813, verl/trainer/ppo/core_algos.py: ``compute_gppo_loss`` (GPPO,
lines 444-529) and ``compute_gppo_loss_general_beta`` (CE-GPPO, lines 531-620; defaults beta1 0.25, beta2 1.0
at lines 541-542, also verl/trainer/config/ppo_trainer.yaml lines 50-51). ``gppo_ref`` and ``general_beta_ref``
transcribe them (torch only, float64, verl's token-mean on one process) and are the oracles of the comparisons;
the hand-value test spells the numbers out.

The one deliberate difference: on a clipped token the reference's loss *value* is beta times PPO's clipped
value (-beta (1 +/- eps) A), here it stays PPO's value; the gradient is the reference's. So beta = 1 matches
the reference in value and gradient, and beta = 0 is ``ratio_clip`` exactly (the reference's value would be 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_offpolicy_objectives import (
    D,
    assert_same,
    coin,
    fresh,
    log_ratio_batch,
    ours,
    peer,
    random_batch,
    token_mean,
)

from conftest import ROOT
from rlclip.errors import ConfigError
from rlclip.objectives import build_objective


def general_beta_ref(log_prob, old_log_prob, advantages, response_mask, low=0.2, high=0.2, c=3.0,
                     beta1=0.25, beta2=1.0):
    """CE-GPPO core_algos.py compute_gppo_loss_general_beta, lines 583-618 (token-mean)."""
    ratio = torch.exp(log_prob - old_log_prob)  # 583-584
    ratio_detached = ratio.detach()  # 586
    low_mask = (ratio < (1 - low)) & (advantages < 0)  # 595
    high_mask = (ratio > (1 + high)) & (advantages > 0)  # 596
    other_mask = ~(low_mask | high_mask)  # 597
    clip_pg_losses1 = torch.zeros_like(advantages)  # 603-606
    clip_pg_losses1[low_mask] = -beta1 * (1 - low) / ratio_detached[low_mask] * ratio[low_mask] * advantages[low_mask]
    clip_pg_losses1[high_mask] = (-beta2 * (1 + high) / ratio_detached[high_mask] * ratio[high_mask]
                                  * advantages[high_mask])
    clip_pg_losses1[other_mask] = -ratio[other_mask] * advantages[other_mask]
    pg_losses3 = -advantages * c  # 610
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)  # 612
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)  # 617
    return token_mean(pg_losses, response_mask)


def gppo_ref(log_prob, old_log_prob, advantages, response_mask, low=0.2, high=0.2, c=3.0, only_high=False):
    """CE-GPPO core_algos.py compute_gppo_loss (GPPO), lines 495-526 (token-mean). Line 505 reads the
    undefined name ``only_higher`` (the parameter is ``only_high``), and line 507 passes torch.clamp a float
    lower bound with a tensor upper bound, which torch refuses: the only_high branch cannot run there; it is
    transcribed as meant (the parameter, the float bound as a tensor)."""
    ratio = torch.exp(log_prob - old_log_prob)  # 495-496
    pg_losses1 = -advantages * ratio  # 499
    if only_high:  # 505-508
        pg_losses2 = -advantages * torch.clamp(ratio, torch.full_like(ratio, 1 - low),
                                               (1 + high) / ratio.detach() * ratio)
    else:  # 510-512
        pg_losses2 = -advantages * torch.clamp(ratio, (1 - low) / ratio.detach() * ratio,
                                               (1 + high) / ratio.detach() * ratio)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)  # 514-516
    pg_losses3 = -advantages * c  # 519
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)  # 521
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)  # 526
    return token_mean(pg_losses, response_mask)


NO_DUAL = 1e9  # the reference always applies its dual clip; a bound no loss reaches stands for none


def test_gppo_hand_values():
    # rho = [1.5, 0.5, 1.1, 1.3, 4.0], A = [1, -1, 1, -2, -1], eps_low 0.2, eps_high 0.28, dual clip 3,
    # beta_low 0.25, beta_high 1 (CE-GPPO's defaults), token mean over 5 tokens:
    # t0: A > 0, rho > 1.28: clipped high, loss -1.28 (PPO's), grad -1 * 1.28 * 1 = -1.28     (PPO: 0)
    # t1: A < 0, rho < 0.8:  clipped low,  loss 0.8 (PPO's),   grad -0.25 * 0.8 * (-1) = 0.2  (PPO: 0)
    # t2: inside, loss -1.1, grad -A rho = -1.1;  t3: A < 0, rho > 1 - eps: loss 2.6 < 3 * 2, grad 2.6
    # t4: A < 0, rho = 4 > c = 3: dual clip, loss 3, grad 0 (the reference's dual clip, line 612)
    b = log_ratio_batch([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.3), math.log(4.0)]],
                        [[1.0, -1.0, 1.0, -2.0, -1.0]])
    settings = dict(eps_low=0.2, eps_high=0.28, dual_clip=3.0, gppo_beta_low=0.25, gppo_beta_high=1.0)
    loss, grad, m = ours("ratio_clip", b, **settings)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 1.1 + 2.6 + 3.0) / 5, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-1.28, 0.2, -1.1, 2.6, 0.0]], dtype=D) / 5)
    assert (m["gppo_frac_low"].item(), m["gppo_frac_high"].item()) == pytest.approx((0.2, 0.2))
    assert (m["clip_frac_low"].item(), m["clip_frac_high"].item(), m["clip_frac_dual"].item()) == \
        pytest.approx((0.2, 0.2, 0.2))
    # the reference: same gradient; value -beta (1 +/- eps) A on the clipped tokens (0.2 instead of 0.8 at t1)
    ref_loss, ref_grad = peer(general_beta_ref, b, low=0.2, high=0.28, c=3.0, beta1=0.25, beta2=1.0)
    torch.testing.assert_close(ref_grad, grad, rtol=1e-12, atol=1e-12)
    assert ref_loss.item() == pytest.approx((-1.28 + 0.2 - 1.1 + 2.6 + 3.0) / 5, abs=1e-12)
    # PPO (no GPPO): the clipped tokens lose their gradient
    _, grad, m = ours("ratio_clip", b, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -1.1, 2.6, 0.0]], dtype=D) / 5)
    assert "gppo_frac_low" not in m


def clipped_value_gap(b, low, high, beta1, beta2):
    """token_mean of (1 - beta) * PPO's clipped value over the clipped tokens: ours minus the reference's loss."""
    ratio = torch.exp(b.logprobs.detach() - b.old_logprobs)
    adv = b.advantages
    gap = torch.where((ratio < 1 - low) & (adv < 0), -(1 - beta1) * (1 - low) * adv, 0.0)
    gap = gap + torch.where((ratio > 1 + high) & (adv > 0), -(1 - beta2) * (1 + high) * adv, 0.0)
    return token_mean(gap, b.mask)


@pytest.mark.parametrize("beta1, beta2", [(0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0), (0.0, 0.0),
                                          (1.3, 0.4)])
@pytest.mark.parametrize("dual", [3.0, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_equals_ce_gppo_reference(beta1, beta2, dual, seed):
    b = random_batch(seed, scale=0.6)
    low, high = 0.2, 0.28
    loss, grad, m = ours("ratio_clip", b, eps_low=low, eps_high=high, dual_clip=dual, gppo_beta_low=beta1,
                         gppo_beta_high=beta2)
    ref_loss, ref_grad = peer(general_beta_ref, b, low=low, high=high, c=dual or NO_DUAL, beta1=beta1, beta2=beta2)
    assert m["gppo_frac_low"] > 0 or beta1 == 0  # the batch has tokens on both sides of both clips
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] > 0
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss + clipped_value_gap(b, low, high, beta1, beta2), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("only_high", [False, True])
@pytest.mark.parametrize("dual", [3.0, 10.0])
def test_beta_one_is_gppo_in_value_and_gradient(only_high, dual):
    """Klear-Reasoner's GPPO (compute_gppo_loss) is beta = 1; its only_high mode keeps PPO's lower clip."""
    b = random_batch(3, scale=0.6)
    settings = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual, gppo_beta_high=1.0)
    if not only_high:
        settings["gppo_beta_low"] = 1.0
    assert_same(ours("ratio_clip", b, **settings)[:2],
                peer(gppo_ref, b, low=0.2, high=0.28, c=dual, only_high=only_high))


@pytest.mark.parametrize("settings", [dict(eps_low=0.2, eps_high=0.28), dict(eps_low=0.1, eps_high=0.3, dual_clip=3.0),
                                      dict(eps_low=0.2, eps_high=0.2, dual_clip=1.5, agg="seq_mean_token_sum")])
def test_beta_zero_is_ratio_clip(settings):
    b = random_batch(5, scale=0.6)
    plain = ours("ratio_clip", b, **settings)
    assert plain[2]["clip_frac_low"] > 0 and plain[2]["clip_frac_high"] > 0
    assert_same(ours("ratio_clip", b, gppo_beta_low=0.0, gppo_beta_high=0.0, **settings)[:2], plain[:2])
    # and beta > 0 does change the gradient (so the comparison above can fail)
    moved = ours("ratio_clip", b, gppo_beta_low=0.5, gppo_beta_high=0.5, **settings)
    torch.testing.assert_close(moved[0], plain[0], rtol=1e-12, atol=1e-12)  # the value is PPO's
    assert not torch.allclose(moved[1], plain[1])


def test_on_policy_gppo_is_the_policy_gradient():
    b = random_batch(6, scale=0.6)
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("ratio_clip", on, gppo_beta_low=0.25, gppo_beta_high=1.0)[:2], ours("ratio_clip", on)[:2])


def test_defaults_and_bad_settings():
    obj = build_objective("ratio_clip")
    assert (obj.gppo_beta_low, obj.gppo_beta_high) == (None, None)
    obj = build_objective("ratio_clip", gppo_beta_low=1, gppo_beta_high=1)
    assert (obj.gppo_beta_low, obj.gppo_beta_high) == (1.0, 1.0)
    for bad, match in [({"gppo_beta_low": -0.1}, "gppo_beta_low must be >= 0"),
                       ({"gppo_beta_high": -1.0}, "gppo_beta_high must be >= 0"),
                       ({"gppo_beta_high": 1.0, "delta": 4.0}, "delta"),
                       ({"gppo_beta_low": 0.25, "level": "sequence"}, "level: token"),
                       ({"gppo_beta_low": 5.0, "dual_clip": 3.0}, "dual_clip")]:
        with pytest.raises(ConfigError, match=match) as err:
            build_objective("ratio_clip", **bad)
        assert "\n" not in str(err.value)
    # without GPPO the other settings combine as before
    build_objective("ratio_clip", delta=4.0, level="sequence", gppo_beta_low=None)


@pytest.mark.parametrize("name, betas", [("gppo", (1.0, 1.0)), ("ce_gppo", (0.25, 1.0))])
def test_gsm8k_recipes(name, betas):
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / f"recipes/gsm8k/grpo_{name}.yaml")
    obj = build_objective_from_config(config)
    assert obj.name == "ratio_clip" and config.data.name == "gsm8k"
    assert (obj.gppo_beta_low, obj.gppo_beta_high) == betas
    assert (obj.eps_low, obj.eps_high, obj.dual_clip) == (0.2, 0.28, 10.0)


def test_trains_through_the_trainer(tmp_path):
    """Two mini-batches, mu = 2 and tight clips: from step 2 on clipped tokens keep a gradient."""
    from conftest import tiny_config
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "objective.eps_low=0.01", "objective.eps_high=0.01", "objective.gppo_beta_low=0.25",
                      "objective.gppo_beta_high=1.0", "max_steps=3", "rollout.prompts_per_step=2",
                      "rollout.group_size=4", "rollout.max_new_tokens=8")
    history = Trainer(cfg, reward_funcs=[coin]).train()
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    for side in ("low", "high"):
        assert history[0][f"objective/gppo_frac_{side}"] == 0.0
    assert max(h["objective/gppo_frac_low"] + h["objective/gppo_frac_high"] for h in history) > 0
