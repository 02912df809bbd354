"""Aggregations ``token_sum`` and ``prompt_mean``, KL estimators ``k3_plus`` and ``abs`` (issue #28, contract 5).

Peers, read at these commits (line numbers cited per test):

- verl: github.com/verl-project/verl 1dda039b9c6311889a9c9a26040677e1254814f9,
  verl/trainer/ppo/core_algos.py: ``agg_loss`` "token-sum" (lines 1176-1180), ``kl_penalty`` (lines
  2187-2212: the "+" suffix stripped at 2199-2200, the straight-through k2 at 2210-2212),
  ``kl_penalty_forward`` "abs" (2230-2231) and "k3" (2238-2244). At the older commit
  b178a3cd56f58b2d502255daba591e92833930a7 (github.com/volcengine/verl) "k3+" raised NotImplementedError
  (the suffix was not stripped; fixed by verl PR #6058), and there was no "token-sum".
- SkyRL: github.com/NovaSky-AI/SkyRL a9564572eb8e91076be43c1bd5e4615e3de17265,
  skyrl/backends/skyrl_train/utils/ppo_utils.py: ``reduce_loss`` (masked sum, lines 1145-1149) after
  ``apply_loss_reduction_to_advantages_minibatch`` "prompt_mean" (lines 1209-1215) scales each
  prompt's advantages by 1 / (num_prompts * tokens_in_prompt).

``prompt_mean_skyrl`` and ``kl_penalty_verl`` transcribe the peers (torch only, float64) and are the
oracles of the comparison tests; the hand-value tests spell the numbers out.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from conftest import tiny_config
from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.aggregation import AGG_MODES, aggregate, prompt_counts
from rlclip.objectives.kl import KL_ESTIMATORS, kl_estimate

D = torch.float64

# per-token losses [4, 3], their mask, and the prompt group of each row (two prompts of two completions)
VALUES = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [2.0, 2.0, 2.0]]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]
GROUPS = [0, 0, 1, 1]


def tensors():
    return torch.tensor(VALUES, dtype=D, requires_grad=True), torch.tensor(MASK, dtype=D), torch.tensor(GROUPS)


# ------------------------------------------------------------------------------------------ token_sum


def test_token_sum_hand_value_and_gradient():
    values, mask, _ = tensors()
    loss = aggregate(values, mask, "token_sum")
    assert loss.item() == pytest.approx(1 + 2 + 4 + 7 + 8 + 9 + 2)  # 33: every counted token, no denominator
    loss.backward()
    torch.testing.assert_close(values.grad, mask)  # d loss / d L_it = m_it


def test_token_sum_is_token_mean_times_the_token_count():
    """Reduction: token_sum = N x token_mean, whatever num_tokens the trainer passes (token_sum ignores it)."""
    values, mask, _ = tensors()
    n = mask.sum()
    assert aggregate(values, mask, "token_sum", num_tokens=99.0).item() == pytest.approx(
        n.item() * aggregate(values, mask, "token_mean").item())


def test_token_sum_over_processes_is_verls_dp_scaled_sum():
    """verl (line 1179): each rank's masked sum x dp_size, then DDP averages: the global sum. rlclip's trainer
    multiplies each loss by the number of processes likewise; the shares of two 'processes' add up."""
    values, mask, _ = tensors()
    world = 2
    shares = [aggregate(values[r * 2:(r + 1) * 2], mask[r * 2:(r + 1) * 2], "token_sum") * world
              for r in range(world)]
    assert (sum(shares) / world).item() == pytest.approx(aggregate(values, mask, "token_sum").item())


def test_token_sum_through_an_objective_gradient():
    """ratio_clip on-policy (rho = 1, no clip active): L_t = -A_t rho_t, so d loss / d logprobs_t = -A_t m_t."""
    adv = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=D)
    logp = torch.full((2, 3), -0.9, dtype=D, requires_grad=True)
    out = build_objective("ratio_clip", agg="token_sum")(PolicyBatch(
        logprobs=logp, old_logprobs=logp.detach().clone(), advantages=adv, mask=mask, num_tokens=1000.0))
    assert out.loss.item() == pytest.approx(-(0.5 - 1.0 + 1.5 + 0.3 - 0.7))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask)


# ---------------------------------------------------------------------------------------- prompt_mean


def prompt_mean_skyrl(per_token_loss_of_adv, advantages, mask, boundaries):
    """SkyRL's route: scale the advantages of prompt p by 1 / (num_prompts * tokens of p) (ppo_utils.py
    lines 1209-1215, ``clamp(min=1)``), then the masked sum of the per-token loss (``reduce_loss``, 1145-1149)."""
    scaled = torch.zeros_like(advantages)
    for start, end in boundaries:
        tokens = mask[start:end].sum().clamp(min=1)
        scaled[start:end] = advantages[start:end] / (len(boundaries) * tokens)
    return (per_token_loss_of_adv(scaled) * mask).sum()


def test_prompt_mean_hand_value_and_gradient():
    values, mask, groups = tensors()
    loss = aggregate(values, mask, "prompt_mean", group_ids=groups)
    # prompt 0: (1 + 2 + 4) / 3 tokens; prompt 1: (7 + 8 + 9 + 2) / 4 tokens; mean over the 2 prompts
    assert loss.item() == pytest.approx((7 / 3 + 26 / 4) / 2)  # 53/12 = 4.41667
    loss.backward()
    want = torch.tensor([[1 / 6, 1 / 6, 0], [1 / 6, 0, 0], [1 / 8, 1 / 8, 1 / 8], [1 / 8, 0, 0]], dtype=D)
    torch.testing.assert_close(values.grad, want)  # m_it / (P n_g)
    # and it is none of the other modes on this batch
    others = {m: aggregate(values.detach(), mask, m).item() for m in AGG_MODES if m != "prompt_mean"}
    assert all(abs(v - 53 / 12) > 0.1 for v in others.values()), others


def test_prompt_mean_counts():
    _, mask, groups = tensors()
    tokens, prompts = prompt_counts(mask, groups)
    assert tokens.tolist() == [3, 3, 4, 4] and prompts.item() == 2
    assert prompt_counts(mask, None)[0] is None


def test_prompt_mean_equals_skyrl_with_the_ppo_clip_surrogate():
    """SkyRL scales the advantages, rlclip aggregates the loss: equal for the PPO clip, which is positively
    homogeneous in A (random ratios on both sides of the clip range, rows of unequal lengths)."""
    g = torch.Generator().manual_seed(3)
    b, t = 6, 5
    logp = -torch.rand(b, t, generator=g, dtype=D) - 0.1
    old = logp + 0.4 * torch.randn(b, t, generator=g, dtype=D)
    adv = torch.randn(b, 1, generator=g, dtype=D).expand(b, t).contiguous()
    mask = (torch.arange(t)[None] < torch.tensor([5, 2, 4, 1, 3, 5])[:, None]).to(D)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])  # two prompts of three completions, contiguous as in SkyRL
    ratio = torch.exp(logp - old)

    def ppo(a):
        return -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)

    want = prompt_mean_skyrl(ppo, adv, mask, [(0, 3), (3, 6)])
    batch = PolicyBatch(logprobs=logp, old_logprobs=old, advantages=adv, mask=mask, group_ids=groups)
    got = build_objective("ratio_clip", agg="prompt_mean")(batch).loss
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_prompt_mean_reductions():
    """One row per prompt: seq_mean_token_mean. One prompt: token_mean."""
    values, mask, _ = tensors()
    v = values.detach()
    assert aggregate(v, mask, "prompt_mean", group_ids=torch.arange(4)).item() == pytest.approx(
        aggregate(v, mask, "seq_mean_token_mean").item())
    assert aggregate(v, mask, "prompt_mean", group_ids=torch.zeros(4, dtype=torch.long)).item() == pytest.approx(
        aggregate(v, mask, "token_mean").item())


def test_prompt_mean_split_over_micro_batches_and_shuffled_rows():
    """The trainer's route: the step's n_g and P, then any split of the shuffled rows; the shares add up."""
    values, mask, groups = tensors()
    whole = aggregate(values.detach(), mask, "prompt_mean", group_ids=groups)
    order = torch.tensor([3, 0, 2, 1])  # a mini-batch's shuffled rows; a prompt's rows in different micro-batches
    v, m, gid = values.detach()[order], mask[order], groups[order]
    tokens, prompts = prompt_counts(m, gid)
    shares = [aggregate(v[i:i + 1], m[i:i + 1], "prompt_mean", group_ids=gid[i:i + 1], prompt_tokens=tokens[i:i + 1],
                        num_prompts=prompts) for i in range(4)]
    assert sum(shares).item() == pytest.approx(whole.item())
    # without the step's counts each micro-batch would be its own prompt mean: a different (wrong) total
    alone = sum(aggregate(v[i:i + 1], m[i:i + 1], "prompt_mean", group_ids=gid[i:i + 1]) for i in range(4))
    assert abs(alone.item() - whole.item()) > 1


def test_prompt_mean_leaves_out_prompts_without_tokens_unlike_skyrl():
    """A prompt whose rows are all masked (unscored, or mask_truncated) is not counted in P here, as rlclip's
    sequence means leave out rows without tokens; SkyRL's P = len(prompt_boundaries) counts it."""
    values, mask, groups = tensors()
    mask[2:] = 0  # prompt 1 has no counted token
    v = values.detach()
    assert aggregate(v, mask, "prompt_mean", group_ids=groups).item() == pytest.approx(7 / 3)
    skyrl = prompt_mean_skyrl(lambda a: a, torch.ones_like(v) * v, mask, [(0, 2), (2, 4)])
    assert skyrl.item() == pytest.approx(7 / 3 / 2)


def test_prompt_mean_without_groups_is_refused():
    values, mask, _ = tensors()
    with pytest.raises(ValueError, match="group_ids"):
        aggregate(values, mask, "prompt_mean")


@pytest.mark.parametrize("agg", ["token_sum", "prompt_mean"])
def test_trust_telemetry_weight_is_one_on_policy(agg):
    """rlclip/telemetry.py divides the applied gradient by that of agg(-A logp): on-policy ratio_clip is that
    plain policy gradient under the new aggregations too (as tests/test_telemetry.py for the others)."""
    from rlclip.telemetry import gradient_weights

    logp = torch.full((4, 3), -1.0, dtype=D, requires_grad=True)
    _, mask, groups = tensors()
    b = PolicyBatch(logprobs=logp, old_logprobs=logp.detach().clone(), mask=mask, group_ids=groups,
                    advantages=torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=D)[:, None].expand(4, 3).contiguous())
    objective = build_objective("ratio_clip", agg=agg)
    w, defined = gradient_weights(objective(b).loss, b, objective)
    assert defined.equal(mask.bool())
    torch.testing.assert_close(w[defined], torch.ones(int(mask.sum()), dtype=D))


# --------------------------------------------------------------------------------------- KL estimators

LOGP = [-1.0, -2.0, -0.3]
REF = [-1.5, -0.5, -0.3]  # d = ref - logp = [-0.5, 1.5, 0]


def kl_penalty_verl(logprob, ref_logprob, name):
    """verl's ``kl_penalty`` (lines 2187-2212) with the branches of ``kl_penalty_forward`` used here."""
    base = name[:-1] if name.endswith("+") else name
    if base == "abs":
        forward = (logprob - ref_logprob).abs()
    elif base == "k3":
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    else:
        raise NotImplementedError(base)
    if not name.endswith("+"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


def kl_and_grad(estimator, logp=LOGP, ref=REF, fn=None):
    lp = torch.tensor(logp, dtype=D, requires_grad=True)
    r = torch.tensor(ref, dtype=D)
    value = (fn or kl_estimate)(lp, r, estimator)
    value.sum().backward()
    return value.detach(), lp.grad


def test_abs_hand_values_and_gradient():
    value, grad = kl_and_grad("abs")
    torch.testing.assert_close(value, torch.tensor([0.5, 1.5, 0.0], dtype=D))  # |logp - ref|
    torch.testing.assert_close(grad, torch.tensor([1.0, -1.0, 0.0], dtype=D))  # sign(logp - ref), 0 at 0


def test_k3_plus_hand_values_and_gradient():
    value, grad = kl_and_grad("k3_plus")
    # k3 = exp(d) - d - 1: exp(-0.5) + 0.5 - 1 = 0.1065306597, exp(1.5) - 1.5 - 1 = 1.9816890703, 0
    torch.testing.assert_close(value, torch.tensor([0.10653065971263342, 1.9816890703380645, 0.0], dtype=D))
    # k2's gradient d(0.5 (logp - ref)^2)/d logp = logp - ref, not k3's 1 - exp(d) = [0.3935, -3.4817, 0]
    torch.testing.assert_close(grad, torch.tensor([0.5, -1.5, 0.0], dtype=D))


def test_k3_plus_is_k3_value_and_k2_gradient():
    """Reduction: value of k3, gradient of k2, on random log-probs."""
    g = torch.Generator().manual_seed(0)
    logp, ref = (-torch.rand(20, generator=g, dtype=D) * 3).tolist(), (-torch.rand(20, generator=g, dtype=D) * 3).tolist()
    value, grad = kl_and_grad("k3_plus", logp, ref)
    k3, _ = kl_and_grad("k3", logp, ref)
    _, k2_grad = kl_and_grad("k2", logp, ref)
    torch.testing.assert_close(value, k3)
    torch.testing.assert_close(grad, k2_grad)


@pytest.mark.parametrize("ours, verl", [("abs", "abs"), ("k3_plus", "k3+")])
def test_kl_estimators_equal_verl(ours, verl):
    value, grad = kl_and_grad(ours)
    want_value, want_grad = kl_and_grad(verl, fn=kl_penalty_verl)
    torch.testing.assert_close(value, want_value)
    torch.testing.assert_close(grad, want_grad)


def test_k3_plus_value_is_not_clamped_at_ten_unlike_verl():
    """verl's "k3+" takes its value from its clamped k3 (line 2244); rlclip's k3_plus from rlclip's k3
    (unclamped; ``low_var_kl`` is the clamped one). The gradients agree (k2's, unclamped in both)."""
    value, grad = kl_and_grad("k3_plus", [-3.0], [0.0])  # d = 3: k3 = e^3 - 4 = 16.0855
    want_value, want_grad = kl_and_grad("k3+", [-3.0], [0.0], fn=kl_penalty_verl)
    assert value.item() == pytest.approx(math.exp(3) - 4) and want_value.item() == 10.0
    torch.testing.assert_close(grad, want_grad)


def test_kl_penalty_through_an_objective():
    """kl_coef x token_mean(KL): the objective's loss and gradient with zero advantages (surrogate term 0)."""
    lp = torch.tensor([LOGP], dtype=D, requires_grad=True)
    batch = PolicyBatch(logprobs=lp, old_logprobs=lp.detach().clone(), advantages=torch.zeros(1, 3, dtype=D),
                        mask=torch.ones(1, 3, dtype=D), ref_logprobs=torch.tensor([REF], dtype=D))
    out = build_objective("ratio_clip", kl_coef=0.5, kl_estimator="k3_plus")(batch)
    assert out.loss.item() == pytest.approx(0.5 * (0.10653065971263342 + 1.9816890703380645) / 3)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, 0.5 * torch.tensor([[0.5, -1.5, 0.0]], dtype=D) / 3)


# ------------------------------------------------------------------------------------ settings, adapters


def test_new_names_are_listed():
    assert {"token_sum", "prompt_mean"} <= set(AGG_MODES)
    assert {"k3_plus", "abs"} <= set(KL_ESTIMATORS)


@pytest.mark.parametrize("setting, message", [({"agg": "token-sum"}, "unknown aggregation agg='token-sum'"),
                                              ({"kl_estimator": "k3+"}, "unknown kl_estimator 'k3+'")])
def test_peer_spellings_are_refused_with_the_choices(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build_objective("ratio_clip", **setting)
    text = str(err.value)
    assert "\n" not in text and ("prompt_mean" in text or "k3_plus" in text)


@pytest.mark.parametrize("agg", ["token_sum", "prompt_mean"])
def test_trl_adapter_refuses_the_new_aggregations(agg):
    """TRL's loss types fix the aggregation (token_mean / seq means); the adapter refuses the others in one line."""
    from rlclip.integrations.trl.config import resolve_objective

    with pytest.raises(ConfigError, match=f"agg='{agg}' disagrees with loss_type='dapo'") as err:
        resolve_objective({"name": "ratio_clip", "agg": agg}, "dapo", 64)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["objective.agg=prompt_mean", "objective.kl_coef=0.1", "objective.kl_estimator=k3_plus"],
    ["objective.agg=token_sum", "objective.kl_coef=0.1", "objective.kl_estimator=abs"],
])
def test_trains_through_the_trainer(tmp_path, overrides):
    from rlclip.trainer import Trainer

    cfg = tiny_config(tmp_path, "max_steps=2", "save_steps=0", "train.micro_batch_size=4", *overrides)
    trainer = Trainer(cfg)
    seen = []
    aggregate_once = trainer.objective.aggregate

    def spy(values, batch):  # the trainer fills prompt_mean's step counts for every micro-batch
        seen.append((batch.prompt_tokens, batch.num_prompts))
        return aggregate_once(values, batch)

    trainer.objective.aggregate = spy
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["objective/kl_ref"] >= 0 for h in history)
    tokens, prompts = seen[0]
    # 4 prompts x 8 completions, 2 mini-batches of 16 shuffled rows: each row's prompt count covers the step
    assert tokens.shape == (4,) and 1 <= prompts.item() <= 4 and bool((tokens >= 1).all())
