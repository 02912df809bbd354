"""DCPO (arXiv 2509.02333): per-token clip bounds from the old probability.

Reference, read at this commit (line numbers cited per function and test): github.com/lime-RL/DCPO
01787b0f61580961162faeb492defeb39f1eba53, verl/trainer/ppo/core_algos.py: ``get_clip_low_high`` (lines 978-991)
and ``compute_policy_loss_dcpo`` with ``clip_type="dynamic"`` (lines 995-1093); the defaults are the authors'
recipe/dcpo/run_dcpo.sh (lines 79-84) and recipe/dcpo/run_base.sh (line 86). ``bounds_ref`` and ``dcpo_ref``
transcribe them (torch only, float64, token-mean on one process) and are the oracles of the comparisons; the
hand-value tests spell the numbers out.
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
    ours,
    peer,
    prob_batch,
    random_batch,
    token_mean,
)

from conftest import ROOT
from rlclip.errors import ConfigError
from rlclip.objectives import build_objective
from rlclip.objectives.dcpo import dynamic_bounds


def bounds_ref(ref_logprob, low_clip=0.1, high_clip=0.2, clip_ratio_c=float("inf")):
    """DCPO core_algos.py get_clip_low_high, lines 979-991 (``ref_logprob`` is the old log-prob, line 1049)."""
    ref_prob = torch.exp(ref_logprob)
    low_c_ref = torch.where(ref_prob != 0, 4 * low_clip / (ref_prob), 0)
    low_c_ref = 1 - low_c_ref
    low_c_ref = low_c_ref * (low_c_ref >= 0)
    high_c_ref = torch.where(ref_prob != 0, 1 + 4 * high_clip / ref_prob, float("inf"))
    low = (1 + torch.sqrt(low_c_ref)) / 2
    high = (1 + torch.sqrt(high_c_ref)) / 2
    clip_ratio_c = max(clip_ratio_c, 10)
    return low, torch.clamp(high, 0, clip_ratio_c)


def dcpo_ref(log_prob, old_log_prob, advantages, response_mask, low=0.2, high=0.28, c=10.0):
    """DCPO core_algos.py compute_policy_loss_dcpo, clip_type "dynamic": lines 1034-1049 and 1074-1086."""
    ratio = torch.exp(log_prob - old_log_prob)  # 1034-1037 (no clamp: line 1036 is commented out)
    pg_losses1 = -advantages * ratio  # 1039
    cliprange_low, cliprange_high = bounds_ref(old_log_prob, low, high, c)  # 1049
    pg_losses2 = -advantages * torch.clamp(ratio, cliprange_low, cliprange_high)  # 1074
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)  # 1075
    pg_losses3 = -advantages * c  # 1078
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)  # 1082
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)  # 1085
    return token_mean(pg_losses, response_mask)  # 1086


def test_bound_formula_hand_values():
    # q = 1:    low = (1 + sqrt(1 - 0.8)) / 2,  high = (1 + sqrt(1 + 1.12)) / 2       (eps 0.2, 0.28)
    # q = 0.9:  1 - 0.8 / 0.9 = 1/9 -> low = (1 + 1/3) / 2 = 2/3
    # q = 0.5:  1 - 1.6 < 0 -> low = 0.5;  1 + 1.12 / 0.5 = 3.24 -> high = (1 + 1.8) / 2 = 1.4
    # q = 1e-3: high = (1 + sqrt(1121)) / 2 = 17.2 -> capped at max(c, 10)
    # q = 0 (exp underflows): [1, cap], as the reference's torch.where branches
    old = torch.tensor([0.0, math.log(0.9), math.log(0.5), math.log(1e-3), -800.0], dtype=D)
    low, high = dynamic_bounds(old, 0.2, 0.28, 10.0)
    torch.testing.assert_close(low, torch.tensor([(1 + math.sqrt(0.2)) / 2, 2 / 3, 0.5, 0.5, 1.0], dtype=D))
    torch.testing.assert_close(high, torch.tensor([(1 + math.sqrt(2.12)) / 2, (1 + math.sqrt(1 + 1.12 / 0.9)) / 2,
                                                   1.4, 10.0, 10.0], dtype=D))
    ref_low, ref_high = bounds_ref(old, 0.2, 0.28, 10.0)
    torch.testing.assert_close((low, high), (ref_low, ref_high), rtol=0, atol=0)
    # the cap is max(dual_clip, 10): 10 for c = 3, 15 for c = 15, no cap at 17.2 for c = 20
    assert build_objective("dcpo", dual_clip=3.0).bounds(prob_batch([[1e-3]], [[1e-3]], [[1.0]]))[1].item() == 10.0
    assert build_objective("dcpo", dual_clip=15.0).bounds(prob_batch([[1e-3]], [[1e-3]], [[1.0]]))[1].item() == 15.0
    assert build_objective("dcpo", dual_clip=20.0).bounds(prob_batch([[1e-3]], [[1e-3]], [[1.0]]))[1].item() == \
        pytest.approx((1 + math.sqrt(1121)) / 2)


def test_dcpo_hand_values():
    # old probabilities q = [0.9, 0.5, 0.5, 1e-3, 1e-3], rho = [0.7, 1.3, 1.5, 8, 12], A = [-1, 1, 1, 1, -2],
    # defaults eps_low 0.2, eps_high 0.28, dual clip 10; token mean over 5 tokens:
    # t0: low bound 2/3 < 0.7: inside, loss 0.7, grad 0.7          (PPO's fixed 0.8 would clip it: grad 0)
    # t1: high bound 1.4 > 1.3: inside, loss -1.3, grad -1.3        (PPO's 1.28 would clip it)
    # t2: 1.5 > 1.4: clipped high, loss -1.4, grad 0
    # t3: rare token, bound 10 > 8: inside, loss -8, grad -8
    # t4: A < 0, rho 12 > c: dual clip, loss -c A = 20, grad 0
    q = [0.9, 0.5, 0.5, 1e-3, 1e-3]
    rho = [0.7, 1.3, 1.5, 8.0, 12.0]
    b = prob_batch([[qi * r for qi, r in zip(q, rho)]], [q], [[-1.0, 1.0, 1.0, 1.0, -2.0]])
    loss, grad, m = ours("dcpo", b)
    assert loss.item() == pytest.approx((0.7 - 1.3 - 1.4 - 8.0 + 20.0) / 5, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[0.7, -1.3, 0.0, -8.0, 0.0]], dtype=D) / 5)
    assert (m["clip_frac_low"].item(), m["clip_frac_high"].item(), m["clip_frac_dual"].item()) == \
        pytest.approx((0.0, 0.2, 0.2))
    assert m["bound_low_mean"].item() == pytest.approx((2 / 3 + 4 * 0.5) / 5)
    assert m["bound_high_mean"].item() == pytest.approx(((1 + math.sqrt(1 + 1.12 / 0.9)) / 2 + 2.8 + 20) / 5)
    assert_same((loss, grad), peer(dcpo_ref, b))
    # ratio_clip with PPO's fixed range and the same dual clip
    _, grad, _ = ours("ratio_clip", b, eps_low=0.2, eps_high=0.28, dual_clip=10.0)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]], dtype=D) / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", [{}, {"eps_low": 0.05, "eps_high": 0.1, "dual_clip": 3.0},
                                      {"eps_low": 0.3, "eps_high": 0.5, "dual_clip": 20.0}])
def test_equals_dcpo_reference(seed, settings):
    b = random_batch(seed, b=8, t=9, scale=1.5)
    loss, grad, m = ours("dcpo", b, **settings)
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] + m["clip_frac_dual"] > 0
    ref = dict(low=settings.get("eps_low", 0.2), high=settings.get("eps_high", 0.28), c=settings.get("dual_clip", 10.0))
    assert_same((loss, grad), peer(dcpo_ref, b, **ref))


@pytest.mark.parametrize("q", [0.6, 0.3, 0.1])
def test_constant_old_probability_is_ratio_clip(q):
    """With one old probability q for every token the bounds are constants: ratio_clip with
    eps_low = 1 - low(q), eps_high = high(q) - 1 and the same dual clip."""
    g = torch.Generator().manual_seed(11)
    old = torch.full((6, 7), math.log(q), dtype=D)
    b = fresh(random_batch(3, scale=0.5), old_logprobs=old)
    b = fresh(b, logprobs=(old + 1.2 * torch.randn(6, 7, generator=g, dtype=D)).clamp(max=-1e-3))
    low, high = dynamic_bounds(old[0, 0], 0.2, 0.28, 10.0)
    dcpo = ours("dcpo", b, dual_clip=3.0)
    assert dcpo[2]["clip_frac_high"] > 0 and dcpo[2]["clip_frac_low"] + dcpo[2]["clip_frac_dual"] > 0
    assert_same(dcpo[:2], ours("ratio_clip", b, eps_low=1 - low.item(), eps_high=high.item() - 1, dual_clip=3.0)[:2])


def test_on_policy_is_the_policy_gradient():
    b = random_batch(6, scale=0.6)
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("dcpo", on)[:2], ours("ratio_clip", on)[:2])


def test_defaults_and_bad_settings():
    obj = build_objective("dcpo")
    assert (obj.eps_low, obj.eps_high, obj.dual_clip, obj.agg) == (0.2, 0.28, 10.0, "token_mean")
    no_dual = build_objective("dcpo", dual_clip=None)
    assert no_dual.bounds(prob_batch([[1e-4]], [[1e-4]], [[1.0]]))[1].item() == 10.0
    for bad in ({"eps_low": -0.1}, {"eps_high": -1.0}, {"dual_clip": 1.0}):
        with pytest.raises(ConfigError, match="dcpo|dual_clip") as err:
            build_objective("dcpo", **bad)
        assert "\n" not in str(err.value)


def test_gsm8k_recipe():
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / "recipes/gsm8k/grpo_dcpo.yaml")
    obj = build_objective_from_config(config)
    assert obj.name == "dcpo" and config.data.name == "gsm8k"
    assert (obj.eps_low, obj.eps_high, obj.dual_clip, obj.kl_coef) == (0.2, 0.28, 10.0, 0.0)


def test_trains_through_the_trainer(tmp_path):
    """Two mini-batches, mu = 2, tiny ranges: from step 2 on the dynamic clips act."""
    from conftest import tiny_config
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "objective.name=dcpo", "objective.eps_low=1e-4", "objective.eps_high=1e-4",
                      "max_steps=3", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8")
    history = Trainer(cfg, reward_funcs=[coin]).train()
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0]["objective/clip_frac_high"] == 0.0
    assert max(h["objective/clip_frac_high"] + h["objective/clip_frac_low"] for h in history) > 0
    assert all(h["objective/bound_high_mean"] > 1 for h in history)
