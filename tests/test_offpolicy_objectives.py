"""Objectives for stale data: ``dppo`` and ``reinforce_is`` (the M2PO filter: tests/test_m2_filter.py).

Peers, read at these commits (line numbers cited per function and test):

- verl: github.com/verl-project/verl 1dda039b9c6311889a9c9a26040677e1254814f9,
  verl/trainer/ppo/core_algos.py and verl/trainer/ppo/rollout_corr_helper.py;
- SkyRL: github.com/NovaSky-AI/SkyRL a9564572eb8e91076be43c1bd5e4615e3de17265,
  skyrl/backends/skyrl_train/utils/ppo_utils.py;
- prime-rl: github.com/PrimeIntellect-ai/prime-rl 559b44772e471d1538537b8805cc77f3824a5e64,
  src/prime_rl/trainer/rl/loss.py.

The ``dppo_verl``, ``dppo_skyrl``, ``dppo_prime_rl``, ``rollout_is_weights_verl`` and ``reinforce_verl``
functions transcribe the peers' code (torch only, float64) and are the oracles of the comparison tests;
the hand-value tests spell the numbers out. The last tests train a tiny model through the trainer, with
the recipes' objectives and the M2 filter.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, coin, train_tiny  # noqa: F401  (coin: imported from here by other tests)
from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective

D = torch.float64


def prob_batch(p, p_old, adv, mask=None, **extra) -> PolicyBatch:
    """A batch from probabilities of the sampled tokens: logprobs = log p (a grad leaf), old = log p_old."""
    logp = torch.tensor(p, dtype=D).log()
    mask = torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=D)
    return PolicyBatch(logprobs=logp.clone().requires_grad_(), old_logprobs=torch.tensor(p_old, dtype=D).log(),
                       advantages=torch.tensor(adv, dtype=D).expand_as(logp).contiguous(), mask=mask, **extra)


def random_batch(seed: int, b: int = 6, t: int = 7, scale: float = 0.6, **extra) -> PolicyBatch:
    """Probabilities in (0, 1) for both policies, token advantages of both signs, one padded tail per row."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=D) * 3 - 0.02
    old = (logp + scale * torch.randn(b, t, generator=g, dtype=D)).clamp(max=-1e-3)
    adv = torch.randn(b, t, generator=g, dtype=D)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).to(D)
    return PolicyBatch(logprobs=logp.requires_grad_(), old_logprobs=old, advantages=adv, mask=mask, **extra)


def log_ratio_batch(log_ratios, adv, mask=None, logprobs=None, **extra) -> PolicyBatch:
    """A batch from log ratios logprobs - old_logprobs (log-probs -0.7 unless given)."""
    lr = torch.tensor(log_ratios, dtype=D)
    logp = torch.full_like(lr, -0.7) if logprobs is None else torch.tensor(logprobs, dtype=D)
    mask = torch.ones_like(lr) if mask is None else torch.tensor(mask, dtype=D)
    return PolicyBatch(logprobs=logp.clone().requires_grad_(), old_logprobs=logp - lr,
                       advantages=torch.tensor(adv, dtype=D).expand_as(lr).contiguous(), mask=mask, **extra)


def fresh(batch: PolicyBatch, **changes) -> PolicyBatch:
    """The same batch with a new log-prob leaf (so each objective gets its own gradient)."""
    return PolicyBatch(**{**batch.__dict__, "logprobs": batch.logprobs.detach().clone().requires_grad_(), **changes})


def ours(name: str, batch: PolicyBatch, **settings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    batch = fresh(batch)
    out = build_objective(name, **settings)(batch)
    out.loss.backward()
    return out.loss.detach(), batch.logprobs.grad, out.metrics


def peer(fn, batch: PolicyBatch, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient of a transcribed peer loss on a fresh leaf."""
    logp = batch.logprobs.detach().clone().requires_grad_()
    loss = fn(logp, batch.old_logprobs, batch.advantages, batch.mask, **kwargs)
    loss.backward()
    return loss.detach(), logp.grad


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's agg_loss "token-mean" on one process: sum(L * mask) / sum(mask)."""
    return (per_token * mask).sum() / mask.sum()


def assert_same(a, b, tol: float = 1e-12) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- dppo

def dppo_verl(log_prob, old_log_prob, advantages, response_mask, variant="tv", low=0.15, high=0.15, cap=20.0):
    """verl core_algos.py compute_policy_loss_dppo_tv (lines 1379-1457) / _dppo_kl (1460-1542), token-mean."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))  # 1418-1421 / 1499-1502
    truncated_ratio = torch.clamp(ratio, max=cap).detach()  # 1427-1429 / 1508-1510
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)  # 1432-1433 / 1513-1514
    if variant == "tv":
        valid_positive_mask = (prob - old_prob) <= high  # 1434
        valid_negative_mask = (prob - old_prob) >= -low  # 1435
    else:
        binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))  # 1515-1517
        valid_positive_mask = (binary_kl <= high) | (prob <= old_prob)  # 1518
        valid_negative_mask = (binary_kl <= low) | (prob >= old_prob)  # 1519
    valid_mask = torch.where(advantages > 0, valid_positive_mask, valid_negative_mask).detach().float()  # 1436-1437
    pg_losses = -advantages * truncated_ratio * log_prob * valid_mask.to(log_prob.dtype)  # 1439 / 1523
    return token_mean(pg_losses, response_mask)


def dppo_skyrl(log_probs, mu_log_probs, advantages, loss_mask, variant="tv", low=0.2, high=0.2):
    """SkyRL ppo_utils.py dppo_policy_loss, lines 866-935 (exp in float64 here; SkyRL's safe_exp_delta uses
    float32), divided by the token count (SkyRL scales the advantages so that its sum is the token mean)."""
    ratio = torch.exp(torch.clamp(log_probs - mu_log_probs, -20.0, 20.0))  # 890
    with torch.no_grad():  # 897-918
        current_probs, mu_probs = torch.exp(log_probs), torch.exp(mu_log_probs)
        prob_diff = current_probs - mu_probs
        mask = torch.ones_like(advantages)
        if variant == "tv":
            mask[(advantages > 0) & (prob_diff > high)] = 0.0
            mask[(advantages < 0) & (-prob_diff > low)] = 0.0
        else:
            binary_kl = mu_probs * (mu_log_probs - log_probs) + (1 - mu_probs) * torch.log(
                (1 - mu_probs + 1e-8) / (1 - current_probs + 1e-8))
            mask[(advantages > 0) & (prob_diff > 0) & (binary_kl > high)] = 0.0
            mask[(advantages < 0) & (prob_diff < 0) & (binary_kl > low)] = 0.0
    loss = -(ratio * advantages * mask)  # 923
    return (loss * loss_mask).sum() / loss_mask.sum()  # reduce_loss, line 1149


def dppo_prime_rl(trainer_logprobs, inference_logprobs, advantages, loss_mask, low=0.2, high=0.2, kl_tau=0.0):
    """prime-rl loss.py default_loss_fn (lines 109-161; Binary-TV), summed loss divided by the token count."""
    log_importance_ratio = trainer_logprobs - inference_logprobs  # compute_importance_ratio_and_mismatch_kl
    importance_ratio = torch.exp(log_importance_ratio)
    probs_diff = torch.exp(trainer_logprobs) - torch.exp(inference_logprobs)  # 130
    invalid = torch.where(advantages > 0, probs_diff > high, probs_diff < -low)  # 131-135
    keep_mask = loss_mask.bool() & ~invalid  # 140
    pg_loss = keep_mask * advantages * importance_ratio  # 144
    kl_loss = loss_mask * log_importance_ratio**2  # 145
    return (-pg_loss + kl_tau * kl_loss).sum() / loss_mask.sum()  # 146-148


def test_dppo_tv_hand_values_from_verl():
    # verl lines 1427-1439: w = sg(min(rho, 20)); valid = p - p_old <= 0.15 (A > 0), >= -0.15 (A <= 0);
    # L = -A w logp valid, token-mean over 5 tokens.
    #   t0 p .4 / .3, A  1: +0.1, valid, w 4/3        t1 p .5 / .3, A  1: +0.2 > 0.15, masked
    #   t2 p .1 / .3, A -1: -0.2 < -0.15, masked      t3 p .5 / .3, A -1: valid, w 5/3
    #   t4 p .9 / .03, A -2: valid (A < 0, p rose), rho 30 -> w capped at 20
    b = prob_batch([[0.4, 0.5, 0.1, 0.5, 0.9]], [[0.3, 0.3, 0.3, 0.3, 0.03]], [[1.0, 1.0, -1.0, -1.0, -2.0]])
    loss, grad, m = ours("dppo", b)
    expected = (-(4 / 3) * math.log(0.4) + (5 / 3) * math.log(0.5) + 2 * 20 * math.log(0.9)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-4 / 3, 0.0, 0.0, 5 / 3, 40.0]], dtype=D) / 5)
    assert (m["clip_frac_high"].item(), m["clip_frac_low"].item(), m["masked_frac"].item(),
            m["clip_frac_is_cap"].item()) == pytest.approx((0.2, 0.2, 0.4, 0.2))
    assert_same((loss, grad), peer(dppo_verl, b))
    # a wider upper threshold lets t1 in (w = 5/3); no cap gives t4 its full weight 30
    _, grad, _ = ours("dppo", b, eps_high=0.25, is_cap=None)
    torch.testing.assert_close(grad, torch.tensor([[-4 / 3, -5 / 3, 0.0, 5 / 3, 60.0]], dtype=D) / 5)


def test_dppo_kl_hand_values_from_verl():
    # verl lines 1515-1523: D = p_old log(p_old / p) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8));
    # valid = D <= 0.05 or p <= p_old (A > 0), D <= 0.05 or p >= p_old (A <= 0).
    # p_old = 0.5: p = 0.7 or 0.3 -> D = 0.5 ln(5/7) + 0.5 ln(5/3) = 0.0872; p = 0.6 -> D = 0.0204.
    #   t0 p .7, A  1: D > 0.05 and p rose: masked    t1 p .6, A  1: D small: valid, w 1.2
    #   t2 p .3, A  1: p fell, valid, w 0.6           t3 p .3, A -1: D > 0.05 and p fell: masked
    #   t4 p .7, A -1: p rose, valid, w 1.4
    def bkl(p_old, p):
        return p_old * math.log(p_old / p) + (1 - p_old) * math.log((1 - p_old + 1e-8) / (1 - p + 1e-8))

    assert bkl(0.5, 0.7) == pytest.approx(0.087177, abs=1e-6) and bkl(0.5, 0.6) == pytest.approx(0.020411, abs=1e-6)
    b = prob_batch([[0.7, 0.6, 0.3, 0.3, 0.7]], [[0.5] * 5], [[1.0, 1.0, 1.0, -1.0, -1.0]])
    loss, grad, m = ours("dppo", b, variant="kl")
    expected = (-1.2 * math.log(0.6) - 0.6 * math.log(0.3) + 1.4 * math.log(0.7)) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.2, -0.6, 0.0, 1.4]], dtype=D) / 5)
    div = [bkl(0.5, p) for p in (0.7, 0.6, 0.3, 0.3, 0.7)]
    assert m["divergence_mean"].item() == pytest.approx(sum(div) / 5, rel=1e-9)
    assert_same((loss, grad), peer(dppo_verl, b, variant="kl", low=0.05, high=0.05))


@pytest.mark.parametrize("variant, eps", [("tv", 0.15), ("tv", 0.05), ("kl", 0.05), ("kl", 0.01)])
@pytest.mark.parametrize("cap", [20.0, 1.5])
def test_dppo_equals_verl_on_random_batches(variant, eps, cap):
    b = random_batch(1, scale=0.8)
    got = ours("dppo", b, variant=variant, eps_low=eps, eps_high=2 * eps, is_cap=cap)
    assert 0 < got[2]["masked_frac"] < 0.5
    assert_same(got[:2], peer(dppo_verl, b, variant=variant, low=eps, high=2 * eps, cap=cap))


@pytest.mark.parametrize("variant", ["tv", "kl"])
def test_dppo_gradient_equals_skyrl_and_prime_rl_without_a_cap(variant):
    # SkyRL and prime-rl keep the gradient in rho (L = -A rho mask): the same gradient as
    # -A sg(rho) logp mask when the cap never binds, but another loss value
    b = random_batch(2, scale=0.8)
    loss, grad, _ = ours("dppo", b, variant=variant, eps_low=0.1, eps_high=0.05, is_cap=None)
    sky_loss, sky_grad = peer(dppo_skyrl, b, variant=variant, low=0.1, high=0.05)
    torch.testing.assert_close(grad, sky_grad, rtol=1e-12, atol=1e-12)
    assert abs(loss.item() - sky_loss.item()) > 1e-3
    if variant == "tv":  # prime-rl has Binary-TV only; its (log rho)^2 term (kl_tau) is off here
        torch.testing.assert_close(grad, peer(dppo_prime_rl, b, low=0.1, high=0.05)[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["tv", "kl"])
def test_dppo_without_triggers_is_the_importance_weighted_policy_gradient(variant):
    b = random_batch(3, scale=0.8)
    dppo = ours("dppo", b, variant=variant, eps_low=1e9, eps_high=1e9, is_cap=None)
    assert dppo[2]["masked_frac"].item() == 0.0
    # the same loss and gradient as CISPO without clipping; the gradient of ratio_clip without clipping
    assert_same(dppo[:2], ours("cispo", b, eps_high=1e9)[:2])
    torch.testing.assert_close(dppo[1], ours("ratio_clip", b, eps_low=1e9, eps_high=1e9)[1], rtol=1e-12, atol=1e-12)
    # on-policy (old = current): rho = 1, valid everywhere, REINFORCE (gpg)
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("dppo", on, variant=variant)[:2], ours("gpg", on)[:2])


def test_dppo_defaults_and_bad_settings():
    tv, kl = build_objective("dppo"), build_objective("dppo", variant="kl")
    assert (tv.eps_low, tv.eps_high, tv.is_cap, tv.agg) == (0.15, 0.15, 20.0, "token_mean")
    assert (kl.eps_low, kl.eps_high) == (0.05, 0.05)
    assert build_objective("dppo", variant="kl", eps_high=0.1).eps_low == 0.05
    for bad in ({"variant": "js"}, {"eps_low": -0.1}, {"is_cap": 0.0}):
        with pytest.raises(ConfigError, match="dppo"):
            build_objective("dppo", **bad)


# --------------------------------------------------------------------------------------------- reinforce_is

def rollout_is_weights_verl(log_ratio, response_mask, rollout_is="token", threshold=2.0):
    """verl rollout_corr_helper.py compute_rollout_correction_weights, lines 522-657 (no batch normalisation).

    ``threshold``: a float (TIS) or "lower_upper" (IcePop), as _parse_rollout_is_threshold.
    """
    if isinstance(threshold, str):
        lower, upper = (float(x) for x in threshold.split("_"))
    else:
        lower, upper = None, float(threshold)
    if rollout_is == "token":  # 572-576
        raw = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:  # 578-586
        log_ratio_sum = (log_ratio * response_mask).sum(-1).unsqueeze(-1)
        raw = torch.exp(torch.clamp(log_ratio_sum, min=-20.0, max=20.0)).expand_as(log_ratio)
    raw = raw * response_mask  # 592
    if lower is None:  # 595-604
        weights = raw.clamp(max=upper)
    else:
        weights = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    return weights.detach()  # 625


def reinforce_verl(log_prob, rollout_log_prob, advantages, response_mask, rollout_is="sequence", threshold=2.0):
    """verl core_algos.py bypass mode with loss_type "reinforce": compute_policy_loss_bypass_mode (2412-2547)
    computes the weights from the current log-probs under no_grad (2495-2507) and calls
    compute_policy_loss_reinforce (2332-2409): pg_losses = -A * log_prob * w (2388), token-mean."""
    with torch.no_grad():
        weights = None if rollout_is is None else rollout_is_weights_verl(
            log_prob - rollout_log_prob, response_mask, rollout_is, threshold)
    pg_losses = -advantages * log_prob if weights is None else -advantages * log_prob * weights
    return token_mean(pg_losses, response_mask)


def test_reinforce_is_hand_values():
    # row 0: log ratios [0.3, 0.5] -> sequence ratio e^0.8 = 2.23 > 2: w = 2; row 1: [-0.2, 0.1] -> w = e^-0.1
    b = log_ratio_batch([[0.3, 0.5], [-0.2, 0.1]], [[1.0], [-3.0]], logprobs=[[-0.5, -1.0], [-2.0, -0.7]])
    w1 = math.exp(-0.1)
    loss, grad, m = ours("reinforce_is", b)
    assert loss.item() == pytest.approx((2 * (0.5 + 1.0) - 3 * w1 * (2.0 + 0.7)) / 4, rel=1e-9)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -2.0], [3 * w1, 3 * w1]], dtype=D) / 4)
    assert m["is_weight_mean"].item() == pytest.approx((4 + 2 * w1) / 4)
    assert m["clip_frac_is_cap"].item() == pytest.approx(0.5)
    # token level, cap 1.5: ratios [1.35, 1.65, 0.82, 1.11] -> w = [e^0.3, 1.5, e^-0.2, e^0.1]
    _, grad, _ = ours("reinforce_is", b, is_mode="token_truncate", is_cap=1.5)
    w = torch.tensor([[math.exp(0.3), 1.5], [math.exp(-0.2), math.exp(0.1)]], dtype=D)
    torch.testing.assert_close(grad, -torch.tensor([[1.0], [-3.0]], dtype=D) * w / 4)
    # IcePop band [0.9, 1.5] at token level: 1.65 and 0.82 are zeroed
    _, grad, _ = ours("reinforce_is", b, is_mode="token_mask", is_cap=1.5, is_floor=0.9)
    w = torch.tensor([[math.exp(0.3), 0.0], [0.0, math.exp(0.1)]], dtype=D)
    torch.testing.assert_close(grad, -torch.tensor([[1.0], [-3.0]], dtype=D) * w / 4)


@pytest.mark.parametrize("mode, rollout_is, cap, floor", [
    ("sequence_truncate", "sequence", 2.0, None), ("token_truncate", "token", 2.0, None),
    ("token_truncate", "token", 1.1, None), ("token_mask", "token", 1.5, 0.5), ("sequence_mask", "sequence", 3.0, 0.3),
    ("none", None, 2.0, None),
])
def test_reinforce_is_in_bypass_mode_equals_verl(mode, rollout_is, cap, floor):
    """pi_old := the sampler mu (rollout.proximal: bypass), so PolicyBatch.token_weights = pi_prox / mu = 1."""
    b = random_batch(4, scale=0.3)
    threshold = cap if floor is None else f"{floor}_{cap}"
    expected = peer(reinforce_verl, b, rollout_is=rollout_is, threshold=threshold)
    assert_same(ours("reinforce_is", b, is_mode=mode, is_cap=cap, is_floor=floor)[:2], expected)
    assert_same(ours("reinforce_is", fresh(b, token_weights=torch.ones_like(b.mask)), is_mode=mode, is_cap=cap,
                     is_floor=floor)[:2], expected)


def test_reinforce_is_with_outside_weights_is_verls_reinforce_loss():
    # is_mode none: the surrogate is -A logp and PolicyBatch.token_weights carry the weights, as verl's
    # compute_policy_loss_reinforce(rollout_is_weights=w) (core_algos.py line 2388)
    b = random_batch(5, scale=0.3)
    w = rollout_is_weights_verl(b.logprobs.detach() - b.old_logprobs, b.mask, "token", 2.0)

    def reinforce_with_weights(log_prob, rollout_log_prob, advantages, response_mask):
        return token_mean(-advantages * log_prob * w, response_mask)

    assert_same(ours("reinforce_is", fresh(b, token_weights=w), is_mode="none")[:2], peer(reinforce_with_weights, b))


def test_reinforce_is_reductions():
    b = random_batch(6, scale=0.5)
    # unit weights (on-policy, or is_mode none): plain REINFORCE, gpg
    on = fresh(b, old_logprobs=b.logprobs.detach().clone())
    assert_same(ours("reinforce_is", on)[:2], ours("gpg", on)[:2])
    assert_same(ours("reinforce_is", b, is_mode="none")[:2], ours("gpg", b)[:2])
    # token-level truncation at C is CISPO with eps_high = C - 1 and no floor
    assert_same(ours("reinforce_is", b, is_mode="token_truncate", is_cap=1.4)[:2],
                ours("cispo", b, eps_high=0.4)[:2])
    # a cap that never binds: the importance-weighted policy gradient (ratio_clip without clipping)
    torch.testing.assert_close(ours("reinforce_is", b, is_mode="token_truncate", is_cap=1e9)[1],
                               ours("ratio_clip", b, eps_low=1e9, eps_high=1e9)[1], rtol=1e-12, atol=1e-12)


def test_reinforce_is_defaults_and_bad_settings():
    obj = build_objective("reinforce_is")
    assert (obj.is_mode, obj.is_cap, obj.is_floor, obj.agg) == ("sequence_truncate", 2.0, None, "token_mean")
    for bad in ({"is_mode": "sequence"}, {"is_cap": 0.0}, {"is_floor": 3.0}, {"is_floor": -0.1}):
        with pytest.raises(ConfigError, match="reinforce_is"):
            build_objective("reinforce_is", **bad)


# --------------------------------------------------------------------------------------------- recipes, trainer

@pytest.mark.parametrize("name", ["dppo", "reinforce_is"])
def test_gsm8k_recipe(name):
    from rlclip.config import build_objective_from_config, load_config

    config = load_config(ROOT / f"recipes/gsm8k/grpo_{name}.yaml")
    assert config.objective["name"] == name and config.data.name == "gsm8k"
    assert build_objective_from_config(config).name == name


@pytest.mark.parametrize("overrides, metric", [
    (["objective.name=dppo", "objective.eps_low=0.001", "objective.eps_high=0.001"], "objective/masked_frac"),
    (["objective.name=dppo", "objective.variant=kl", "objective.eps_low=1e-4", "objective.eps_high=1e-4"],
     "objective/masked_frac"),
    (["objective.name=reinforce_is", "objective.is_cap=1.01"], "objective/clip_frac_is_cap"),
    (["objective.m2_threshold=1e-4", "train.micro_batch_size=4"], "objective/m2_masked_frac"),  # no-grad step pass
    (["objective.name=reinforce_is", "rollout.proximal=bypass", "rollout.staleness=2", "objective.m2_threshold=1e-4"],
     "objective/m2_masked_frac"),
])
def test_trains_through_the_trainer(tmp_path, overrides, metric):
    """Two mini-batches, mu = 2: from step 2 on the policy has moved, so each mask or cap acts."""
    history = train_tiny(tmp_path, *overrides)
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)
    assert history[0][metric] == 0.0 and max(h[metric] for h in history) > 0
