"""ASPO (arXiv 2510.06062): the flipped importance weight 1 / rho for positive advantages, soft dual clip.

Reference, read at this commit (line numbers cited per function and test): github.com/wizard-III/Archer2.0
b08d963d5d65909ef1f24dba2f382006d0be33e1: ``compute_policy_loss_archer`` in verl/trainer/ppo/core_algos.py
(lines 537-583) and its call in verl/workers/actor/dp_actor.py (lines 402-424: the per-response entropy split
and the settings, which are the defaults here). ``aspo_ref`` transcribes both (torch only, float64, verl's
token-mean on one process) and is the oracle of the comparisons; the hand-value tests spell the numbers out.
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


def aspo_ref(log_prob, old_log_prob, advantages, response_mask, entropy=None, q=0.8, low_eps=0.2, high_eps=0.4,
             c_neg=3.0, c_pos=3.0):
    """Archer2.0 dp_actor.py lines 404-407 (the entropy mask) and core_algos.py compute_policy_loss_archer,
    lines 555-581 (token-mean). The reference's ``high_entropy_mask`` is True on the *low*-entropy tokens
    (its comment on line 407 says so); they take the 0.2 ranges (``negative_low_entropy_clip_ratio_low``...)."""
    mask = response_mask.bool()
    if entropy is None:
        entropy = torch.zeros_like(log_prob)
    masked_entropy = torch.where(mask, entropy, torch.nan)  # 405
    q80 = torch.nanquantile(masked_entropy, q=q, dim=-1, keepdim=True)  # 406
    high_entropy_mask = (masked_entropy <= q80) & mask  # 407
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))  # 555
    negative_clip_ratio = torch.where(high_entropy_mask, torch.clamp(ratio, min=1 - low_eps, max=None),
                                      torch.clamp(ratio, min=1 - high_eps, max=None))  # 557
    positive_clip_ratio = torch.where(high_entropy_mask, torch.clamp(ratio, min=None, max=1 + low_eps),
                                      torch.clamp(ratio, min=None, max=1 + high_eps))  # 558
    negative_pg_losses_clip = -advantages * negative_clip_ratio  # 565
    positive_pg_losses_clip = (-advantages * (positive_clip_ratio / positive_clip_ratio.detach())
                               / positive_clip_ratio.detach())  # 566
    negative_dual_clip_ratio = torch.clamp(negative_clip_ratio, min=None, max=c_neg)  # 568
    negative_clipped_mask = torch.gt(negative_clip_ratio, negative_dual_clip_ratio)  # 569
    negative_pg_losses_dual = -advantages * negative_dual_clip_ratio.detach() * log_prob  # 571
    negative_pg_losses = torch.where(negative_clipped_mask, negative_pg_losses_dual, negative_pg_losses_clip)  # 572
    positive_dual_clip_ratio = torch.clamp(1 / positive_clip_ratio, min=None, max=c_pos)  # 574
    positive_clipped_mask = torch.gt(1 / positive_clip_ratio, positive_dual_clip_ratio)  # 575
    positive_pg_losses_dual = -advantages * positive_dual_clip_ratio.detach() * log_prob  # 577
    positive_pg_losses = torch.where(positive_clipped_mask, positive_pg_losses_dual, positive_pg_losses_clip)  # 578
    pg_losses = torch.where(advantages < 0, negative_pg_losses, positive_pg_losses)  # 580
    return token_mean(pg_losses, response_mask)  # 581


def test_aspo_hand_values():
    # one clip range 0.2 (no entropy needed), c_neg = c_pos = 3, log-probs -0.7, token mean over 6 tokens:
    # t0: A = 1,  rho 1.1:  flipped weight, loss -1/1.1, grad -A/rho = -1/1.1      (PPO: -1.1)
    # t1: A = 1,  rho 1.5 > 1.2: clipped high, loss -1/1.2, grad 0
    # t2: A = 2,  rho 0.25: 1/rho = 4 > 3, soft dual clip: loss -2 * 3 * (-0.7) = 4.2, grad -2 * 3 = -6
    # t3: A = -1, rho 0.5 < 0.8: clipped low, loss 0.8, grad 0
    # t4: A = -1, rho 4 > 3: soft dual clip: loss 3 * (-0.7) = -2.1, grad 3       (dual-clip PPO: 0)
    # t5: A = -2, rho 1.3: PPO's, loss 2.6, grad 2.6
    ratios = [1.1, 1.5, 0.25, 0.5, 4.0, 1.3]
    b = log_ratio_batch([[math.log(r) for r in ratios]], [[1.0, 1.0, 2.0, -1.0, -1.0, -2.0]])
    loss, grad, m = ours("aspo", b, eps_knowledge=0.2, eps_reasoning=0.2)
    assert loss.item() == pytest.approx((-1 / 1.1 - 1 / 1.2 + 4.2 + 0.8 - 2.1 + 2.6) / 6, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 1.1, 0.0, -6.0, 0.0, 3.0, 2.6]], dtype=D) / 6)
    assert (m["clip_frac_low"].item(), m["clip_frac_high"].item()) == pytest.approx((1 / 6, 1 / 6))
    assert (m["clip_frac_dual_neg"].item(), m["clip_frac_dual_pos"].item()) == pytest.approx((1 / 3, 1 / 3))
    assert m["is_weight_mean"].item() == pytest.approx((1 / 1.1 + 3.0 + 3.0 + 1.3) / 6)
    assert_same((loss, grad), peer(aspo_ref, b, low_eps=0.2, high_eps=0.2))
    # without the soft dual clips the weights are 1/rho = 4 at t2 and rho = 4 at t4
    _, grad, _ = ours("aspo", b, eps_knowledge=0.2, eps_reasoning=0.2, dual_clip_neg=None, dual_clip_pos=None)
    torch.testing.assert_close(grad, torch.tensor([[-1 / 1.1, 0.0, -8.0, 0.0, 4.0, 2.6]], dtype=D) / 6)


def test_entropy_split_hand_values():
    # entropies [0.1, 0.5, 0.9, 0.3, 0.7]: sorted 0.1 0.3 0.5 0.7 0.9, q = 0.8 -> position 3.2 -> tau = 0.74;
    # only the third token (0.9) is a reasoning token, with range 0.4. All rho = 1.3, A = 1: the knowledge
    # tokens are clipped at 1.2 (no gradient), the reasoning token keeps -A / rho = -1 / 1.3.
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3, 0.7]], dtype=D)
    b = log_ratio_batch([[math.log(1.3)] * 5], [[1.0]], entropy=entropy)
    loss, grad, m = ours("aspo", b)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -1 / 1.3, 0.0, 0.0]], dtype=D) / 5)
    assert loss.item() == pytest.approx((-4 / 1.2 - 1 / 1.3) / 5, abs=1e-12)
    assert m["reasoning_frac"].item() == pytest.approx(0.2)
    assert_same((loss, grad), peer(aspo_ref, b, entropy=entropy))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", [{}, {"q": 0.5, "eps_knowledge": 0.1, "eps_reasoning": 0.3},
                                      {"dual_clip_neg": 1.5, "dual_clip_pos": 2.0}])
def test_equals_archer2_reference(seed, settings):
    g = torch.Generator().manual_seed(100 + seed)
    b = random_batch(seed, b=8, t=9, scale=1.5)
    b = fresh(b, entropy=torch.rand(b.mask.shape, generator=g, dtype=D) * 2)
    loss, grad, m = ours("aspo", b, **settings)
    assert m["clip_frac_dual_neg"] > 0 and m["clip_frac_dual_pos"] > 0 and m["clip_frac_high"] > 0
    ref = dict(q=settings.get("q", 0.8), low_eps=settings.get("eps_knowledge", 0.2),
               high_eps=settings.get("eps_reasoning", 0.4), c_neg=settings.get("dual_clip_neg", 3.0),
               c_pos=settings.get("dual_clip_pos", 3.0))
    assert_same((loss, grad), peer(aspo_ref, b, entropy=b.entropy, **ref))


def test_reductions():
    b = random_batch(7, scale=0.6)
    # all advantages negative, one range, no soft dual clip: PPO's clipped loss (the upper range is then idle)
    neg = fresh(b, advantages=-b.advantages.abs() - 0.1)
    aspo = ours("aspo", neg, eps_knowledge=0.25, eps_reasoning=0.25, dual_clip_neg=None)
    assert aspo[2]["clip_frac_low"] > 0
    assert_same(aspo[:2], ours("ratio_clip", neg, eps_low=0.25, eps_high=0.1)[:2])
    # on-policy (rho = 1): the policy gradient -A d log pi, as ratio_clip, whatever the settings
    on = fresh(b, old_logprobs=b.logprobs.detach().clone(), entropy=torch.rand(b.mask.shape, dtype=D))
    assert_same(ours("aspo", on)[:2], ours("ratio_clip", on)[:2])
    # positive advantages: the gradient is unclipped PPO's times 1 / rho^2 (rho -> 1 / rho) up to 1 + eps, 0 above
    pos = fresh(b, advantages=b.advantages.abs() + 0.1)
    ratio = torch.exp(b.logprobs.detach() - b.old_logprobs)
    above = ratio > 1.9
    assert above.any() and (~above).any()
    grad = ours("aspo", pos, eps_knowledge=0.9, eps_reasoning=0.9, dual_clip_pos=None)[1]
    unclipped = ours("ratio_clip", pos, eps_low=1.0, eps_high=1e9)[1]
    torch.testing.assert_close(grad, torch.where(above, 0.0, unclipped / ratio**2), rtol=1e-12, atol=1e-12)


def test_defaults_and_bad_settings():
    obj = build_objective("aspo")
    assert (obj.q, obj.eps_knowledge, obj.eps_reasoning, obj.dual_clip_neg, obj.dual_clip_pos, obj.agg) == \
        (0.8, 0.2, 0.4, 3.0, 3.0, "token_mean")
    assert obj.needs == {"entropy"}
    assert build_objective("aspo", eps_reasoning=0.2).needs == set()
    # the shared needs stay: the reference model for the KL, the entropy for the entropy filter
    assert build_objective("aspo", kl_coef=0.001).needs == {"entropy", "ref"}
    assert build_objective("aspo", eps_reasoning=0.2, entropy_top_quantile=0.5).needs == {"entropy"}
    for bad in ({"q": 1.5}, {"eps_knowledge": -0.1}, {"eps_reasoning": 1.0}, {"dual_clip_neg": 1.0},
                {"dual_clip_pos": 0.5}):
        with pytest.raises(ConfigError, match="aspo") as err:
            build_objective("aspo", **bad)
        assert "\n" not in str(err.value)


def test_gsm8k_recipe():
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / "recipes/gsm8k/grpo_aspo.yaml")
    obj = build_objective_from_config(config)
    assert obj.name == "aspo" and config.data.name == "gsm8k"
    assert (obj.q, obj.eps_knowledge, obj.eps_reasoning, obj.dual_clip_neg, obj.dual_clip_pos) == \
        (0.8, 0.2, 0.4, 3.0, 3.0)
    assert (obj.kl_coef, obj.kl_estimator) == (0.001, "low_var_kl") and obj.needs == {"entropy", "ref"}


def test_trains_through_the_trainer(tmp_path):
    """Two mini-batches, mu = 2, tight ranges: from step 2 on the clips act (entropy and, for the authors' KL,
    the reference log-probs come from the trainer)."""
    from conftest import tiny_config
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "objective.name=aspo", "objective.eps_knowledge=0.01", "objective.eps_reasoning=0.02",
                      "objective.kl_coef=0.001", "objective.kl_estimator=low_var_kl", "max_steps=3", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8")
    history = Trainer(cfg, reward_funcs=[coin]).train()
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0]["objective/clip_frac_high"] == 0.0
    assert max(h["objective/clip_frac_high"] + h["objective/clip_frac_low"] for h in history) > 0
    assert all(0 < h["objective/reasoning_frac"] < 1 for h in history)
    assert max(h["objective/kl_ref"] for h in history) > 0
