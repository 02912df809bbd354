"""BAPO (arXiv 2510.18927): clip bounds searched per optimizer step to balance positive and negative contributions.

Reference: github.com/WooooDyy/BAPO at 7287044444d5d578529ea464b45f090a36e8da3a,
recipe/bapo/policy_loss.py (``_compute_effective_advantage`` lines 21-62, the search lines 100-152,
the loss lines 163-185), defaults recipe/bapo/config/bapo_trainer.yaml lines 15-22, and the dual-clip
constant verl's ``clip_ratio_c: 3.0`` (the same repository's verl/trainer/config/actor/actor.yaml line 69),
which that loss reads. ``bapo_reference`` below transcribes the loss (torch only, float64, one process)
and is the oracle of the comparison tests; the hand-value tests spell the numbers out.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, tiny_config
from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.base import Reducer

D = torch.float64
AUTHORS = dict(adv_ratio_target=1.0, ratio_lower_start=0.6, ratio_lower_max=0.8, ratio_lower_step=0.05,
               ratio_upper_start=1.2, ratio_upper_max=2.0, ratio_upper_step=0.05, eps=1e-8)


def bapo_reference(log_prob, old_log_prob, advantages, response_mask, adv_ratio_target=1.0, ratio_lower_start=0.6,
                   ratio_lower_max=0.8, ratio_lower_step=0.05, ratio_upper_start=1.2, ratio_upper_max=2.0,
                   ratio_upper_step=0.05, eps=1e-8, clip_ratio_c=3.0):
    """The authors' compute_policy_loss_bapo with token-mean aggregation: (loss, low, high, pos/neg ratio)."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))

    def pos_neg(low, high):  # policy_loss.py lines 34-60 (one process: no all-reduce)
        eff = torch.where(advantages >= 0, torch.minimum(ratio, ratio.new_tensor(high)),
                          torch.maximum(ratio, ratio.new_tensor(low))) * advantages * response_mask
        pos, neg = eff.clamp(min=0).sum(), (-eff.clamp(max=0)).sum()
        return float("inf") if neg <= 0 else (pos / (neg + eps)).item()

    low, high = ratio_lower_start, ratio_upper_start
    r = pos_neg(low, high)
    while r < adv_ratio_target and low < ratio_lower_max and ratio_lower_step > 0:  # lines 127-138
        low = min(low + ratio_lower_step, ratio_lower_max)
        r = pos_neg(low, high)
        if r >= adv_ratio_target:
            break
    while r < adv_ratio_target and high < ratio_upper_max and ratio_upper_step > 0:  # lines 141-152
        high = min(high + ratio_upper_step, ratio_upper_max)
        r = pos_neg(low, high)
        if r >= adv_ratio_target:
            break
    loss1 = -advantages * ratio  # lines 165-176
    loss2 = -advantages * torch.clamp(ratio, low, high)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.min(-advantages * clip_ratio_c, clipped)
    per_token = torch.where(advantages < 0, dual, clipped)
    return (per_token * response_mask).sum() / response_mask.sum(), low, high, r


def batch_from_ratios(ratios, adv, mask=None) -> PolicyBatch:
    """One row per list; logprobs = log(ratio) - 1 (a grad leaf), old_logprobs = -1."""
    lr = torch.tensor(ratios, dtype=D).log()
    mask = torch.ones_like(lr) if mask is None else torch.tensor(mask, dtype=D)
    return PolicyBatch(logprobs=(lr - 1.0).requires_grad_(), old_logprobs=torch.full_like(lr, -1.0),
                       advantages=torch.tensor(adv, dtype=D), mask=mask)


def random_batch(seed: int, b: int = 6, t: int = 7, scale: float = 0.5, pos_bias: float = 0.0) -> PolicyBatch:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=D) * 3 - 0.02
    old = logp + scale * torch.randn(b, t, generator=g, dtype=D)
    adv = (torch.randn(b, 1, generator=g, dtype=D) + pos_bias).expand(b, t).contiguous()
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(D)
    return PolicyBatch(logprobs=logp.requires_grad_(), old_logprobs=old, advantages=adv, mask=mask)


def fresh(batch: PolicyBatch, **changes) -> PolicyBatch:
    from dataclasses import replace

    return replace(batch, logprobs=batch.logprobs.detach().clone().requires_grad_(), **changes)


def loss_and_grad(objective, batch: PolicyBatch):
    batch = fresh(batch)
    out = objective(batch)
    (grad,) = torch.autograd.grad(out.loss, batch.logprobs)
    return out.loss.detach(), grad, out.metrics


# ------------------------------------------------------------------------------------------------ hand values

def test_hand_values_from_the_authors_search():
    """Ratios 3.0, 0.97 (A = +1) and 0.9 (A = -1), 0.7 (A = -2), the authors' defaults.

    Start (0.6, 1.2): P = 1.2 + 0.97 = 2.17, N = 0.9 + 2 * 0.7 = 2.3, P / N < 1. The lower bound only adds
    to N (max(rho, c_low)), so it runs to 0.8: N = 0.9 + 2 * 0.8 = 2.5. Then the upper bound rises until
    c_high + 0.97 >= 2.5: c_high = 1.55 (1.5 + 0.97 = 2.47 is short), P = 2.52, pos_share = 2.52 / 5.02.
    Loss per token at (0.8, 1.55): -1.55 (clipped high), -0.97, +0.9, max(1.4, 1.6) = 1.6 (clipped low);
    token mean -0.02 / 4 = -0.005. Gradient -A * rho where unclipped: (0, -0.97, 0.9, 0) / 4.
    """
    batch = batch_from_ratios([[3.0, 0.97, 0.9, 0.7]], [[1.0, 1.0, -1.0, -2.0]])
    loss, grad, metrics = loss_and_grad(build_objective("bapo"), batch)
    assert metrics["clip_low"] == 0.8
    assert metrics["clip_high"] == pytest.approx(1.55, abs=1e-12)
    assert metrics["pos_share"] == pytest.approx(2.52 / 5.02, abs=1e-12)
    assert loss.item() == pytest.approx(-0.005, abs=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.97, 0.9, 0.0]], dtype=D) / 4, rtol=0, atol=1e-12)
    ref_loss, low, high, r = bapo_reference(batch.logprobs.detach(), batch.old_logprobs, batch.advantages,
                                            batch.mask)
    assert (low, high) == (metrics["clip_low"], metrics["clip_high"])  # the same float additions, bit for bit
    assert ref_loss.item() == pytest.approx(loss.item(), abs=1e-15) and r == pytest.approx(2.52 / 2.5)


def test_hand_values_when_the_start_already_balances_and_the_dual_clip_binds():
    """Ratios 1.5 (A = +2) and 5.0 (A = -1): P = 2 * 1.2 = 2.4 >= N = 5.0 * 1 at target 0.4, so the bounds stay
    at the start. Loss: -2 * 1.2 = -2.4 (clipped high), and for A < 0, min(max(5, 0.6), 3) = 3 (dual clip):
    mean 0.3, no gradient at all."""
    batch = batch_from_ratios([[1.5, 5.0]], [[2.0, -1.0]])
    loss, grad, metrics = loss_and_grad(build_objective("bapo", adv_ratio_target=0.4), batch)
    assert (metrics["clip_low"], metrics["clip_high"]) == (0.6, 1.2)
    assert metrics["pos_share"] == pytest.approx(2.4 / 7.4, abs=1e-12)
    assert metrics["clip_frac_dual"].item() == 0.5
    assert loss.item() == pytest.approx(0.3, abs=1e-12) and grad.abs().max().item() == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("settings", [
    {},
    {"adv_ratio_target": 0.5, "ratio_lower_start": 0.8, "ratio_lower_max": 0.95, "ratio_upper_step": 0.1},
    {"adv_ratio_target": 2.0, "ratio_upper_max": 3.0},
])
def test_equals_the_authors_loss_on_random_batches(seed, settings):
    batch = random_batch(seed, pos_bias=-0.3 + 0.2 * (seed % 3))
    loss, grad, metrics = loss_and_grad(build_objective("bapo", **settings), batch)
    logp = batch.logprobs.detach().clone().requires_grad_()
    ref_loss, low, high, _ = bapo_reference(logp, batch.old_logprobs, batch.advantages, batch.mask, **settings)
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    assert (metrics["clip_low"], metrics["clip_high"]) == (low, high)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_the_search_moves_on_some_random_batches():
    """The comparison above is not vacuous: on those batches both bounds leave their start values."""
    chosen = set()
    for seed in range(6):
        m = build_objective("bapo")(fresh(random_batch(seed, pos_bias=-0.3 + 0.2 * (seed % 3)))).metrics
        chosen.add((m["clip_low"] > 0.6, m["clip_high"] > 1.2))
    assert (True, True) in chosen and (False, False) in chosen


# ------------------------------------------------------------------------------------------------ reductions

def test_frozen_bounds_are_ratio_clip():
    """Step sizes 0 keep (c_low, c_high) = (0.75, 1.25): exactly ratio_clip with eps 0.25 and the same dual clip."""
    frozen = build_objective("bapo", ratio_lower_start=0.75, ratio_lower_max=0.9, ratio_lower_step=0.0,
                             ratio_upper_start=1.25, ratio_upper_max=3.0, ratio_upper_step=0.0, adv_ratio_target=50.0)
    clip = build_objective("ratio_clip", eps_low=0.25, eps_high=0.25, dual_clip=3.0)
    for seed in range(4):
        batch = random_batch(seed, scale=0.8)
        loss, grad, metrics = loss_and_grad(frozen, batch)
        ref_loss, ref_grad, ref_metrics = loss_and_grad(clip, batch)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
        assert metrics["clip_frac_low"] == ref_metrics["clip_frac_low"]
        assert (metrics["clip_low"], metrics["clip_high"]) == (0.75, 1.25)


def test_target_zero_never_widens():
    """P / N >= 0 always, so target 0 keeps the start bounds: ratio_clip with eps 0.4 / 0.2 and dual clip 3."""
    batch = random_batch(3, scale=0.8)
    loss, grad, metrics = loss_and_grad(build_objective("bapo", adv_ratio_target=0.0), batch)
    ref_loss, ref_grad, _ = loss_and_grad(build_objective("ratio_clip", eps_low=0.4, eps_high=0.2, dual_clip=3.0),
                                          batch)
    assert (metrics["clip_low"], metrics["clip_high"]) == (0.6, 1.2)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-14)


class HalfReducer(Reducer):
    """One of two processes: adds the other half's contribution to every sum."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.other


def test_bounds_come_from_the_whole_step():
    """Two micro-batches (or processes) with the step's statistics give the whole batch's loss and gradient,
    although each half alone would choose other bounds (the authors search per micro-batch)."""
    obj = build_objective("bapo")
    batch = random_batch(11, b=8, scale=0.6)
    whole_loss, whole_grad, whole_metrics = loss_and_grad(obj, batch)
    halves = [slice(0, 4), slice(4, 8)]
    parts = [PolicyBatch(logprobs=batch.logprobs.detach()[h], old_logprobs=batch.old_logprobs[h],
                         advantages=batch.advantages[h], mask=batch.mask[h], num_tokens=batch.mask.sum())
             for h in halves]
    alone = [obj(fresh(p, num_tokens=None)).metrics for p in parts]
    assert any((m["clip_low"], m["clip_high"]) != (whole_metrics["clip_low"], whole_metrics["clip_high"])
               for m in alone)

    def sums(p):  # the per-candidate sums a process contributes, captured through a recording reducer
        seen = []

        class Record(Reducer):
            def sum(self, tensor):
                seen.append(tensor)
                return tensor

        obj.step_statistics(p, Record())
        return seen[0]

    own = [sums(p) for p in parts]
    loss, grads = 0.0, []
    for k, p in enumerate(parts):
        p = fresh(p)
        p.step_stats = obj.step_statistics(p, HalfReducer(own[1 - k]))
        out = obj(p)
        loss += out.loss.item()
        grads.append(torch.autograd.grad(out.loss, p.logprobs)[0])
    assert loss == pytest.approx(whole_loss.item(), abs=1e-13)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------ settings, state

def test_defaults_are_the_authors():
    obj = build_objective("bapo")
    assert obj.adv_ratio_target == 1.0 and obj.eps == 1e-8 and obj.dual_clip == 3.0 and obj.agg == "token_mean"
    assert obj.lows[0] == 0.6 and obj.lows[-1] == 0.8 and len(obj.lows) == 5
    assert obj.highs[0] == 1.2 and obj.highs[-1] == 2.0 and len(obj.highs) == 17
    assert obj.state_dict() == {"ratio_low": 0.6, "ratio_high": 1.2}


@pytest.mark.parametrize("settings, message", [
    ({"ratio_lower_start": 0.9, "ratio_lower_max": 0.8}, "ratio_lower_start <= ratio_lower_max"),
    ({"ratio_lower_max": 1.1}, "ratio_lower_max <= 1"),
    ({"ratio_upper_start": 0.9}, "1 <= ratio_upper_start"),
    ({"ratio_upper_max": 1.1}, "ratio_upper_start <= ratio_upper_max"),
    ({"ratio_lower_step": -0.05}, "ratio_lower_step"),
    ({"adv_ratio_target": -1.0}, "adv_ratio_target"),
    ({"dual_clip": 0.5}, "dual_clip"),
    ({"ratio_step": 0.1}, "no setting ratio_step"),
])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_objective("bapo", **settings)


def test_state_is_the_last_steps_bounds_and_round_trips():
    obj = build_objective("bapo")
    metrics = {k: float(v) for k, v in obj(fresh(random_batch(0, pos_bias=-0.5))).metrics.items()}
    assert metrics["clip_low"] > 0.6  # the search moved, so the state below is not the start value
    obj.end_step({**metrics, "clip_low": metrics["clip_low"] + 1e-16}, 6.0)  # a token-weighted mean's ulp
    assert obj.ratio_low == metrics["clip_low"] and obj.ratio_high == metrics["clip_high"]
    other = build_objective("bapo")
    other.load_state_dict(obj.state_dict())
    assert other.state_dict() == obj.state_dict()
    other.load_state_dict({})  # a checkpoint written before objectives had state
    assert other.state_dict() == obj.state_dict()


# ------------------------------------------------------------------------------------------------ recipe, trainer

def test_gsm8k_recipe():
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / "recipes/gsm8k/grpo_bapo.yaml")
    assert config.objective["name"] == "bapo" and config.data.name == "gsm8k"
    obj = build_objective_from_config(config)
    assert obj.name == "bapo" and obj.adv_ratio_target == 0.5 and (obj.lows[0], obj.lows[-1]) == (0.8, 0.95)


def test_trains_through_the_trainer_and_logs_its_bounds(tmp_path):
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "objective.name=bapo", "max_steps=2", "rollout.prompts_per_step=2",
                      "rollout.max_new_tokens=8", "save_steps=2")
    trainer = Trainer(cfg)
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2] and all(math.isfinite(h["loss"]) for h in history)
    for h in history:
        assert 0.6 <= h["objective/clip_low"] <= 0.8 and 1.2 <= h["objective/clip_high"] <= 2.0
        assert 0.0 <= h["objective/pos_share"] <= 1.0
    assert trainer.objective.ratio_low == pytest.approx(history[-1]["objective/clip_low"], abs=1e-12)
    import json

    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["objective"] == trainer.objective.state_dict()
