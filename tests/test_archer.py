"""Archer (arXiv 2507.15778): hand-computed values, reductions to ratio_clip, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, aggregate, build_objective, kl_estimate
from rlclip.objectives.archer import Archer, masked_row_quantile
from rlclip.objectives.base import Reducer
from rlclip.utils import rows_of

D = torch.float64
LN2 = math.log(2.0)


def hand_batch() -> tuple[PolicyBatch, torch.Tensor]:
    """Two responses, T = 4; row 1 has one padding token.

    Row 0 entropies [0.1, 0.4, 0.2, 0.3], q = 0.5: sorted [0.1, 0.2, 0.3, 0.4],
    position 0.5 * 3 = 1.5, tau_0 = 0.2 + 0.5 * (0.3 - 0.2) = 0.25
    -> knowledge t0, t2; reasoning t1, t3.
    Row 1 entropies [0.5, 0.5, 0.9, (pad 7.0)], n = 3, position 0.5 * 2 = 1,
    tau_1 = 0.5 -> knowledge t0, t1 (ties are knowledge: <=); reasoning t2.
    """
    ratio = torch.tensor([[1.3, 1.3, 0.7, 1.6], [0.7, 4.0, 0.4, 1.0]], dtype=D)
    old = torch.full((2, 4), math.log(0.5), dtype=D)
    logprobs = (old + ratio.log()).clone().requires_grad_(True)
    # d = ref - logprobs per token: k3(ln 2) = 1 - ln 2, k3(0) = 0, k3(-ln 2) = ln 2 - 1/2
    d = torch.tensor([[LN2, 0.0, 0.0, -LN2], [0.0, LN2, LN2, 5.0]], dtype=D)
    batch = PolicyBatch(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=torch.tensor([[1.0] * 4, [-2.0] * 4], dtype=D),
        mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=D),
        ref_logprobs=(logprobs + d).detach(),
        entropy=torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.5, 0.9, 7.0]], dtype=D),
    )
    return batch, logprobs


def random_batch(seed: int = 0, B: int = 6, T: int = 9, dtype: torch.dtype = D, ref: bool = True) -> PolicyBatch:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    logprobs = (old + 0.6 * torch.randn(B, T, generator=g, dtype=dtype)).requires_grad_(True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths[:, None]).to(dtype)
    adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    return PolicyBatch(
        logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask,
        ref_logprobs=(old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)) if ref else None,
        entropy=torch.rand(B, T, generator=g, dtype=dtype) * 2,
    )


def loss_and_grad(obj, batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    batch.logprobs.grad = None
    out = obj(batch)
    out.loss.backward()
    return out.loss.detach(), batch.logprobs.grad.clone(), out.metrics


def class_masks(batch: PolicyBatch, q: float, per_response: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference split with torch.nanquantile, as the authors' dp_actor.py."""
    counted = batch.mask.bool()
    masked = batch.entropy.masked_fill(~counted, float("nan"))
    if per_response:
        tau = torch.nanquantile(masked, q, dim=-1, keepdim=True)
    else:
        tau = torch.nanquantile(masked.reshape(-1), q)
    return (masked <= tau) & counted, (masked > tau) & counted


# --- hand-computed values -------------------------------------------------------------------------


def test_hand_computed_surrogate_value_gradient_and_metrics():
    batch, logprobs = hand_batch()
    obj = build_objective("archer", q=0.5, eps_knowledge=0.2, eps_reasoning=0.5, dual_clip=3.0,
                          kl_knowledge=0.0, kl_reasoning=0.0)
    loss, grad, m = loss_and_grad(obj, batch)
    # row 0 (A = +1): k r=1.3 -> clip 1.2 -> -1.2 | r r=1.3 (range [0.5, 1.5]) -> -1.3
    #                 k r=0.7 -> max(-0.7, -0.8) = -0.7 | r r=1.6 -> clip 1.5 -> -1.5
    # row 1 (A = -2): k r=0.7 -> max(1.4, 1.6) = 1.6 | k r=4.0 -> max(8, 2.4) = 8, dual 3*2 -> 6
    #                 r r=0.4 -> max(0.8, 1.0) = 1.0 | padding
    # token mean = (-1.2 - 1.3 - 0.7 - 1.5 + 1.6 + 6 + 1.0) / 7 = 3.9 / 7
    assert loss.item() == pytest.approx(3.9 / 7, abs=1e-12)
    # d/dlogp of -A*r/7 = -A*r/7 on unclipped tokens (r0t1, r0t2); 0 on clipped / dual-clipped ones
    expected = torch.tensor([[0.0, -1.3 / 7, -0.7 / 7, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    assert m["reasoning_frac"].item() == pytest.approx(3 / 7)
    assert m["entropy_threshold"].item() == pytest.approx((0.25 + 0.5) / 2)
    assert m["clip_frac_high_knowledge"].item() == pytest.approx(1 / 4)  # r0t0
    assert m["clip_frac_low_knowledge"].item() == pytest.approx(1 / 4)  # r1t0
    assert m["clip_frac_high_reasoning"].item() == pytest.approx(1 / 3)  # r0t3
    assert m["clip_frac_low_reasoning"].item() == pytest.approx(1 / 3)  # r1t2
    assert m["clip_frac_dual"].item() == pytest.approx(1 / 7)  # r1t1
    assert "kl_knowledge" in m and "ratio_mean" in m and "ratio_max" in m
    assert m["ratio_max"].item() == pytest.approx(4.0)


def test_hand_computed_class_kl_value_and_gradient():
    batch, logprobs = hand_batch()
    base = dict(q=0.5, eps_knowledge=0.2, eps_reasoning=0.5, dual_clip=3.0)
    loss0, grad0, _ = loss_and_grad(build_objective("archer", **base, kl_knowledge=0.0, kl_reasoning=0.0), batch)
    loss, grad, m = loss_and_grad(build_objective("archer", **base, kl_knowledge=0.1, kl_reasoning=0.3), batch)
    # knowledge k3: (1 - ln2) + 0 + 0 + (1 - ln2) over 4 tokens -> (1 - ln2) / 2
    # reasoning k3: 0 + (ln2 - 1/2) + (1 - ln2) = 1/2 over 3 tokens -> 1/6   (padding d = 5 ignored)
    assert m["kl_knowledge"].item() == pytest.approx((1 - LN2) / 2, abs=1e-12)
    assert m["kl_reasoning"].item() == pytest.approx(1 / 6, abs=1e-12)
    # 0.1 * (1 - ln2) / 2 + 0.3 / 6 = 0.05 * (2 - ln2)
    assert (loss - loss0).item() == pytest.approx(0.05 * (2 - LN2), abs=1e-12)
    # d k3 / d logp = 1 - e^d: -1 at d = ln2, 0 at d = 0, 1/2 at d = -ln2
    # knowledge tokens: 0.1 / 4 * (1 - e^d); reasoning tokens: 0.3 / 3 * (1 - e^d)
    expected = torch.tensor([[-0.025, 0.0, 0.0, 0.05], [0.0, -0.025, -0.1, 0.0]], dtype=D)
    torch.testing.assert_close(grad - grad0, expected, atol=1e-12, rtol=0)


def test_hand_computed_per_response_class_kl_value_and_gradient():
    batch, logprobs = hand_batch()
    base = dict(q=0.5, eps_knowledge=0.2, eps_reasoning=0.5, dual_clip=3.0, kl_per_response=True)
    loss0, grad0, _ = loss_and_grad(build_objective("archer", **base, kl_knowledge=0.0, kl_reasoning=0.0), batch)
    loss, grad, _ = loss_and_grad(build_objective("archer", **base, kl_knowledge=0.1, kl_reasoning=0.3), batch)
    # row 0: knowledge t0 (1 - ln2), t2 (0) -> (1 - ln2) / 2; reasoning t1 (0), t3 (ln2 - 1/2) -> (ln2 - 1/2) / 2
    # row 1: knowledge t0 (0), t1 (1 - ln2) -> (1 - ln2) / 2; reasoning t2 (1 - ln2) -> 1 - ln2
    # mean over the 2 responses: KL_k = (1 - ln2) / 2, KL_r = (ln2/2 - 1/4 + 1 - ln2) / 2 = 3/8 - ln2/4
    expected_kl = 0.1 * (1 - LN2) / 2 + 0.3 * (3 / 8 - LN2 / 4)
    assert (loss - loss0).item() == pytest.approx(expected_kl, abs=1e-12)
    # grad = coef / |c_i| / N * (1 - e^d): row 0 knowledge 0.1/2/2, reasoning 0.3/2/2;
    # row 1 knowledge 0.1/2/2, reasoning 0.3/1/2 -> t3 of row 0: 0.075 * 1/2, t2 of row 1: 0.15 * -1
    expected = torch.tensor([[-0.025, 0.0, 0.0, 0.0375], [0.0, -0.025, -0.15, 0.0]], dtype=D)
    torch.testing.assert_close(grad - grad0, expected, atol=1e-12, rtol=0)


def released_run_loss(batch: PolicyBatch, q: float, eps_k: float, eps_r: float, c: float, kl_k: float,
                      kl_r: float) -> torch.Tensor:
    """ArcherCodeR's actor, independently: micro-batches of one response, loss_agg_mode=token-mean.

    ArcherCodeR verl/workers/actor/dp_actor.py @ 8a1785be: per micro-batch, pg_loss and each class's
    KL (low_var_kl) are verl's masked_mean over that response (lines 403-446), and the micro-batch
    loss is divided by gradient_accumulation = the number of responses (lines 359, 462).
    """
    knowledge, reasoning = class_masks(batch, q)
    mask = batch.mask.bool()
    n = int(mask.any(-1).sum())
    total = batch.logprobs.new_zeros(())
    for i in range(batch.logprobs.shape[0]):
        m = mask[i]
        if not m.any():
            continue
        rho = torch.exp(batch.logprobs[i] - batch.old_logprobs[i])
        a = batch.advantages[i]
        eps = torch.where(reasoning[i], torch.tensor(eps_r, dtype=D), torch.tensor(eps_k, dtype=D))
        pg = torch.maximum(-a * rho, -a * torch.clamp(rho, 1 - eps, 1 + eps))
        pg = torch.where(a < 0, torch.minimum(pg, -c * a), pg)
        d = (batch.ref_logprobs[i] - batch.logprobs[i]).clamp(-20, 20)
        kld = (torch.exp(d) - d - 1).clamp(-10, 10)

        def mmean(v, sel):
            return (v * sel).sum() / (sel.sum() + 1e-8)

        loss_i = mmean(pg, m.to(D)) + kl_k * mmean(kld, knowledge[i].to(D)) + kl_r * mmean(kld, reasoning[i].to(D))
        total = total + loss_i / n
    return total


@pytest.mark.parametrize("kl_r", [0.0, 0.05])
def test_kl_per_response_with_seq_mean_reproduces_the_released_run(kl_r):
    batch = random_batch(21, B=5, T=7)
    obj = build_objective("archer", q=0.8, kl_knowledge=0.001 * 50, kl_reasoning=kl_r, dual_clip=10.0,
                          agg="seq_mean_token_mean", kl_per_response=True)
    loss, grad, _ = loss_and_grad(obj, batch)
    batch.logprobs.grad = None
    ref = released_run_loss(batch, 0.8, 0.2, 0.5, 10.0, 0.05, kl_r)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(grad, batch.logprobs.grad, rtol=1e-7, atol=1e-7)
    # the step-token KL mean (the default) is a different quantity on ragged responses
    other, _, _ = loss_and_grad(build_objective("archer", q=0.8, kl_knowledge=0.05, kl_reasoning=kl_r,
                                                agg="seq_mean_token_mean"), batch)
    assert not torch.allclose(other, loss)


@pytest.mark.parametrize("split", [[1, 4], [2, 2, 1], [1, 1, 1, 1, 1]])
def test_kl_per_response_is_invariant_to_micro_batching(split):
    batch = random_batch(22, B=5, T=7)
    obj = build_objective("archer", kl_knowledge=0.2, kl_reasoning=0.1, agg="seq_mean_token_mean",
                          kl_per_response=True)
    full, full_grad, _ = loss_and_grad(obj, batch)
    batch.num_sequences = batch.mask.bool().any(-1).sum()  # the trainer's global count
    batch.logprobs.grad = None
    stats = obj.step_statistics(batch, Reducer())
    total, start = 0.0, 0
    for size in split:
        idx = torch.arange(start, start + size)
        micro = PolicyBatch(**{k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() == 2 else v)
                               for k, v in vars(batch).items()})
        micro.step_stats = rows_of(stats, idx, 5)
        total = total + obj(micro).loss
        start += size
    total.backward()
    torch.testing.assert_close(total.detach(), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch.logprobs.grad, full_grad, rtol=1e-12, atol=1e-12)


def test_masked_row_quantile_hand_values_and_nanquantile():
    v = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.5, 0.5, 0.9, 7.0], [1.0, 2.0, 3.0, 4.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    tau, has = masked_row_quantile(v, m, 0.5)
    torch.testing.assert_close(tau, torch.tensor([0.25, 0.5, 0.0], dtype=D))
    assert has.tolist() == [True, True, False]
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        for q in (0.0, 0.3, 0.8, 1.0):
            v = torch.rand(20, 13, generator=g, dtype=dtype)
            m = torch.rand(20, 13, generator=g) < 0.5
            m[0] = False
            ref = torch.nanquantile(v.masked_fill(~m, float("nan")), q, dim=-1)
            tau, has = masked_row_quantile(v, m, q)
            assert torch.equal(tau[has], ref[has])  # bit-exact to the authors' call
            assert tau[0].item() == 0.0 and not has[0]


# --- reductions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                 "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_equal_eps_and_no_kl_equals_ratio_clip_exactly(agg, dual_clip):
    for seed in range(3):
        batch = random_batch(seed)
        archer = build_objective("archer", eps_knowledge=0.25, eps_reasoning=0.25, kl_knowledge=0.0,
                                 kl_reasoning=0.0, dual_clip=dual_clip, agg=agg)
        clip = build_objective("ratio_clip", eps_low=0.25, eps_high=0.25, dual_clip=dual_clip, agg=agg)
        la, ga, _ = loss_and_grad(archer, batch)
        lc, gc, _ = loss_and_grad(clip, batch)
        assert torch.equal(la, lc)
        assert torch.equal(ga, gc)


@pytest.mark.parametrize("threshold", ["response", "batch"])
def test_equal_eps_and_equal_kl_weights_is_ratio_clip_plus_class_means(threshold):
    w, q = 0.07, 0.6
    for seed in range(3):
        batch = random_batch(seed)
        archer = build_objective("archer", q=q, eps_knowledge=0.2, eps_reasoning=0.2, kl_knowledge=w,
                                 kl_reasoning=w, dual_clip=4.0, threshold=threshold)
        clip = build_objective("ratio_clip", eps_low=0.2, eps_high=0.2, dual_clip=4.0, kl_coef=0.0)
        la, ga, m = loss_and_grad(archer, batch)
        lc, gc, _ = loss_and_grad(clip, batch)
        # the KL term is w * (mean over knowledge + mean over reasoning), NOT w * (global token mean)
        knowledge, reasoning = class_masks(batch, q, per_response=threshold == "response")
        lp = batch.logprobs.detach().clone().requires_grad_(True)
        k3 = kl_estimate(lp, batch.ref_logprobs, "k3")
        term = w * (k3[knowledge].mean() + k3[reasoning].mean())
        term.backward()
        assert knowledge.any() and reasoning.any()
        torch.testing.assert_close(la, lc + term.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gc + lp.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m["kl_knowledge"], k3[knowledge].mean().detach())
        global_mean = (k3 * batch.mask).sum() / batch.mask.sum()
        assert not torch.allclose(term, w * global_mean)  # the class-weighted sum is not a token mean


def test_q_one_puts_every_token_in_knowledge_and_matches_ratio_clip_with_kl():
    w = 0.05
    batch = random_batch(1)
    archer = build_objective("archer", q=1.0, eps_knowledge=0.2, eps_reasoning=0.9, kl_knowledge=w,
                             kl_reasoning=0.7)
    knowledge, reasoning, tau, _ = archer.token_classes(batch)
    assert torch.equal(knowledge, batch.mask.bool()) and not reasoning.any()
    la, ga, m = loss_and_grad(archer, batch)
    assert m["reasoning_frac"].item() == 0.0 and m["kl_reasoning"].item() == 0.0
    # all tokens knowledge: eps_reasoning and kl_reasoning never act; class mean = global token mean
    clip = build_objective("ratio_clip", eps_low=0.2, eps_high=0.2, dual_clip=10.0, kl_coef=w)
    lc, gc, _ = loss_and_grad(clip, batch)
    torch.testing.assert_close(la, lc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gc, rtol=1e-12, atol=1e-12)


def test_q_zero_keeps_only_the_minimum_as_knowledge():
    batch = random_batch(2)
    knowledge, reasoning, _, _ = build_objective("archer", q=0.0).token_classes(batch)
    assert torch.equal(knowledge.sum(-1), torch.ones(batch.mask.shape[0], dtype=torch.long))
    assert torch.equal(knowledge | reasoning, batch.mask.bool())


def test_batch_threshold_uses_one_quantile_over_counted_tokens():
    batch = random_batch(4)
    obj = build_objective("archer", q=0.7, threshold="batch")
    knowledge, reasoning, tau, _ = obj.token_classes(batch)
    ref_k, ref_r = class_masks(batch, 0.7, per_response=False)
    assert torch.equal(knowledge, ref_k) and torch.equal(reasoning, ref_r)
    assert torch.all(tau == tau[0])
    obj = build_objective("archer", q=0.7)
    knowledge, reasoning, _, _ = obj.token_classes(batch)
    ref_k, ref_r = class_masks(batch, 0.7, per_response=True)
    assert torch.equal(knowledge, ref_k) and torch.equal(reasoning, ref_r)


def test_shared_kl_coef_adds_on_top():
    batch = random_batch(5)
    a0 = build_objective("archer", kl_knowledge=0.01, kl_reasoning=0.02)
    a1 = build_objective("archer", kl_knowledge=0.01, kl_reasoning=0.02, kl_coef=0.5, kl_estimator="k2")
    l0, _, _ = loss_and_grad(a0, batch)
    l1, _, m = loss_and_grad(a1, batch)
    shared = 0.5 * aggregate(kl_estimate(batch.logprobs, batch.ref_logprobs, "k2"), batch.mask)
    # a1's class terms use k2 too (kl_estimator is shared): compare only the shared term's size
    a2 = build_objective("archer", kl_knowledge=0.01, kl_reasoning=0.02, kl_estimator="k2")
    l2, _, _ = loss_and_grad(a2, batch)
    torch.testing.assert_close(l1 - l2, shared.detach(), rtol=1e-12, atol=1e-12)
    assert "kl_ref" in m and "kl_knowledge" in m
    assert not torch.equal(l0, l2)


def test_kl_clamp_matches_verl_low_var_kl():
    batch, logprobs = hand_batch()
    batch.ref_logprobs = (logprobs + 4.0).detach()  # k3(4) = e^4 - 5 ~ 49.6 > 10
    clamped = build_objective("archer", q=0.5, kl_knowledge=1.0, kl_reasoning=1.0)
    free = build_objective("archer", q=0.5, kl_knowledge=1.0, kl_reasoning=1.0, kl_clamp=None)
    _, _, mc = loss_and_grad(clamped, batch)
    _, _, mf = loss_and_grad(free, batch)
    assert mc["kl_knowledge"].item() == pytest.approx(10.0)
    assert mf["kl_knowledge"].item() == pytest.approx(math.exp(4.0) - 5.0)


def test_micro_batches_keep_the_kl_scale():
    one = random_batch(6, B=3)
    two = PolicyBatch(**{k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v)
                         for k, v in vars(one).items()})
    two.logprobs = torch.cat([one.logprobs.detach()] * 2).requires_grad_(True)
    for threshold in ("response", "batch"):
        obj = build_objective("archer", kl_knowledge=0.3, kl_reasoning=0.2, threshold=threshold)
        full = obj(two).loss
        # a micro-batch sees the step's statistics (class counts, batch quantile), sliced to its rows
        stats = obj.step_statistics(two, Reducer())
        one.num_tokens = two.mask.sum()
        one.step_stats = rows_of(stats, torch.arange(3), 6)
        half = obj(one).loss  # each identical half carries half the step
        torch.testing.assert_close(2 * half, full, rtol=1e-12, atol=1e-12)
        # without the step's statistics a half computes its own, so its KL means are not halved
        one.step_stats = None
        assert not torch.allclose(2 * obj(one).loss, full)


# --- edge cases -----------------------------------------------------------------------------------


def assert_finite(loss: torch.Tensor, grad: torch.Tensor, metrics: dict) -> None:
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    for k, v in metrics.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), k


@pytest.mark.parametrize("threshold", ["response", "batch"])
def test_fully_masked_rows_change_nothing(threshold):
    batch = random_batch(7)
    obj = build_objective("archer", threshold=threshold, kl_knowledge=0.1, kl_reasoning=0.1)
    padded = PolicyBatch(**vars(batch))
    padded.mask = batch.mask.clone()
    padded.mask[2] = 0
    kept = torch.tensor([0, 1, 3, 4, 5])
    sub = PolicyBatch(logprobs=batch.logprobs.detach()[kept].requires_grad_(True),
                      old_logprobs=batch.old_logprobs[kept], advantages=batch.advantages[kept],
                      mask=batch.mask[kept], ref_logprobs=batch.ref_logprobs[kept], entropy=batch.entropy[kept])
    lp, gp, mp = loss_and_grad(obj, padded)
    ls, gs, _ = loss_and_grad(obj, sub)
    assert_finite(lp, gp, mp)
    torch.testing.assert_close(lp, ls, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gp[kept], gs, rtol=1e-12, atol=1e-12)
    assert torch.all(gp[2] == 0)


def test_all_masked_batch_is_zero_without_nan():
    batch = random_batch(8)
    batch.mask = torch.zeros_like(batch.mask)
    loss, grad, m = loss_and_grad(build_objective("archer", kl_knowledge=0.1, kl_reasoning=0.1), batch)
    assert_finite(loss, grad, m)
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_single_token_responses_are_knowledge():
    batch = random_batch(9, T=5)
    batch.mask = torch.zeros_like(batch.mask)
    batch.mask[:, 0] = 1
    obj = build_objective("archer", kl_knowledge=0.1, kl_reasoning=0.1)
    knowledge, reasoning, tau, _ = obj.token_classes(batch)
    assert torch.equal(knowledge, batch.mask.bool()) and not reasoning.any()
    torch.testing.assert_close(tau, batch.entropy[:, 0])
    assert_finite(*loss_and_grad(obj, batch))


def test_tied_entropies_are_all_knowledge():
    batch = random_batch(10)
    batch.entropy = torch.full_like(batch.entropy, 0.37)
    obj = build_objective("archer", q=0.5, kl_knowledge=0.1, kl_reasoning=0.2)
    knowledge, reasoning, _, _ = obj.token_classes(batch)
    assert torch.equal(knowledge, batch.mask.bool()) and not reasoning.any()
    loss, grad, m = loss_and_grad(obj, batch)
    assert_finite(loss, grad, m)
    assert m["reasoning_frac"].item() == 0.0


def test_zero_advantages_leave_only_the_kl():
    batch = random_batch(11)
    batch.advantages = torch.zeros_like(batch.advantages)
    loss, grad, m = loss_and_grad(build_objective("archer", kl_knowledge=0.0, kl_reasoning=0.0), batch)
    assert_finite(loss, grad, m)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    loss, grad, m = loss_and_grad(build_objective("archer"), batch)
    assert_finite(loss, grad, m)
    assert loss.item() > 0 and grad.abs().sum() > 0  # the default kl_knowledge = 0.001 still acts


def test_float32_batch():
    batch = random_batch(12, dtype=torch.float32)
    loss, grad, m = loss_and_grad(build_objective("archer"), batch)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_finite(loss, grad, m)


def test_entropy_is_detached():
    batch = random_batch(13)
    batch.entropy = batch.entropy.clone().requires_grad_(True)
    build_objective("archer").__call__(batch).loss.backward()
    assert batch.entropy.grad is None


# --- settings -------------------------------------------------------------------------------------


def test_defaults_and_needs():
    obj = build_objective("archer")
    assert isinstance(obj, Archer)
    assert (obj.q, obj.eps_knowledge, obj.eps_reasoning, obj.kl_knowledge, obj.kl_reasoning, obj.dual_clip,
            obj.threshold) == (0.8, 0.2, 0.5, 0.001, 0.0, 10.0, "response")
    assert obj.needs == {"entropy", "ref"}
    assert build_objective("archer", kl_knowledge=0).needs == {"entropy"}
    assert build_objective("archer", kl_knowledge=0, kl_reasoning=0.1).needs == {"entropy", "ref"}
    assert build_objective("archer", kl_knowledge=0, kl_coef=0.1).needs == {"entropy", "ref"}
    assert Archer.needs == {"entropy"}  # the instance never mutates the class


def test_missing_inputs_raise():
    batch = random_batch(14, ref=False)
    with pytest.raises(ValueError, match="ref_logprobs"):
        build_objective("archer")(batch)
    build_objective("archer", kl_knowledge=0)(batch)  # fine without a reference
    batch.entropy = None
    with pytest.raises(ValueError, match="entropy"):
        build_objective("archer", kl_knowledge=0)(batch)


@pytest.mark.parametrize("settings", [
    {"bogus": 1},
    {"q": -0.1},
    {"q": 1.5},
    {"q": float("nan")},
    {"eps_knowledge": -0.1},
    {"eps_reasoning": -0.5},
    {"kl_knowledge": -1.0},
    {"kl_reasoning": -1e-3},
    {"threshold": "global"},
    {"dual_clip": 1.0},
    {"kl_clamp": 0.0},
    {"q": "high"},
])
def test_invalid_settings_raise_config_error(settings):
    with pytest.raises(ConfigError):
        build_objective("archer", **settings)


def test_int_settings_are_coerced():
    obj = build_objective("archer", q=1, eps_reasoning=1, dual_clip=None)
    assert obj.q == 1.0 and obj.dual_clip is None
