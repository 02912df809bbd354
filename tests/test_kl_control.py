"""The adaptive KL controller (``objective.kl_target``) and the objective state it shares with BAPO.

Reference: verl's AdaptiveKLController (github.com/volcengine/verl at b178a3cd56f58b2d502255daba591e92833930a7,
verl/trainer/ppo/core_algos.py lines 152-173: e = clip(current_kl / target - 1, -0.2, 0.2),
value *= 1 + e * n_steps / horizon; ``n_steps`` is the batch's sequence count, verl/trainer/ppo/ray_trainer.py
line 104; defaults kl_coef 0.001, horizon 10000, target_kl 0.1 in verl/trainer/config/ppo_trainer.yaml lines
99-108). ``verl_update`` transcribes it (numpy, float64) as the oracle; the hand values spell the numbers out.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from rlclip.errors import ConfigError
from rlclip.kl_control import AdaptiveKLController, end_objective_step
from rlclip.objectives import PolicyBatch, build_objective

D = torch.float64


def verl_update(value: float, target: float, horizon: float, current_kl: float, n_steps: float) -> float:
    """core_algos.py lines 170-173."""
    proportional_error = np.clip(current_kl / target - 1, -0.2, 0.2)
    mult = 1 + proportional_error * n_steps / horizon
    return float(value * mult)


def test_hand_computed_coefficients():
    """target 0.1, horizon 100, 10 sequences a step, from 0.2:
    KL 0.3 -> error clipped to +0.2, x 1.02 -> 0.204; KL 0.05 -> error -0.5 clipped to -0.2, x 0.98 -> 0.19992;
    KL 0.1 -> error 0, unchanged; KL 0.105 -> error 0.05, x 1.005 -> 0.2009196."""
    control = AdaptiveKLController(0.1, 100)
    coef, seen = 0.2, []
    for kl in (0.3, 0.05, 0.1, 0.105):
        coef = control.update(coef, kl, 10)
        seen.append(coef)
    assert seen == pytest.approx([0.204, 0.19992, 0.19992, 0.2009196], abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_equals_verl_on_a_random_sequence(seed):
    rng = np.random.default_rng(seed)
    target, horizon = float(rng.uniform(0.01, 0.2)), float(rng.uniform(50, 5000))
    control = AdaptiveKLController(target, horizon)
    ours = theirs = float(rng.uniform(1e-3, 0.5))
    for _ in range(50):
        kl, n = float(rng.uniform(0, 3 * target)), float(rng.integers(1, 256))
        ours, theirs = control.update(ours, kl, n), verl_update(theirs, target, horizon, kl, n)
        assert ours == theirs  # the same float operations in the same order


def test_objective_applies_logs_and_then_moves_its_coefficient():
    """kl_coef is applied (and logged) as it stands; end_step moves it with the step's reduced kl_ref."""
    obj = build_objective("ratio_clip", kl_coef=0.5, kl_target=0.01, kl_horizon=20.0)
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 4, generator=g, dtype=D)
    batch = PolicyBatch(logprobs=logp.requires_grad_(), old_logprobs=logp.detach(),
                        advantages=torch.zeros(3, 4, dtype=D), mask=torch.ones(3, 4, dtype=D),
                        ref_logprobs=logp.detach() - 0.3)
    out = obj(batch)
    kl = out.metrics["kl_ref"].item()  # k3 of a constant log-ratio 0.3: exp(-0.3) + 0.3 - 1
    assert kl == pytest.approx(math.exp(-0.3) + 0.3 - 1, abs=1e-15) and out.metrics["kl_coef"] == 0.5
    assert out.loss.item() == pytest.approx(0.5 * kl, abs=1e-15)  # advantages 0: the loss is the KL term alone
    end_objective_step(obj, {"objective/kl_ref": kl, "objective/kl_coef": 0.5, "loss": 1.0}, 3)
    assert obj.kl_coef == 0.5 * (1 + 0.2 * 3 / 20)  # KL 0.037 >> 0.01: the error is clipped to +0.2
    assert obj(batch).metrics["kl_coef"] == obj.kl_coef
    assert obj.state_dict() == {"kl_coef": obj.kl_coef}


def test_a_non_finite_step_leaves_the_coefficient_and_off_is_stateless():
    obj = build_objective("ratio_clip", kl_coef=0.5, kl_target=0.01)
    obj.end_step({"kl_ref": math.nan}, 8)
    obj.end_step({}, 8)
    assert obj.kl_coef == 0.5
    fixed = build_objective("ratio_clip", kl_coef=0.5)
    fixed.end_step({"kl_ref": 1.0}, 8)
    assert fixed.kl_coef == 0.5 and fixed.state_dict() == {} and fixed.kl_control is None


@pytest.mark.parametrize("settings, message", [
    ({"kl_target": 0.1}, "needs kl_coef > 0"),
    ({"kl_target": 0.1, "kl_coef": 0.0}, "needs kl_coef > 0"),
    ({"kl_target": 0.0, "kl_coef": 0.1}, "kl_target must be > 0"),
    ({"kl_target": 0.1, "kl_coef": 0.1, "kl_horizon": 0.0}, "kl_horizon must be > 0"),
    ({"kl_target": "high", "kl_coef": 0.1}, "kl_target must be float"),
])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_objective("ratio_clip", **settings)


def test_every_objective_takes_the_setting():
    from rlclip.objectives.base import available_objectives

    for name in available_objectives():
        kwargs = {"kl_coef": 0.01, "kl_target": 0.05}
        assert build_objective(name, **kwargs).kl_control is not None, name


# ------------------------------------------------------------------------------------------------ trainer

SETTINGS = ("objective.kl_coef=0.05", "objective.kl_target=1e-6", "objective.kl_horizon=16",
            "rollout.prompts_per_step=2", "rollout.max_new_tokens=8", "train.num_iterations=1",
            "train.mini_batches=1", "train.micro_batch_size=8")


def test_trains_logs_and_follows_verls_rule(tmp_path):
    """Each step logs the coefficient it applied; the next is verl's update of it with the step's logged KL and
    its 16 sequences (2 prompts x 8), horizon 16: at step 1 the policy is the reference (KL 0, error -1 clipped to
    -0.2: x 0.8), then the KL is far above the target 1e-6 (error +0.2: x 1.2): 0.05, 0.04, 0.048."""
    from rlclip.trainer import Trainer

    history = Trainer(tiny_config(tmp_path, "max_steps=3", *SETTINGS)).train()
    coefs = [h["objective/kl_coef"] for h in history]
    assert coefs[0] == pytest.approx(0.05, abs=1e-15)
    for before, after in zip(history, history[1:]):
        expected = verl_update(before["objective/kl_coef"], 1e-6, 16, before["objective/kl_ref"], 16)
        assert after["objective/kl_coef"] == pytest.approx(expected, rel=1e-12)
    assert history[0]["objective/kl_ref"] == 0.0 and history[1]["objective/kl_ref"] > 1e-5
    assert coefs == pytest.approx([0.05, 0.04, 0.048], rel=1e-12)


@pytest.mark.parametrize("objective", [["objective.name=ratio_clip"],
                                       ["objective.name=bapo", "objective.adv_ratio_target=50"]])
def test_resume_restores_the_state_bit_identically(tmp_path, objective):
    """3 steps straight == 2 steps, checkpoint, resume to 3; without the saved state the coefficient (and the
    weights) would differ, so the comparison is not vacuous."""
    from rlclip.trainer import Trainer

    def run(directory, *overrides):
        trainer = Trainer(tiny_config(tmp_path / directory, *SETTINGS, *objective, *overrides))
        return trainer, trainer.train()

    straight, straight_history = run("straight", "max_steps=3", "save_steps=0")
    run("resumed", "max_steps=2", "save_steps=2")
    saved = json.loads((tmp_path / "resumed/checkpoint-2/trainer_state.json").read_text())["objective"]
    assert saved["kl_coef"] == pytest.approx(0.048, rel=1e-12)
    resumed, resumed_history = run("resumed", "max_steps=3", "resume_from_checkpoint=latest")
    assert resumed.objective.state_dict() == straight.objective.state_dict()
    assert resumed_history[-1]["objective/kl_coef"] == straight_history[-1]["objective/kl_coef"]
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    if "objective.name=bapo" in objective:
        assert set(saved) == {"kl_coef", "ratio_low", "ratio_high"}  # the bounds travel with the coefficient
    # the negative control: an old checkpoint without the objective's state resumes from the constructor's
    del saved
    path = tmp_path / "resumed/checkpoint-2/trainer_state.json"
    state = json.loads(path.read_text())
    del state["objective"]
    path.write_text(json.dumps(state))
    forgot, forgot_history = run("resumed", "max_steps=3", "resume_from_checkpoint=latest")
    assert forgot_history[-1]["objective/kl_coef"] == pytest.approx(0.05, abs=1e-15)
    assert any(not torch.equal(a, b) for a, b in zip(straight.model.parameters(), forgot.model.parameters()))
