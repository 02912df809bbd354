"""PSPO (arXiv 2509.21282): hand-computed values, the (1 - alpha) gradient identity, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.pspo import PSPO

D = torch.float64


def hand_batch() -> PolicyBatch:
    """One response of two tokens: ratios 1.5 and 0.5, advantages +2 and -1."""
    old = torch.tensor([[math.log(0.4), math.log(0.2)]], dtype=D)
    ratio = torch.tensor([[1.5, 0.5]], dtype=D)
    return PolicyBatch(logprobs=(old + ratio.log()).requires_grad_(True), old_logprobs=old,
                       advantages=torch.tensor([[2.0, -1.0]], dtype=D), mask=torch.ones(1, 2, dtype=D))


def random_batch(seed: int = 0, B: int = 5, T: int = 8, dtype: torch.dtype = D) -> PolicyBatch:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logprobs = (old + 0.5 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).to(dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    return PolicyBatch(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask,
                       ref_logprobs=old + 0.2 * torch.randn(B, T, generator=g, dtype=dtype))


def loss_and_grad(obj, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    batch.logprobs.grad = None
    out = obj(batch)
    out.loss.backward()
    return out.loss.detach(), batch.logprobs.grad.clone(), out.metrics


def unclipped_ratio_loss(batch: PolicyBatch) -> torch.Tensor:
    """-A * rho, token mean: the plain importance-weighted policy gradient, written independently."""
    rho = torch.exp(batch.logprobs - batch.old_logprobs)
    return (-batch.advantages * rho * batch.mask).sum() / batch.mask.sum()


def test_hand_computed_value_gradient_and_metrics():
    batch = hand_batch()
    loss, grad, m = loss_and_grad(build_objective("pspo", alpha=0.1), batch)
    # r_s = 0.9 * 1.5 + 0.1 = 1.45 and 0.9 * 0.5 + 0.1 = 0.55; L = [-2 * 1.45, 1 * 0.55] = [-2.9, 0.55]
    # token mean = (-2.9 + 0.55) / 2 = -1.175
    assert loss.item() == pytest.approx(-1.175, abs=1e-12)
    # dL/dlogp = -A * 0.9 * rho / 2: [-2 * 0.9 * 1.5 / 2, 1 * 0.9 * 0.5 / 2] = [-1.35, 0.225]
    torch.testing.assert_close(grad, torch.tensor([[-1.35, 0.225]], dtype=D), atol=1e-12, rtol=0)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["ratio_min"].item() == pytest.approx(0.5) and m["ratio_max"].item() == pytest.approx(1.5)
    assert m["smoothed_ratio_mean"].item() == pytest.approx(1.0)
    assert m["smoothed_ratio_min"].item() == pytest.approx(0.55)
    assert m["smoothed_ratio_max"].item() == pytest.approx(1.45)
    assert not any(k.startswith("clip_frac") for k in m)  # nothing is clipped without eps


def test_hand_computed_with_eps():
    batch = hand_batch()
    loss, grad, m = loss_and_grad(build_objective("pspo", alpha=0.1, eps=0.2), batch)
    # r_s = 1.45, A = 2: max(-2.9, -2 * 1.2) = -2.4 (clipped); r_s = 0.55, A = -1: max(0.55, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-2.4 + 0.8) / 2, abs=1e-12)
    assert torch.all(grad == 0)
    assert m["clip_frac_high"].item() == pytest.approx(0.5)
    assert m["clip_frac_low"].item() == pytest.approx(0.5)
    # a wide eps clips nothing: same loss and gradient as without eps
    wide, plain = build_objective("pspo", eps=0.9), build_objective("pspo")
    lw, gw, mw = loss_and_grad(wide, batch)
    lp, gp, _ = loss_and_grad(plain, batch)
    assert torch.equal(lw, lp) and torch.equal(gw, gp)
    assert mw["clip_frac_high"].item() == 0.0 and mw["clip_frac_low"].item() == 0.0


def test_alpha_zero_is_the_unclipped_ratio_loss():
    for seed in range(3):
        batch = random_batch(seed)
        loss, grad, _ = loss_and_grad(build_objective("pspo", alpha=0.0), batch)
        batch.logprobs.grad = None
        ref = unclipped_ratio_loss(batch)
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(grad, batch.logprobs.grad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_gradient_is_one_minus_alpha_times_unclipped_gradient(alpha, agg):
    """The smoothing is a learning-rate scale: no trust region unless eps is set."""
    for seed in range(3):
        batch = random_batch(seed)
        _, g_pspo, _ = loss_and_grad(build_objective("pspo", alpha=alpha, agg=agg), batch)
        _, g_plain, _ = loss_and_grad(build_objective("pspo", alpha=0.0, agg=agg), batch)
        assert g_plain.abs().sum() > 0
        torch.testing.assert_close(g_pspo, (1 - alpha) * g_plain, rtol=1e-12, atol=1e-14)
        # and the ratio is far from 1 somewhere: a clip with eps = 0.2 would have cut those gradients
        _, g_clip, _ = loss_and_grad(build_objective("ratio_clip", agg=agg), batch)
        assert not torch.allclose(g_clip, g_plain)


def test_alpha_one_has_no_gradient():
    batch = random_batch(4)
    loss, grad, _ = loss_and_grad(build_objective("pspo", alpha=1.0), batch)
    assert torch.all(grad == 0)
    expected = (-batch.advantages * batch.mask).sum() / batch.mask.sum()
    torch.testing.assert_close(loss, expected)


def test_log_ratio_is_clamped():
    batch = hand_batch()
    batch.old_logprobs = batch.old_logprobs - 50.0  # log ratio ~ 50, clamped at 20
    _, grad, m = loss_and_grad(build_objective("pspo"), batch)
    assert m["ratio_max"].item() == pytest.approx(math.exp(20.0))
    assert torch.all(grad == 0) and torch.isfinite(grad).all()


def test_shared_kl_coef_adds_on_top():
    batch = random_batch(5)
    obj = build_objective("pspo", kl_coef=0.1)
    assert obj.needs == {"ref"} and build_objective("pspo").needs == set()
    l1, _, m = loss_and_grad(obj, batch)
    l0, _, _ = loss_and_grad(build_objective("pspo"), batch)
    d = batch.ref_logprobs - batch.logprobs.detach()
    kl = ((torch.expm1(d) - d) * batch.mask).sum() / batch.mask.sum()
    torch.testing.assert_close(l1 - l0, 0.1 * kl, rtol=1e-12, atol=1e-12)
    assert "kl_ref" in m


# --- edge cases -----------------------------------------------------------------------------------


def assert_finite(loss: torch.Tensor, grad: torch.Tensor, metrics: dict) -> None:
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    for k, v in metrics.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), k


@pytest.mark.parametrize("eps", [None, 0.2])
def test_fully_masked_rows_and_all_masked_batch(eps):
    batch = random_batch(6)
    obj = build_objective("pspo", eps=eps)
    batch.mask[1] = 0
    loss, grad, m = loss_and_grad(obj, batch)
    assert_finite(loss, grad, m)
    assert torch.all(grad[1] == 0)
    kept = torch.tensor([0, 2, 3, 4])
    sub = PolicyBatch(logprobs=batch.logprobs.detach()[kept].requires_grad_(True),
                      old_logprobs=batch.old_logprobs[kept], advantages=batch.advantages[kept], mask=batch.mask[kept])
    ls, gs, _ = loss_and_grad(obj, sub)
    torch.testing.assert_close(loss, ls, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[kept], gs, rtol=1e-12, atol=1e-12)
    batch.mask = torch.zeros_like(batch.mask)
    loss, grad, m = loss_and_grad(obj, batch)
    assert_finite(loss, grad, m)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("eps", [None, 0.2])
def test_single_token_responses_and_zero_advantages(eps):
    batch = random_batch(7)
    batch.mask = torch.zeros_like(batch.mask)
    batch.mask[:, 0] = 1
    obj = build_objective("pspo", eps=eps)
    assert_finite(*loss_and_grad(obj, batch))
    batch.advantages = torch.zeros_like(batch.advantages)
    loss, grad, m = loss_and_grad(obj, batch)
    assert_finite(loss, grad, m)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_float32_batch():
    batch = random_batch(8, dtype=torch.float32)
    loss, grad, m = loss_and_grad(build_objective("pspo", eps=0.3), batch)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_finite(loss, grad, m)


# --- settings -------------------------------------------------------------------------------------


def test_defaults():
    obj = build_objective("pspo")
    assert isinstance(obj, PSPO) and obj.alpha == 0.1 and obj.eps is None
    assert build_objective("pspo", alpha=0, eps=1).eps == 1.0


@pytest.mark.parametrize("settings", [
    {"bogus": 1},
    {"alpha": -0.1},
    {"alpha": 1.5},
    {"alpha": float("nan")},
    {"eps": -0.2},
    {"eps": float("nan")},
    {"alpha": "0.1"},
])
def test_invalid_settings_raise_config_error(settings):
    with pytest.raises(ConfigError):
        build_objective("pspo", **settings)
