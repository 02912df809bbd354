"""ratio_clip, aggregation and KL estimators against hand-computed values and gradients."""

import math

import pytest
import torch

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, aggregate, build_objective, kl_estimate, register_objective
from rlclip.objectives.base import Objective

D = torch.float64


def batch(logratio, adv, mask=None, **kw):
    logratio = torch.tensor(logratio, dtype=D)
    logprobs = logratio.clone().requires_grad_(True)
    mask = torch.ones_like(logratio) if mask is None else torch.tensor(mask, dtype=D)
    return PolicyBatch(logprobs=logprobs, old_logprobs=torch.zeros_like(logratio),
                       advantages=torch.tensor(adv, dtype=D), mask=mask, **kw)


def test_asymmetric_clip_values_gradients_and_fractions():
    # rho = [1.5, 0.5, 1.1, 1.3], A = [1, -1, 1, -2], eps_low 0.2, eps_high 0.28:
    # t0: max(-1.5, -1.28) = -1.28 (clipped high, no grad)
    # t1: max(0.5, 0.8) = 0.8     (clipped low, no grad)
    # t2: max(-1.1, -1.1) = -1.1  grad -A*rho = -1.1
    # t3: max(2.6, 2.56) = 2.6    grad -A*rho = 2.6
    b = batch([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.3)]], [[1.0, -1.0, 1.0, -2.0]])
    out = build_objective("ratio_clip", eps_low=0.2, eps_high=0.28)(b)
    assert out.loss.item() == pytest.approx((-1.28 + 0.8 - 1.1 + 2.6) / 4, abs=1e-12)
    out.loss.backward()
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[0.0, 0.0, -1.1 / 4, 2.6 / 4]], dtype=D))
    assert out.metrics["clip_frac_low"].item() == pytest.approx(0.25)
    assert out.metrics["clip_frac_high"].item() == pytest.approx(0.25)
    assert out.metrics["ratio_max"].item() == pytest.approx(1.5)
    assert out.metrics["ratio_min"].item() == pytest.approx(0.5)
    # approx KL(old||new) = mean(rho - 1 - log rho)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 1.3)) / 4
    assert out.metrics["approx_kl"].item() == pytest.approx(expected_kl)


def test_dual_clip_bounds_negative_advantage_loss():
    # rho = 3, A = -1: PPO loss max(3, 1.2) = 3; dual clip c = 2 caps it at -c*A = 2 with zero grad.
    # rho = 1.1, A = -1: loss 1.1 < 2, untouched, grad -A*rho = 1.1.
    b = batch([[math.log(3.0), math.log(1.1)]], [[-1.0, -1.0]])
    out = build_objective("ratio_clip", dual_clip=2.0)(b)
    assert out.loss.item() == pytest.approx((2.0 + 1.1) / 2)
    out.loss.backward()
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[0.0, 1.1 / 2]], dtype=D))
    assert out.metrics["clip_frac_dual"].item() == pytest.approx(0.5)
    # Without dual clip the first token keeps its loss of 3.
    b2 = batch([[math.log(3.0), math.log(1.1)]], [[-1.0, -1.0]])
    assert build_objective("ratio_clip")(b2).loss.item() == pytest.approx((3.0 + 1.1) / 2)


def test_sequence_level_gspo_values_and_gradients():
    # Row 0: log ratios [0.2, -0.1] counted (third masked) -> s = exp(0.05), inside [0.8, 1.2]:
    #   L = -s per token, dL/dlogp_t = -s (GSPO-token gradient is s_i * grad log pi_t).
    # Row 1: log ratios 0.5 -> s = exp(0.5) > 1.2 with A = 1: clipped, L = -1.2, no grad.
    b = batch([[0.2, -0.1, 0.7], [0.5, 0.5, 0.5]], [[1.0] * 3, [1.0] * 3], mask=[[1, 1, 0], [1, 1, 1]])
    out = build_objective("ratio_clip", level="sequence", agg="token_mean")(b)  # an explicit agg is kept
    s = math.exp(0.05)
    assert out.loss.item() == pytest.approx((2 * -s + 3 * -1.2) / 5)
    out.loss.backward()
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-s / 5, -s / 5, 0.0], [0.0, 0.0, 0.0]], dtype=D))


def test_sequence_level_defaults_to_sequence_mean_and_keeps_an_explicit_agg():
    # Same rows as above; the GSPO default agg is seq_mean_token_mean (paper eq. 5, TRL, verl):
    #   row 0 mean -s over 2 tokens, row 1 mean -1.2 -> loss (-s - 1.2) / 2;
    #   grad of row 0's tokens: -s / 2 (row mean) / 2 (two rows) = -s / 4; row 1 clipped: 0.
    s = math.exp(0.05)
    b = batch([[0.2, -0.1, 0.7], [0.5, 0.5, 0.5]], [[1.0] * 3, [1.0] * 3], mask=[[1, 1, 0], [1, 1, 1]])
    obj = build_objective("ratio_clip", level="sequence")
    assert obj.agg == "seq_mean_token_mean"
    out = obj(b)
    assert out.loss.item() == pytest.approx((-s - 1.2) / 2)
    out.loss.backward()
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-s / 4, -s / 4, 0.0], [0.0, 0.0, 0.0]], dtype=D))
    assert build_objective("ratio_clip").agg == "token_mean"  # token level keeps the global default
    for agg in ("token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"):
        assert build_objective("ratio_clip", level="sequence", agg=agg).agg == agg


def test_sequence_level_default_agg_through_a_recipe():
    from conftest import ROOT
    from rlclip.config import build_objective_from_config, load_config

    cfg = load_config(ROOT / "recipes/smoke/tiny.yaml", ["objective.level=sequence"])
    assert build_objective_from_config(cfg).agg == "seq_mean_token_mean"
    cfg = load_config(ROOT / "recipes/smoke/tiny.yaml", ["objective.level=sequence", "objective.agg=token_mean"])
    assert build_objective_from_config(cfg).agg == "token_mean"


def test_sequence_level_equals_token_level_for_single_token_responses():
    torch.manual_seed(0)
    lr, adv = torch.randn(6, 1, dtype=D).tolist(), torch.randn(6, 1, dtype=D).tolist()
    bt, bs = batch(lr, adv), batch(lr, adv)
    lt = build_objective("ratio_clip", eps_high=0.3)(bt).loss
    ls = build_objective("ratio_clip", eps_high=0.3, level="sequence")(bs).loss
    lt.backward()
    ls.backward()
    assert lt.item() == pytest.approx(ls.item())
    torch.testing.assert_close(bt.logprobs.grad, bs.logprobs.grad)


def test_unclipped_limit_is_policy_gradient():
    # Huge eps: L = -A * rho; at rho = 1 the gradient is -A (vanilla policy gradient) / N.
    b = batch([[0.0, 0.0, 0.0]], [[2.0, -1.0, 0.5]])
    build_objective("ratio_clip", eps_low=1.0, eps_high=1e9)(b).loss.backward()
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-2.0, 1.0, -0.5]], dtype=D) / 3)


def test_log_ratio_is_clamped_no_overflow():
    b = batch([[100.0, -100.0]], [[-1.0, 1.0]])
    out = build_objective("ratio_clip", dual_clip=3.0)(b)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(b.logprobs.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_any_float_dtype(dtype):
    b = PolicyBatch(logprobs=torch.zeros(2, 3, dtype=dtype, requires_grad=True),
                    old_logprobs=torch.zeros(2, 3, dtype=dtype), advantages=torch.ones(2, 3, dtype=dtype),
                    mask=torch.ones(2, 3, dtype=dtype))
    out = build_objective("ratio_clip")(b)
    assert out.loss.dtype == dtype
    out.loss.backward()
    assert b.logprobs.grad.dtype == dtype


def test_aggregation_modes_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]], dtype=D)
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=D)  # last row fully masked
    assert aggregate(v, m, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "token_mean", num_tokens=8).item() == pytest.approx(10 / 8)
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(v, m, "seq_mean_token_sum_norm", norm_len=10).item() == pytest.approx((0.6 + 0.4) / 2)
    assert aggregate(v, m, "seq_mean_token_sum_norm").item() == pytest.approx((2 + 4 / 3) / 2)
    assert aggregate(v, m, "seq_mean_token_mean", num_sequences=4).item() == pytest.approx(6 / 4)
    with pytest.raises(ConfigError, match="token_mean"):
        aggregate(v, m, "mean")


def test_aggregation_gradient_token_mean_with_global_count():
    v = torch.tensor([[1.0, 2.0]], dtype=D, requires_grad=True)
    aggregate(v * v, torch.tensor([[1.0, 0.0]], dtype=D), num_tokens=4).backward()
    torch.testing.assert_close(v.grad, torch.tensor([[2 * 1.0 / 4, 0.0]], dtype=D))


@pytest.mark.parametrize("name, value, grad", [
    ("k1", -math.log(2), 1.0),
    ("k2", math.log(2) ** 2 / 2, -math.log(2)),
    ("k3", 1 - math.log(2), -1.0),
])
def test_kl_estimators(name, value, grad):
    # logprobs = 0, ref = log 2, d = log 2: k1 = -d, k2 = d^2/2, k3 = e^d - d - 1
    logp = torch.zeros(1, dtype=D, requires_grad=True)
    k = kl_estimate(logp, torch.tensor([math.log(2)], dtype=D), name)
    assert k.item() == pytest.approx(value)
    k.sum().backward()
    assert logp.grad.item() == pytest.approx(grad)


def test_low_var_kl_is_k3_clamped_to_ten_as_verl():
    # verl/trainer/ppo/core_algos.py @ b178a3cd, kl_penalty_forward, lines 1890-1896:
    #   kl = clamp(ref - logp, -20, 20); kld = exp(kl) - kl - 1; return clamp(kld, -10, 10).
    # d = log 2: 1 - log 2 (inside the clamp, same as k3, grad 1 - e^d = -1);
    # d = 5: e^5 - 6 = 142.4 -> 10, no grad; d = 30: clamp to 20 first, then 10.
    logp = torch.zeros(3, dtype=D, requires_grad=True)
    ref = torch.tensor([math.log(2), 5.0, 30.0], dtype=D)
    k = kl_estimate(logp, ref, "low_var_kl")
    torch.testing.assert_close(k, torch.tensor([1 - math.log(2), 10.0, 10.0], dtype=D))
    k.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, 0.0, 0.0], dtype=D))
    assert kl_estimate(torch.zeros(1), torch.tensor([5.0]), "k3").item() == pytest.approx(math.exp(5) - 6, rel=1e-6)


def test_kl_bias_correction_multiplies_k3_by_the_ratio():
    # logp - old = log 1.5 (rho = 1.5), ref - logp = log 2: k3 = 1 - log 2, corrected 1.5 (1 - log 2).
    # d/dlogp [rho k3] = rho k3 + rho (1 - e^d) = 1.5 (1 - log 2) - 1.5.
    ref = torch.full((1, 1), math.log(1.5) + math.log(2), dtype=D)
    b = batch([[math.log(1.5)]], [[0.0]], ref_logprobs=ref)
    out = build_objective("ratio_clip", kl_coef=1.0, kl_bias_correction=True)(b)
    assert out.loss.item() == pytest.approx(1.5 * (1 - math.log(2)))
    out.loss.backward()
    assert b.logprobs.grad.item() == pytest.approx(1.5 * (1 - math.log(2)) - 1.5)
    plain = build_objective("ratio_clip", kl_coef=1.0)(batch([[math.log(1.5)]], [[0.0]], ref_logprobs=ref))
    assert plain.loss.item() == pytest.approx(1 - math.log(2))  # off by default


def test_k3_is_clamped():
    assert torch.isfinite(kl_estimate(torch.tensor([0.0]), torch.tensor([500.0]), "k3")).all()


def test_kl_penalty_added_with_coefficient():
    b = batch([[0.0, 0.0]], [[0.0, 0.0]], ref_logprobs=torch.full((1, 2), math.log(2), dtype=D))
    obj = build_objective("ratio_clip", kl_coef=0.5, kl_estimator="k3")
    assert obj.needs == {"ref"}
    out = obj(b)
    assert out.loss.item() == pytest.approx(0.5 * (1 - math.log(2)))
    assert out.metrics["kl_ref"].item() == pytest.approx(1 - math.log(2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        obj(batch([[0.0]], [[1.0]]))


def test_build_errors_list_choices():
    with pytest.raises(ConfigError, match="ratio_clip"):
        build_objective("nope")
    with pytest.raises(ConfigError, match="eps_high"):
        build_objective("ratio_clip", eps_hi=0.3)
    with pytest.raises(ConfigError, match="must be float"):
        build_objective("ratio_clip", eps_low="wide")
    with pytest.raises(ConfigError, match="dual_clip"):
        build_objective("ratio_clip", dual_clip=0.5)
    with pytest.raises(ConfigError, match="level"):
        build_objective("ratio_clip", level="word")
    assert build_objective("ratio_clip", eps_low=1).eps_low == 1.0  # int accepted for float


def test_register_taken_name_raises_and_custom_objective_builds():
    with pytest.raises(ValueError, match="already registered"):
        @register_objective("ratio_clip")
        class Clash(Objective):
            def surrogate(self, batch):
                return batch.logprobs, {}

    @register_objective("test_vanilla_pg")
    class VanillaPG(Objective):
        def __init__(self, *, scale: float = 1.0, **shared):
            super().__init__(**shared)
            self.scale = scale

        def surrogate(self, batch):
            return -self.scale * batch.advantages * batch.logprobs, {}

    obj = build_objective("test_vanilla_pg", scale=2, agg="seq_mean_token_sum")
    b = batch([[0.5, 0.5]], [[1.0, 1.0]])
    assert obj(b).loss.item() == pytest.approx(-2 * (0.5 + 0.5))
    with pytest.raises(ConfigError, match="scale"):
        build_objective("test_vanilla_pg", scal=2)
