"""TROLL (arXiv 2510.03817): projection feasibility/identity/optimality, gradients, sparse vs dense, policy supports.

Sparse vs dense at V = 1000 with the paper's top_k = 64 and tail_mass = 1e-5,
on peaked (LLM-like) distributions (128 tokens, about 20-35% projected),
measured over seeds 17-20: loss relative error 1.3e-5 to 5.6e-5, gradient
(w.r.t. the logits) relative error 2.4e-4 to 3.4e-4; asserted for seed 17
with margins (2e-4 and 2e-3). Broad distributions whose top-64 misses
percent-level mass are not approximated that well (docs/objectives/troll.md).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.troll import categorical_kl, interpolate, trust_region_projection, with_tail
from rlclip.policy import SupportSpec, completion_logprobs
from rlclip.policy.support import _chunked_record, _chunked_support, _old_on_support, _top_set, _union_support

D = torch.float64
INF = float("inf")


# ----------------------------------------------------------------------------- helpers
def peaked_logits(n: int, vocab: int, seed: int, sigmas=(8.0, 12.0, 16.0)) -> tuple[torch.Tensor, ...]:
    """Old logits with LLM-like peaked softmaxes, a sampled token per row, and perturbed new logits."""
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor(sigmas, dtype=D)[torch.randint(0, len(sigmas), (n,), generator=g)]
    old = torch.randn(n, vocab, generator=g, dtype=D) * sigma[:, None]
    tokens = torch.multinomial(torch.softmax(old, -1), 1, generator=g).squeeze(-1)
    new = old + 0.5 * torch.randn(n, vocab, generator=g, dtype=D)
    new[torch.arange(n), tokens] += 0.5 * torch.randn(n, generator=g, dtype=D)
    return old, tokens, new, torch.randn(n, generator=g, dtype=D)


def build_support(new_logits: torch.Tensor, old_logits: torch.Tensor, tokens: torch.Tensor, spec: SupportSpec):
    """The policy's support rule on [N, V] logits (float64): indices, mask, log pi_old on it."""
    lp_old, lq = torch.log_softmax(old_logits, -1), torch.log_softmax(new_logits.detach(), -1)
    o_idx, o_val, o_mask = _top_set(lp_old, spec)
    old = {"indices": o_idx, "logprobs": o_val.masked_fill(~o_mask, -INF), "mask": o_mask,
           "token_logprobs": lp_old.gather(1, tokens[:, None]).squeeze(1)}
    n_idx, _, n_mask = _top_set(lq, spec)
    idx, mask, origin = _union_support(tokens, o_idx, o_mask, n_idx, n_mask)
    return idx, mask, _old_on_support(origin, mask, tokens, old, old_logits.shape[-1])


def sparse_batch(new_logits, idx, mask, old_sup, adv) -> PolicyBatch:
    """One row of N tokens; support_logprobs = full log-softmax of ``new_logits`` gathered (grad)."""
    sup = torch.log_softmax(new_logits, -1).gather(1, idx).masked_fill(~mask, -INF)
    n = idx.shape[0]
    return PolicyBatch(logprobs=sup[:, 0][None], old_logprobs=old_sup[:, 0][None], advantages=adv[None],
                       mask=torch.ones(1, n, dtype=sup.dtype), support_logprobs=sup[None],
                       old_support_logprobs=old_sup[None], support_mask=mask[None])


PAPER_SPEC = SupportSpec()


def troll_loss(new_logits, old_logits, tokens, adv, spec=PAPER_SPEC, **settings):
    idx, mask, old_sup = build_support(new_logits, old_logits, tokens, spec)
    out = build_objective("troll", top_k=spec.top_k, tail_mass=spec.tail_mass, **settings)(
        sparse_batch(new_logits, idx, mask, old_sup, adv))
    return out.loss, out.metrics


def dense_loss(new_logits, old_logits, tokens, adv, bound=0.05, reg_coef=1.0, eta_grad="implicit"):
    """The same objective on the full vocabulary (no sparse support, no tail bucket)."""
    lq, lp = torch.log_softmax(new_logits, -1), torch.log_softmax(old_logits, -1)
    log_pt, _, _, projected = trust_region_projection(lq, lp, bound, eta_grad)
    ratio = torch.exp(log_pt.gather(1, tokens[:, None]) - lp.gather(1, tokens[:, None])).squeeze(1)
    return (-adv * ratio + reg_coef * categorical_kl(lq, log_pt.detach())).mean(), projected


def scipy_dense_loss(new_logits, old_logits, tokens, adv, bound=0.05, reg_coef=1.0) -> float:
    """Independent value: eta per token by scipy's brentq on KL(pi_eta || p) = bound, in numpy."""
    import numpy as np
    from scipy.optimize import brentq

    total = 0.0
    for z_new, z_old, a, adv_i in zip(new_logits.detach().numpy(), old_logits.numpy(), tokens.tolist(),
                                      adv.tolist()):
        lq, lp = z_new - np.logaddexp.reduce(z_new), z_old - np.logaddexp.reduce(z_old)

        def proj(eta, lq=lq, lp=lp):
            z = (lq + eta * lp) / (1 + eta)
            return z - np.logaddexp.reduce(z)

        def kl(la, lb):
            return float(np.sum(np.exp(la) * (la - lb)))

        lpt = lq
        if kl(lq, lp) > bound:
            log_eta = brentq(lambda x, lp=lp: kl(proj(math.exp(x)), lp) - bound, -40, 40, xtol=1e-14, rtol=1e-15)
            lpt = proj(math.exp(log_eta))
        total += -adv_i * math.exp(lpt[a] - lp[a]) + reg_coef * kl(lq, lpt)
    return total / len(tokens)


# ----------------------------------------------------------------------------- settings
def test_settings_defaults_and_validation():
    obj = build_objective("troll")
    assert (obj.kl_bound, obj.reg_coef, obj.eta_grad) == (0.05, 1.0, "implicit")
    assert obj.support_spec == SupportSpec(top_k=64, tail_mass=1e-5)
    assert obj.needs == frozenset({"support"})
    for bad in [{"kl_bound": 0}, {"kl_bound": -1.0}, {"kl_bound": float("inf")}, {"top_k": 0},
                {"tail_mass": 1.0}, {"tail_mass": -0.1}, {"reg_coef": -1.0}, {"eta_grad": "none"},
                {"top_k": 2.5}, {"clip": 0.2}]:
        with pytest.raises(ConfigError):
            build_objective("troll", **bad)


def test_missing_support_is_a_clear_error():
    x = torch.zeros(1, 2)
    batch = PolicyBatch(logprobs=x, old_logprobs=x, advantages=x, mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="support_logprobs"):
        build_objective("troll")(batch)


# ----------------------------------------------------------------------------- projection
def random_pairs(n: int, vocab: int, seed: int, scale: float = 2.0, shift: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, vocab, generator=g, dtype=D) * scale
    new = old + shift * torch.randn(n, vocab, generator=g, dtype=D)
    return torch.log_softmax(new, -1), torch.log_softmax(old, -1)


@pytest.mark.parametrize("bound", [0.05, 0.005, 0.5])
def test_projection_is_feasible_on_every_projected_token(bound):
    log_q, log_p = random_pairs(500, 30, seed=1, shift=2.5)
    log_pt, eta, kl0, projected = trust_region_projection(log_q, log_p, bound)
    assert projected.float().mean() > 0.5
    kl_after = categorical_kl(log_pt, log_p)
    assert (kl_after[projected] <= bound * (1 + 1e-4)).all()
    assert (kl_after[projected] >= bound * (1 - 1e-4)).all()  # active constraint: on the boundary
    assert (eta[projected] > 0).all() and (eta[~projected] == 0).all()
    torch.testing.assert_close(log_pt.exp().sum(-1), torch.ones(500, dtype=D))


def test_objective_reports_feasible_projection_in_float32_and_float64():
    old, tokens, new, adv = peaked_logits(64, 200, seed=3)
    new = old + 3.0 * (new - old)  # far enough for most tokens to be projected
    idx, mask, old_sup = build_support(new, old, tokens, SupportSpec())
    losses = {}
    for dtype in (torch.float32, torch.float64):
        batch = sparse_batch(new.to(dtype), idx, mask, old_sup.to(dtype), adv.to(dtype))
        out = build_objective("troll")(batch)
        assert out.loss.dtype == dtype and torch.isfinite(out.loss)
        assert out.metrics["projected_frac"] > 0.3
        assert out.metrics["kl_after_max"] <= 0.05 * (1 + 1e-4)
        assert out.metrics["kl_before"] > out.metrics["kl_after"]
        losses[dtype] = out.loss.item()
    assert losses[torch.float32] == pytest.approx(losses[torch.float64], rel=1e-4)


def test_identity_inside_the_bound():
    old, tokens, _, adv = peaked_logits(40, 50, seed=4)
    new = (old + 0.01 * torch.randn(40, 50, generator=torch.Generator().manual_seed(5), dtype=D)).requires_grad_()
    idx, mask, old_sup = build_support(new, old, tokens, SupportSpec())
    out = build_objective("troll")(sparse_batch(new, idx, mask, old_sup, adv))
    assert out.metrics["projected_frac"] == 0 and out.metrics["eta_mean"] == 0
    assert out.metrics["kl_after"] == out.metrics["kl_before"] > 0
    grad = torch.autograd.grad(out.loss, new)[0]
    # pi~ = q: the plain importance-weighted policy gradient, and the regression term is 0 with 0 gradient
    lq, lp = torch.log_softmax(new, -1), torch.log_softmax(old, -1)
    plain = (-adv * torch.exp(lq.gather(1, tokens[:, None]) - lp.gather(1, tokens[:, None])).squeeze(1)).mean()
    assert out.loss.item() == pytest.approx(plain.item(), rel=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(plain, new)[0], atol=1e-12, rtol=1e-9)


def test_projection_minimises_reverse_kl_to_the_new_policy_on_small_vocabularies():
    """pi~ = argmin KL(pi || q) s.t. KL(pi || p) <= bound, checked against scipy SLSQP and random search."""
    import numpy as np
    from scipy.optimize import minimize

    bound = 0.05
    log_q, log_p = random_pairs(12, 6, seed=7, shift=2.5)
    log_pt, _, kl0, projected = trust_region_projection(log_q, log_p, bound)
    assert projected.all()
    g = np.random.default_rng(0)
    for lq, lp, lpt in zip(log_q.numpy(), log_p.numpy(), log_pt.numpy()):
        def kl(x, lb):
            x = np.clip(x, 1e-300, None)
            return float(np.sum(x * (np.log(x) - lb)))

        def softmax(y):
            return np.exp(y - np.logaddexp.reduce(y))

        ours = kl(np.exp(lpt), lq)
        res = minimize(lambda y, lq=lq: kl(softmax(y), lq), lp.copy(), method="SLSQP",  # over logits y
                       constraints=[{"type": "ineq", "fun": lambda y, lp=lp: bound - kl(softmax(y), lp)}],
                       options={"ftol": 1e-13, "maxiter": 1000})
        assert res.success and kl(softmax(res.x), lp) <= bound * (1 + 1e-6)
        assert ours <= res.fun + 1e-8  # nothing scipy finds is closer to pi_theta
        np.testing.assert_allclose(np.exp(lpt), softmax(res.x), atol=1e-5)  # the unique minimiser
        # dense random search around pi~: every feasible point is further from q
        cand = np.exp(lpt + 0.3 * g.standard_normal((20000, len(lq))))
        cand /= cand.sum(1, keepdims=True)
        kl_p = np.sum(cand * (np.log(cand) - lp), 1)
        kl_q = np.sum(cand * (np.log(cand) - lq), 1)
        assert (kl_p <= bound).sum() > 100
        assert kl_q[kl_p <= bound].min() >= ours - 1e-12
    # the other direction (argmin KL(q || pi)) is a different distribution: the test can tell them apart
    eta = torch.ones(12, dtype=D)
    assert not torch.allclose(interpolate(log_q, log_p, eta), log_pt, atol=1e-3)


# ----------------------------------------------------------------------------- gradients
def gradcheck_setup(seed=12):
    g = torch.Generator().manual_seed(seed)
    n, vocab = 12, 8
    old = torch.randn(n, vocab, generator=g, dtype=D) * 2
    tokens = torch.multinomial(torch.softmax(old, -1), 1, generator=g).squeeze(-1)
    new = old + 0.6 * torch.randn(n, vocab, generator=g, dtype=D)  # 2/3 projected, |KL - bound| > 0.01
    adv = torch.randn(n, generator=g, dtype=D)
    spec = SupportSpec(top_k=3, tail_mass=1e-5)  # a real tail bucket: 3-6 of 8 tokens in the support
    idx, mask, old_sup = build_support(new, old, tokens, spec)
    return new, adv, idx, mask, old_sup


def objective_loss(new, adv, idx, mask, old_sup, **settings):
    return build_objective("troll", top_k=3, **settings)(sparse_batch(new, idx, mask, old_sup, adv))


def test_implicit_eta_gradient_matches_finite_differences():
    new, adv, idx, mask, old_sup = gradcheck_setup()
    out = objective_loss(new, adv, idx, mask, old_sup, reg_coef=0.0)
    assert 0.3 < out.metrics["projected_frac"] < 1 and out.metrics["support_size"] < 8
    x = new.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: objective_loss(z, adv, idx, mask, old_sup, reg_coef=0.0).loss,
                                    (x,), eps=1e-6, atol=1e-8, rtol=1e-5)


def fixed_eta_terms(new, adv, idx, mask, old_sup, eta, projected, target):
    """Policy-gradient term with eta held constant, and KL(q || target) with target constant."""
    lq = with_tail(torch.log_softmax(new, -1).gather(1, idx).masked_fill(~mask, -INF), mask)
    lp = with_tail(old_sup, mask)
    log_pt = torch.where(projected[:, None], interpolate(lq, lp, eta), lq)
    pg = (-adv * torch.exp(log_pt[:, 0] - lp[:, 0])).mean()
    return pg, categorical_kl(lq, target).mean()


@pytest.mark.parametrize("eta_grad", ["implicit", "stop"])
def test_gradients_against_finite_differences_for_both_eta_modes(eta_grad):
    new, adv, idx, mask, old_sup = gradcheck_setup()
    lq = with_tail(torch.log_softmax(new, -1).gather(1, idx).masked_fill(~mask, -INF), mask)
    log_pt, eta, _, projected = trust_region_projection(lq, with_tail(old_sup, mask), 0.05)
    x = new.clone().requires_grad_()
    # the pieces the objective's gradient is made of, each checked against finite differences
    assert torch.autograd.gradcheck(
        lambda z: fixed_eta_terms(z, adv, idx, mask, old_sup, eta, projected, log_pt)[0], (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(
        lambda z: fixed_eta_terms(z, adv, idx, mask, old_sup, eta, projected, log_pt)[1], (x,), eps=1e-6, atol=1e-8)
    out = objective_loss(x, adv, idx, mask, old_sup, reg_coef=0.7, eta_grad=eta_grad)
    grad = torch.autograd.grad(out.loss, x)[0]
    pg_fixed, reg = fixed_eta_terms(x, adv, idx, mask, old_sup, eta, projected, log_pt)
    reg_grad = torch.autograd.grad(reg, x, retain_graph=True)[0]
    if eta_grad == "stop":  # eta constant: exactly the fixed-eta gradient
        pg_grad = torch.autograd.grad(pg_fixed, x)[0]
    else:  # implicit: the gradient of the policy-gradient term with eta re-solved (gradcheck-ed above)
        pg_grad = torch.autograd.grad(objective_loss(x, adv, idx, mask, old_sup, reg_coef=0.0).loss, x)[0]
    expected = pg_grad + 0.7 * reg_grad
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-8)
    # the two modes really differ on projected tokens
    other = objective_loss(x, adv, idx, mask, old_sup, reg_coef=0.7,
                           eta_grad="stop" if eta_grad == "implicit" else "implicit")
    assert not torch.allclose(torch.autograd.grad(other.loss, x)[0], grad, atol=1e-6)


# ----------------------------------------------------------------------------- sparse vs dense
def test_sparse_equals_dense_when_the_support_covers_the_vocabulary():
    g = torch.Generator().manual_seed(13)
    n, vocab = 30, 12
    old = torch.randn(n, vocab, generator=g, dtype=D) * 2
    tokens = torch.multinomial(torch.softmax(old, -1), 1, generator=g).squeeze(-1)
    new = (old + 1.2 * torch.randn(n, vocab, generator=g, dtype=D)).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=D)
    spec = SupportSpec(top_k=16, tail_mass=0.0)
    idx, mask, _ = build_support(new, old, tokens, spec)
    assert (mask.sum(-1) == vocab).all()
    loss, m = troll_loss(new, old, tokens, adv, spec)
    assert 0.2 < m["projected_frac"] < 1
    assert loss.item() == pytest.approx(scipy_dense_loss(new, old, tokens, adv), abs=1e-10)
    for eta_grad in ("implicit", "stop"):
        loss, _ = troll_loss(new, old, tokens, adv, spec, eta_grad=eta_grad)
        ref, _ = dense_loss(new, old, tokens, adv, eta_grad=eta_grad)
        torch.testing.assert_close(torch.autograd.grad(loss, new)[0], torch.autograd.grad(ref, new)[0],
                                   atol=1e-10, rtol=1e-8)


def test_sparse_close_to_dense_at_vocabulary_1000_with_paper_defaults():
    old, tokens, new, adv = peaked_logits(128, 1000, seed=17)
    new.requires_grad_()
    loss, m = troll_loss(new, old, tokens, adv)
    ref, projected = dense_loss(new, old, tokens, adv)
    assert 0.1 < projected.double().mean() < 0.9
    assert m["projected_frac"] == pytest.approx(projected.double().mean().item(), abs=0.02)
    assert m["support_size"] < 64  # peaked: the top sets reach 1 - 1e-5 well before top_k
    grad, ref_grad = torch.autograd.grad(loss, new)[0], torch.autograd.grad(ref, new)[0]
    assert abs(loss.item() - ref.item()) <= 2e-4 * abs(ref.item())
    assert (grad - ref_grad).norm() <= 2e-3 * ref_grad.norm()


# ----------------------------------------------------------------------------- policy supports
def identity_head(vocab: int) -> nn.Linear:
    head = nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head


def test_policy_support_slots_dedup_logprobs_and_tail_gradient():
    old, tokens, new, _ = peaked_logits(24, 40, seed=19, sigmas=(1.0, 3.0, 8.0))
    b, t, vocab = 4, 6, 40
    tokens = tokens.view(b, t)
    spec = SupportSpec(top_k=6, tail_mass=1e-3)
    head = identity_head(vocab)
    with torch.no_grad():
        rec = _chunked_record(old.float().view(b, t, vocab), tokens, head, 1.0, False, 5, spec)
    old_sup = rec["old_support"]
    assert old_sup["indices"].shape == (b, t, 6) and old_sup["mask"].dtype == torch.bool
    hidden = new.float().view(b, t, vocab).requires_grad_()
    out = _chunked_support(hidden, tokens, head, 1.0, False, 7, spec, old_sup)
    idx, mask = out["support_indices"], out["support_mask"]
    assert (idx[..., 0] == tokens).all() and mask[..., 0].all()
    full_new, full_old = torch.log_softmax(hidden.detach(), -1), torch.log_softmax(old.float().view(b, t, vocab), -1)
    for i in range(b):
        for j in range(t):
            used = idx[i, j][mask[i, j]].tolist()
            assert len(used) == len(set(used))  # deduplicated
            o = set(old_sup["indices"][i, j][old_sup["mask"][i, j]].tolist())
            n_idx, _, n_mask = _top_set(full_new[i, j][None], spec)
            assert set(used) == o | set(n_idx[0][n_mask[0]].tolist()) | {int(tokens[i, j])}
            for slot, tok in enumerate(used):  # log pi_old: recorded, exact for the sampled token, else spread
                if slot == 0 or tok in o:
                    assert out["old_support_logprobs"][i, j, slot] == pytest.approx(full_old[i, j, tok].item(), abs=1e-5)
                else:
                    rest = 1 - full_old[i, j, sorted(o | {int(tokens[i, j])})].exp().sum().item()
                    spread = math.log(rest / (vocab - len(o | {int(tokens[i, j])})))
                    assert out["old_support_logprobs"][i, j, slot].item() == pytest.approx(spread, abs=1e-4)
    assert not mask.all()  # padding slots exist and hold -inf
    assert (out["support_logprobs"][~mask] == -INF).all() and (out["old_support_logprobs"][~mask] == -INF).all()
    gathered = full_new.gather(-1, idx)
    torch.testing.assert_close(out["support_logprobs"][mask], gathered[mask])
    torch.testing.assert_close(out["logprobs"], full_new.gather(-1, tokens[..., None]).squeeze(-1))
    # gradient flows to the tail (tokens outside the support) through the normaliser, and matches a direct computation
    (grad,) = torch.autograd.grad(out["support_logprobs"][mask].sum(), hidden)
    outside = torch.ones_like(grad, dtype=torch.bool).scatter_(-1, idx, False)
    assert (grad[outside].abs() > 0).all()
    direct = torch.log_softmax(hidden, -1).gather(-1, idx)[mask].sum()
    torch.testing.assert_close(grad, torch.autograd.grad(direct, hidden)[0])


def test_policy_supports_do_not_depend_on_the_chunk_size_and_pad_to_top_k():
    old, tokens, new, _ = peaked_logits(12, 6, seed=23, sigmas=(1.0,))
    head, spec = identity_head(6), SupportSpec(top_k=8, tail_mass=1e-5)  # vocabulary smaller than top_k
    tokens = tokens.view(3, 4)
    with torch.no_grad():
        rec = _chunked_record(old.float().view(3, 4, 6), tokens, head, 1.0, True, 5, spec)
    assert rec["old_support"]["indices"].shape == (3, 4, 8)
    assert (rec["old_support"]["mask"].sum(-1) <= 6).all() and not rec["old_support"]["mask"][..., 6:].any()
    results = []
    for chunk in (1, 5, 100):
        hidden = new.float().view(3, 4, 6).requires_grad_()
        out = _chunked_support(hidden, tokens, head, 1.0, True, chunk, spec, rec["old_support"])
        (grad,) = torch.autograd.grad((out["support_logprobs"].clamp_min(-50) * torch.arange(6.0)).sum(), hidden)
        results.append((out, grad))
    for out, grad in results[1:]:
        for key in ("support_logprobs", "old_support_logprobs", "support_mask", "support_indices", "entropy"):
            torch.testing.assert_close(out[key], results[0][0][key])
        torch.testing.assert_close(grad, results[0][1])
    assert (results[0][0]["support_mask"].sum(-1) == 6).all()  # every token of the small vocabulary


def test_completion_logprobs_record_and_update_passes_on_the_tiny_model():
    from transformers import AutoModelForCausalLM

    from rlclip.modeling import resolve_tiny

    model = AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny"))
    g = torch.Generator().manual_seed(0)
    pid, cid = torch.randint(3, 90, (3, 5), generator=g), torch.randint(3, 90, (3, 4), generator=g)
    pm, cm = torch.ones(3, 5, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    pm[0, :2], cm[1, 2:] = 0, 0
    spec = SupportSpec(top_k=8, tail_mass=1e-5)
    with torch.no_grad():
        rec = completion_logprobs(model, pid, pm, cid, cm, temperature=0.7, record_support=spec, chunk_size=5)
    plain = completion_logprobs(model, pid, pm, cid, cm, temperature=0.7)
    out = completion_logprobs(model, pid, pm, cid, cm, temperature=0.7, support=spec,
                              old_support=rec["old_support"], chunk_size=5)
    torch.testing.assert_close(out["logprobs"], plain["logprobs"])
    torch.testing.assert_close(rec["logprobs"], plain["logprobs"].detach())
    torch.testing.assert_close(out["old_support_logprobs"][..., 0], rec["logprobs"])  # same weights: old = new
    assert out["support_logprobs"].requires_grad and not out["old_support_logprobs"].requires_grad
    used = out["support_mask"]
    torch.testing.assert_close(out["support_logprobs"][used], out["old_support_logprobs"][used])
    with pytest.raises(ValueError, match="old_support"):
        completion_logprobs(model, pid, pm, cid, cm, support=spec)


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
def test_troll_trains_the_tiny_model_with_mu2(tmp_path):
    from rlclip.config import load_config
    from rlclip.trainer import Trainer

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "recipes/smoke/tiny.yaml", ["objective.name=troll", f"output_dir={tmp_path}",
                                                         "max_steps=3", "logging.progress_bar=false",
                                                         "train.num_iterations=2"])
    hist = Trainer(cfg).train()
    assert len(hist) == 3
    keys = ["projected_frac", "eta_mean", "kl_before", "kl_after", "support_size", "ratio_mean", "regression_kl"]
    for row in hist:
        for key in keys:
            assert math.isfinite(row[f"objective/{key}"]), key
        assert row["objective/kl_after_max"] <= 0.05 * (1 + 1e-4)
        assert math.isfinite(row["loss"])
    assert hist[0]["objective/ratio_mean"] == pytest.approx(1.0)  # the first update is on-policy
    assert hist[-1]["objective/kl_before"] > 0 and hist[-1]["objective/support_size"] >= 1
