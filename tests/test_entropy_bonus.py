"""The entropy bonus and adaptive entropy control (rlclip/entropy_bonus.py) outside TRL's oracle
(tests/test_objectives_extra.py compares both with TRL 1.16's _compute_loss)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from rlclip.config import EntropyConfig, load_config
from rlclip.entropy_bonus import EntropyBonus
from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.base import Reducer
from rlclip.utils import rows_of

D = torch.float64


def batch_with_entropy(seed: int = 0, b: int = 6, t: int = 5) -> tuple[PolicyBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(b, t, generator=g, dtype=D) - 0.1
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(D)
    entropy = torch.rand(b, t, generator=g, dtype=D) * 3
    batch = PolicyBatch(logprobs=logprobs, old_logprobs=logprobs.clone(),
                        advantages=torch.randn(b, 1, generator=g, dtype=D).expand(b, t), mask=mask,
                        entropy=entropy, truncated=lengths == t)
    return batch, entropy


def test_disabled_by_default_and_adaptive_stays_on_at_zero():
    assert not EntropyBonus(EntropyConfig()).enabled
    assert EntropyBonus(EntropyConfig(coef=-0.1)).enabled  # a negative coefficient is an entropy penalty
    bonus = EntropyBonus(EntropyConfig(coef=0.0, adaptive=True, target=1.0))
    assert bonus.enabled and bonus.applied_coef() == 0.0  # no measurement yet


def test_controller_bounds_gate_nonfinite_and_state_round_trip():
    bonus = EntropyBonus(EntropyConfig(coef=0.05, adaptive=True, coef_min=0.01, coef_max=0.06, coef_delta=0.03,
                                       target=1.0))
    metrics = bonus.end_step(0.5)  # below target: up, capped at coef_max
    assert metrics == {"entropy/mean": 0.5, "entropy/coef_applied": 0.0, "entropy/coef": 0.06}
    assert bonus.applied_coef() == 0.06
    bonus.end_step(2.0)  # above: down by delta to 0.03, and the next step applies nothing
    assert bonus.coef == pytest.approx(0.03) and bonus.applied_coef() == 0.0
    bonus.end_step(3.0)  # floor at coef_min
    assert bonus.coef == pytest.approx(0.01)
    bonus.end_step(float("nan"))  # a skipped, non-finite step leaves the controller alone
    assert bonus.coef == pytest.approx(0.01) and bonus.last_entropy == 3.0
    restored = EntropyBonus(EntropyConfig(coef=0.05, adaptive=True))
    restored.load_state_dict(json.loads(json.dumps(bonus.state_dict())))
    assert (restored.coef, restored.last_entropy) == (bonus.coef, bonus.last_entropy)
    fresh = EntropyBonus(EntropyConfig(coef=0.05, adaptive=True))
    fresh.load_state_dict(json.loads(json.dumps(fresh.state_dict())))  # inf survives JSON
    assert fresh.last_entropy == math.inf


def test_static_coefficient_ignores_the_target():
    bonus = EntropyBonus(EntropyConfig(coef=0.2, target=0.0))
    bonus.end_step(5.0)
    assert bonus.coef == 0.2 and bonus.applied_coef() == 0.2


@pytest.mark.parametrize("settings", [{}, {"mask_truncated": True}, {"entropy_top_quantile": 0.4}])
def test_bonus_over_micro_batches_equals_the_whole_step(settings):
    """Micro-batches with the step's statistics and token count give the whole batch's term and gradient."""
    batch, entropy = batch_with_entropy(3)
    objective = build_objective("ratio_clip", **settings)
    stats = objective.step_statistics(batch, Reducer()) if objective.step_needs else None
    count_mask = objective.count_mask(batch.mask, batch.truncated)
    batch.num_tokens = count_mask.sum()

    def term(rows, bonus):
        leaf = entropy.detach().clone().requires_grad_()
        total = 0.0
        for idx in rows:
            part = PolicyBatch(**{**batch.__dict__, "logprobs": batch.logprobs[idx], "old_logprobs":
                                  batch.old_logprobs[idx], "advantages": batch.advantages[idx],
                                  "mask": batch.mask[idx], "entropy": entropy[idx], "truncated": batch.truncated[idx],
                                  "step_stats": rows_of(stats, idx, 6) if stats else None})
            total = total + bonus.loss(leaf[idx], *objective.bonus_mask(part))
        total.backward()
        return total.detach(), leaf.grad, float(bonus.local_sum())

    whole = term([torch.arange(6)], EntropyBonus(EntropyConfig(coef=0.5)))
    split = term([torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5])],
                 EntropyBonus(EntropyConfig(coef=0.5)))
    for a, b in zip(whole, split):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))
    # by hand: H = mean entropy over the selected tokens, the term is -0.5 H
    mask, count = objective.bonus_mask(PolicyBatch(**{**batch.__dict__, "step_stats": stats}))
    hand = float((entropy * mask).sum() / mask.sum())
    assert float(count) == float(mask.sum())
    assert whole[2] == pytest.approx(hand) and float(whole[0]) == pytest.approx(-0.5 * hand)
    if settings:
        assert mask.sum() < (batch.mask > 0).sum()  # the setting did take tokens out


@pytest.mark.parametrize("override,message", [
    ("entropy.coef_min=0.5", "coef_min"),
    ("entropy.coef_delta=0", "entropy.coef_delta"),
    ("entropy.target=-1", "entropy.target"),
])
def test_bad_adaptive_settings_are_config_errors(root, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(root / "recipes/smoke/tiny.yaml", ["entropy.adaptive=true", "entropy.coef_max=0.1", override])


def test_adaptive_control_trains_logs_and_resumes_its_coefficient(tmp_path):
    from rlclip.trainer import Trainer

    # target 100 nats: the entropy is always below it, so c grows by delta every step and is applied
    settings = ["entropy.adaptive=true", "entropy.coef=0.01", "entropy.coef_delta=0.02", "entropy.target=100",
                "save_steps=2"]
    history = Trainer(tiny_config(tmp_path, "max_steps=2", *settings)).train()
    assert [h["entropy/coef_applied"] for h in history] == [0.0, pytest.approx(0.03)]
    assert history[-1]["entropy/coef"] == pytest.approx(0.05)
    assert all(0 < h["entropy/mean"] < 100 for h in history)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["entropy_bonus"]["coef"] == pytest.approx(0.05)
    resumed = Trainer(tiny_config(tmp_path, "max_steps=3", "resume_from_checkpoint=latest", *settings)).train()
    assert resumed[0]["step"] == 3 and resumed[0]["entropy/coef_applied"] == pytest.approx(0.05)
