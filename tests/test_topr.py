"""``topr``: Tapered Off-Policy REINFORCE (arXiv 2503.14286).

The authors released no code that we found; the hand values follow the paper's gradient (section 3:
positive examples weighted 1, negative ones by the truncated trajectory ratio [pi / mu]_0^1). The public
token-level implementation transcribed as the oracle of ``level="token"``: Trinity-RFT's ``topr`` policy
loss, github.com/yanxi-chen/Trinity-RFT (a fork of agentscope-ai/Trinity-RFT) at commit
5b77c089fe79a4e24308bfb9a99aa6641960f613, trinity/algorithm/policy_loss_fn/topr_policy_loss.py lines 43-58.
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

from rlclip.errors import ConfigError
from rlclip.objectives import build_objective


def topr_trinity(logprob, old_logprob, advantages, action_mask, advantage_threshold=0.0):
    """Trinity-RFT topr_policy_loss.py lines 43-58 (loss_agg_mode token-mean)."""
    log_ratio = logprob - old_logprob  # 43
    ratio = torch.exp(log_ratio)  # 44
    ratio_clamped = torch.clamp(ratio, min=0.0, max=1.0)  # 45
    alpha = torch.where(advantages <= advantage_threshold, ratio_clamped, torch.ones_like(ratio))  # 49-51
    topr_loss = -alpha.detach() * advantages * logprob  # 55
    return token_mean(topr_loss, action_mask)  # 58


def test_topr_hand_values_from_the_paper():
    # row 0, A = +1: log ratios [0.3, 0.4] (rho = e^0.7 > 1): a positive example, weight 1 (SFT)
    # row 1, A = -2: log ratios [-0.2, -0.3] -> sequence rho = e^-0.5 < 1: weight e^-0.5
    # row 2, A = -1: log ratios [0.5, 0.1] -> sequence rho = e^0.6 > 1: truncated to 1
    b = log_ratio_batch([[0.3, 0.4], [-0.2, -0.3], [0.5, 0.1]], [[1.0], [-2.0], [-1.0]],
                        logprobs=[[-0.5, -1.0], [-2.0, -0.7], [-0.1, -1.5]])
    w1 = math.exp(-0.5)
    loss, grad, m = ours("topr", b)
    expected = (1.0 * (0.5 + 1.0) - 2 * w1 * (2.0 + 0.7) - 1.0 * (0.1 + 1.5)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0], [2 * w1, 2 * w1], [1.0, 1.0]], dtype=D) / 6,
                               rtol=1e-12, atol=1e-14)
    assert m["is_weight_mean"].item() == pytest.approx((4 + 2 * w1) / 6, rel=1e-12)
    assert m["negative_frac"].item() == pytest.approx(4 / 6)
    assert m["clip_frac_is_cap"].item() == pytest.approx(2 / 6)  # row 2's two tokens
    # token level: row 1 weights [e^-0.2, e^-0.3]; row 2 [1 (e^0.5 capped), 1 (e^0.1 capped)]
    _, grad, m = ours("topr", b, level="token")
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.0], [2 * math.exp(-0.2), 2 * math.exp(-0.3)],
                                                   [1.0, 1.0]], dtype=D) / 6, rtol=1e-12, atol=1e-14)
    # a looser cap 1.5 lets row 2's sequence weight e^0.6 = 1.82 reach 1.5
    _, grad, _ = ours("topr", b, is_cap=1.5)
    torch.testing.assert_close(grad[2], torch.tensor([1.5, 1.5], dtype=D) / 6, rtol=1e-12, atol=1e-14)


def test_topr_token_level_equals_trinity_rft():
    b = random_batch(21, scale=0.5)
    assert_same(ours("topr", b, level="token")[:2], peer(topr_trinity, b))
    # zero advantages: Trinity truncates them (A <= 0), rlclip weighs them 1; both contribute nothing
    zero = fresh(b, advantages=torch.where(b.advantages.abs() < 0.5, 0.0, b.advantages))
    assert (zero.advantages == 0).any()
    assert_same(ours("topr", zero, level="token")[:2], peer(topr_trinity, zero))


def test_topr_reductions():
    b = random_batch(22, scale=0.5)
    # on-policy (rho = 1): every weight is 1, plain REINFORCE (gpg), at both levels
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("topr", on)[:2], ours("gpg", on)[:2])
    assert_same(ours("topr", on, level="token")[:2], ours("gpg", on)[:2])
    # only positive advantages: SFT-weighted REINFORCE whatever the ratio (gpg)
    pos = fresh(b, advantages=b.advantages.abs())
    assert_same(ours("topr", pos)[:2], ours("gpg", pos)[:2])
    # only negative advantages: reinforce_is with the weight truncated at 1 (its sequence / token truncation)
    neg = fresh(b, advantages=-b.advantages.abs())
    assert_same(ours("topr", neg)[:2], ours("reinforce_is", neg, is_cap=1.0)[:2])
    assert_same(ours("topr", neg, level="token")[:2],
                ours("reinforce_is", neg, is_mode="token_truncate", is_cap=1.0)[:2])
    # off-policy with both signs it is neither: the negative tokens' weights differ from 1
    assert not torch.allclose(ours("topr", b)[1], ours("gpg", b)[1])


def test_topr_defaults_and_bad_settings():
    obj = build_objective("topr")
    assert (obj.level, obj.is_cap, obj.agg, obj.kl_coef) == ("sequence", 1.0, "token_mean", 0.0)
    for bad in ({"level": "seq"}, {"is_cap": 0.0}, {"is_cap": -1.0}):
        with pytest.raises(ConfigError, match="topr"):
            build_objective("topr", **bad)


def test_gsm8k_recipe():
    from conftest import ROOT
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / "recipes/gsm8k/grpo_topr.yaml")
    assert config.objective["name"] == "topr" and config.data.name == "gsm8k"
    assert build_objective_from_config(config).name == "topr"


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_trains_through_the_trainer(tmp_path, level):
    """Two mini-batches, mu = 2: from step 2 on the policy has moved, so negative examples' weights fall below 1."""
    from conftest import tiny_config
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "objective.name=topr", f"objective.level={level}", "max_steps=3",
                      "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8")
    history = Trainer(cfg, reward_funcs=[coin]).train()
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    weights = [h["objective/is_weight_mean"] for h in history]
    assert weights[0] == 1.0 and min(weights) < 1.0
