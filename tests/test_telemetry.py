"""trust/... telemetry (rlclip/telemetry.py) on hand-built batches, and through the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.base import Reducer
from rlclip.telemetry import TrustTelemetry, gradient_weights

D = torch.float64


def batch(ratios, advantages, mask=None, entropy=None) -> PolicyBatch:
    """Rows of tokens with the given importance ratios pi/pi_old; log-probs are grad leaves."""
    ratios = torch.tensor(ratios, dtype=D)
    old = torch.full_like(ratios, -1.0)
    logprobs = (old + ratios.log()).requires_grad_()
    adv = torch.tensor(advantages, dtype=D)[:, None].expand_as(ratios).contiguous()
    mask = torch.ones_like(ratios) if mask is None else torch.tensor(mask, dtype=D)
    return PolicyBatch(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask,
                       entropy=None if entropy is None else torch.tensor(entropy, dtype=D))


def weights(name, b, **settings):
    objective = build_objective(name, **settings)
    return gradient_weights(objective(b).loss, b, objective)


def test_ratio_clip_weight_is_the_ratio_inside_and_zero_where_clipped():
    # eps 0.2: A > 0 clips r > 1.2, A < 0 clips r < 0.8; elsewhere d(-A r)/d logp = -A r, so w = r
    b = batch([[1.0, 1.1, 1.3, 0.7], [1.0, 0.9, 0.7, 1.3]], [1.0, -2.0])
    w, defined = weights("ratio_clip", b)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.1, 0.0, 0.7], [1.0, 0.9, 0.0, 1.3]], dtype=D))
    assert bool(defined.all())


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                 "seq_mean_token_sum_norm"])
def test_on_policy_weight_is_one_under_every_aggregation(agg):
    b = batch([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [0.5, -1.0], mask=[[1, 1, 1], [1, 0, 0]])
    w, defined = weights("ratio_clip", b, agg=agg)
    assert defined.tolist() == [[True] * 3, [True, False, False]]
    torch.testing.assert_close(w[defined], torch.ones(4, dtype=D))


def test_zero_advantage_tokens_have_no_weight_and_cispo_amplifies():
    b = batch([[2.0, 1.0], [1.0, 1.0]], [1.0, 0.0])
    w, defined = weights("cispo", b)  # weight sg(min(r, 5)) * A logp: w = min(r, 5)
    assert defined.tolist() == [[True, True], [False, False]]
    torch.testing.assert_close(w[0], torch.tensor([2.0, 1.0], dtype=D))


def test_step_metrics_by_hand_and_over_micro_batches():
    # ratio_clip eps 0.2, A = +1 on row 0, -1 on row 1: w = r or 0 (see above)
    b = batch([[1.0, 1.1, 1.3, 0.4], [0.7, 1.0, 1.6, 1.2]], [1.0, -1.0],
              entropy=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    objective = build_objective("ratio_clip")
    b.num_tokens = b.mask.sum()
    whole = TrustTelemetry()
    whole.observe(objective(b).loss, b, objective)
    metrics = whole.end_step(Reducer())
    # w: row 0 -> 1.0, 1.1, 0 (r > 1.2), 0.4; row 1 -> 0 (r < 0.8), 1.0, 1.6, 1.2
    assert metrics["trust/zeroed_frac"] == pytest.approx(2 / 8)
    assert metrics["trust/attenuated_frac"] == pytest.approx(1 / 8)  # 0.4
    assert metrics["trust/amplified_frac"] == pytest.approx(1 / 8)  # 1.6
    assert metrics["trust/reversed_frac"] == 0.0
    ratios = torch.tensor([1.0, 1.1, 1.3, 0.4, 0.7, 1.0, 1.6, 1.2], dtype=D)
    assert metrics["trust/ratio_p50"] == pytest.approx(float(torch.quantile(ratios, 0.5)))
    assert metrics["trust/ratio_p05"] == pytest.approx(float(torch.quantile(ratios, 0.05)))
    assert metrics["trust/kl_old_new"] == pytest.approx(float((ratios - 1 - ratios.log()).mean()))
    assert metrics["trust/entropy_mean"] == pytest.approx(0.45)
    # entropy quintiles of 8 tokens: the zeroed ones (entropy 0.3 and 0.5) fall in q2 and q3
    assert metrics["trust/zeroed_frac_entropy_q1"] == 0.0 and metrics["trust/zeroed_frac_entropy_q5"] == 0.0
    assert metrics["trust/zeroed_frac_entropy_q2"] + metrics["trust/zeroed_frac_entropy_q3"] > 0
    # two micro-batches with the step's token count give the same metrics
    split = TrustTelemetry()
    for rows in ([0], [1]):
        part = PolicyBatch(**{**b.__dict__, **{k: getattr(b, k)[rows] for k in
                                               ("logprobs", "old_logprobs", "advantages", "mask", "entropy")}})
        split.observe(objective(part).loss, part, objective)
    assert split.end_step(Reducer()) == pytest.approx(metrics)


def test_entropy_filter_tokens_count_as_zeroed():
    b = batch([[1.0, 1.0, 1.0, 1.0]], [1.0], entropy=[[0.1, 0.9, 0.2, 0.8]])
    w, _ = weights("ratio_clip", b, entropy_top_quantile=0.5)
    assert w.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_troll_inside_its_bound_applies_the_ratio_through_the_support():
    from test_troll import build_support, peaked_logits, sparse_batch

    from rlclip.types import SupportSpec

    old, tokens, _, adv = peaked_logits(12, 30, seed=4)
    new = (old + 0.01 * torch.randn(12, 30, generator=torch.Generator().manual_seed(5), dtype=D)).requires_grad_()
    idx, mask, old_sup = build_support(new, old, tokens, SupportSpec())
    b = sparse_batch(new, idx, mask, old_sup, adv)
    objective = build_objective("troll")
    w, defined = gradient_weights(objective(b).loss, b, objective)
    ratio = (b.logprobs - b.old_logprobs).exp().detach()
    torch.testing.assert_close(w[defined], ratio[defined], rtol=1e-9, atol=1e-12)


def test_trainer_logs_trust_metrics_unless_switched_off(tmp_path):
    from rlclip.trainer import Trainer

    history = Trainer(tiny_config(tmp_path / "on", "max_steps=2")).train()
    for key in ("trust/zeroed_frac", "trust/ratio_p50", "trust/kl_old_new"):
        assert all(math.isfinite(h[key]) for h in history), key
    # mu = 2, two mini-batches: the first step is on policy (ratio 1, KL 0)
    assert history[0]["trust/ratio_p50"] == pytest.approx(1.0) and history[0]["trust/kl_old_new"] == pytest.approx(0)
    off = Trainer(tiny_config(tmp_path / "off", "max_steps=1", "logging.trust_metrics=false")).train()
    assert not any(k.startswith("trust/") for k in off[0])
