"""cispo, sapo, vespo, luspo, gmpo, clip_cov, kl_cov, gpg, ratio_clip's delta and the token filters.

Peers are oracles: where TRL 1.16 implements the same loss, ``trl_loss`` runs TRL's own
``GRPOTrainer._compute_loss`` on a bare trainer object (``object.__new__``) whose
log-prob forward returns our leaf tensor, and the tests assert the same loss and gradient.
For verl-only objectives the expected values are derived by hand from verl's
verl/trainer/ppo/core_algos.py at commit b178a3cd56f58b2d502255daba591e92833930a7
(line numbers cited per test).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, available_objectives, build_objective
from rlclip.objectives.base import ENTROPY_KEEP, Reducer, _detached, objective_parameters
from rlclip.utils import rows_of

D = torch.float64
TRL_LOSS_AGG = {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "seq_mean_token_mean",
                "dr_grpo": "seq_mean_token_sum_norm", "luspo": "seq_mean_token_sum", "cispo": "token_mean",
                "sapo": "seq_mean_token_mean", "vespo": "token_mean"}


def random_batch(seed: int = 0, b: int = 6, t: int = 5, scale: float = 0.3, dtype=D, seq_adv: bool = True,
                 **extra) -> PolicyBatch:
    """Log-probs as grad leaves, old log-probs off by N(0, scale), one padded tail per row."""
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(b, t, generator=g, dtype=D) * 2 - 0.05).to(dtype).requires_grad_()
    old = logprobs.detach() + scale * torch.randn(b, t, generator=g, dtype=D).to(dtype)
    adv = torch.randn(b, 1 if seq_adv else t, generator=g, dtype=D).to(dtype).expand(b, t).contiguous()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).to(dtype)
    return PolicyBatch(logprobs=logprobs, old_logprobs=old, advantages=adv, mask=mask, **extra)


def fresh(batch: PolicyBatch) -> PolicyBatch:
    """The same batch with a new log-prob leaf (so each objective gets its own gradient)."""
    return PolicyBatch(**{**batch.__dict__, "logprobs": batch.logprobs.detach().clone().requires_grad_()})


def ours(name: str, batch: PolicyBatch, **settings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    batch = fresh(batch)
    out = build_objective(name, **settings)(batch)
    out.loss.backward()
    return out.loss.detach(), batch.logprobs.grad, out.metrics


# --------------------------------------------------------------------------------------------- TRL oracle

class _Accelerator:
    num_processes = 1
    sync_gradients = True
    sync_gradients = True

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_loss(loss_type: str, batch: PolicyBatch, *, epsilon=0.2, epsilon_high=None, level="token", delta=None,
             top_entropy_quantile=1.0, off_policy_mask_threshold=None, max_completion_length=None, beta=0.0,
             entropy_coef=0.0, trainer_state=None, **args) -> tuple[torch.Tensor, ...]:
    """Loss and gradient from TRL's GRPOTrainer._compute_loss on the same per-token log-probs.

    With ``entropy_coef`` (TRL's entropy bonus) the entropy is a grad leaf too and its gradient is
    returned third; ``trainer_state`` overrides trainer attributes (the adaptive entropy controller's).
    """
    from trl import GRPOTrainer

    logprobs = batch.logprobs.detach().clone().requires_grad_()
    entropy = batch.entropy.detach().clone() if batch.entropy is not None else torch.zeros_like(logprobs)
    bonus = entropy_coef != 0.0 or (trainer_state or {}).get("use_adaptive_entropy", False)
    entropy.requires_grad_(bonus)
    trainer = object.__new__(GRPOTrainer)
    config = dict(delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                  vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, use_bias_correction_kl=True,
                  steps_per_generation=1)
    config.update(args)
    trainer.__dict__.update(
        args=SimpleNamespace(**config), accelerator=_Accelerator(), model=SimpleNamespace(training=True),
        _metrics={"train": _AnyList(), "eval": _AnyList()}, beta=beta, loss_type=loss_type,
        importance_sampling_level=level, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy_mask_threshold,
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=bonus,
        entropy_coef=entropy_coef, use_adaptive_entropy=False, _last_world_entropy=math.inf,
        _entropy_window_stats=None, aux_loss_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length or logprobs.shape[1])
    trainer.__dict__.update(trainer_state or {})
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropy, None)
    t = logprobs.shape[1]
    inputs = {"prompt_ids": torch.zeros(logprobs.shape[0], 1, dtype=torch.long),
              "prompt_mask": torch.ones(logprobs.shape[0], 1, dtype=torch.long),
              "completion_ids": torch.zeros(logprobs.shape[0], t, dtype=torch.long),
              "completion_mask": batch.mask.clone(), "advantages": batch.advantages[:, 0].clone(),
              "old_per_token_logps": batch.old_logprobs.clone(), "num_items_in_batch": batch.mask.sum()}
    if beta != 0.0:
        inputs["ref_per_token_logps"] = batch.ref_logprobs.clone()
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    if bonus:
        return loss.detach(), logprobs.grad, entropy.grad, trainer
    return loss.detach(), logprobs.grad


class _AnyList(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


def assert_same(a: tuple, b: tuple, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("delta", [None, 1.5, 1.1])
def test_ratio_clip_and_delta_equal_trl(loss_type, delta):
    batch = random_batch(1, scale=0.5)
    ref = trl_loss(loss_type, batch, epsilon=0.2, epsilon_high=0.28, delta=delta)
    got = ours("ratio_clip", batch, eps_low=0.2, eps_high=0.28, delta=delta, agg=TRL_LOSS_AGG[loss_type])
    assert_same(got, ref)


def test_cispo_equals_trl():
    batch = random_batch(2, scale=0.8)
    assert_same(ours("cispo", batch, eps_high=0.3), trl_loss("cispo", batch, epsilon_high=1.3))  # cap 1 + eps_high


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_equals_trl(level):
    batch = random_batch(3, scale=0.6)
    assert_same(ours("sapo", batch, level=level), trl_loss("sapo", batch, level=level))
    assert_same(ours("sapo", batch, tau_pos=3.0, tau_neg=0.5, level=level),
                trl_loss("sapo", batch, level=level, sapo_temperature_pos=3.0, sapo_temperature_neg=0.5))


def test_vespo_equals_trl():
    batch = random_batch(4, scale=0.3)
    assert_same(ours("vespo", batch), trl_loss("vespo", batch))
    settings = dict(k_pos=1.0, lambda_pos=0.5, k_neg=4.0, lambda_neg=1.5)
    assert_same(ours("vespo", batch, **settings),
                trl_loss("vespo", batch, **{f"vespo_{k}": v for k, v in settings.items()}))


@pytest.mark.parametrize("delta", [None, 1.05])
def test_luspo_equals_trl(delta):
    batch = random_batch(5, scale=0.2)
    assert_same(ours("luspo", batch, eps_low=0.05, eps_high=0.08, delta=delta),
                trl_loss("luspo", batch, epsilon=0.05, epsilon_high=0.08, level="sequence", delta=delta))


def test_entropy_filter_equals_trl_top_entropy_quantile():
    batch = random_batch(6, dtype=torch.float32, scale=0.4)
    batch.entropy = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(7))
    for q in (0.2, 0.5, 0.0):
        assert_same(ours("ratio_clip", batch, entropy_top_quantile=q, agg="seq_mean_token_mean"),
                    trl_loss("grpo", batch, top_entropy_quantile=q))
        assert_same(ours("cispo", batch, entropy_top_quantile=q), trl_loss("cispo", batch, top_entropy_quantile=q,
                                                                            epsilon_high=5.0))


def test_off_policy_mask_equals_trl():
    batch = random_batch(8, scale=0.5)
    for threshold in (0.0, 0.05, 0.2):
        assert_same(ours("ratio_clip", batch, off_policy_mask=threshold, agg="token_mean"),
                    trl_loss("bnpo", batch, off_policy_mask_threshold=threshold))
        assert_same(ours("sapo", batch, off_policy_mask=threshold),
                    trl_loss("sapo", batch, off_policy_mask_threshold=threshold))


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "token"), ("bnpo", "token"),
                                               ("dr_grpo", "token"), ("grpo", "sequence")])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_kl_k3_and_bias_correction_equal_trl(loss_type, level, bias_correction):
    # TRL 1.16 _compute_loss: per_token_kl = exp(ref - logp) - (ref - logp) - 1, times coef_1 (the token
    # ratio, or the sequence ratio at level "sequence") when use_bias_correction_kl (TRL's default True);
    # beta * per_token_kl joins the per-token loss before TRL's aggregation. rlclip: kl_coef * agg(KL).
    batch = random_batch(11, scale=0.4)
    g = torch.Generator().manual_seed(12)
    batch.ref_logprobs = batch.logprobs.detach() + 0.5 * torch.randn(batch.mask.shape, generator=g, dtype=D)
    ref = trl_loss(loss_type, batch, epsilon=0.2, epsilon_high=0.28, level=level, beta=0.04,
                   use_bias_correction_kl=bias_correction)
    got = ours("ratio_clip", batch, eps_low=0.2, eps_high=0.28, level=level, agg=TRL_LOSS_AGG[loss_type],
               kl_coef=0.04, kl_estimator="k3", kl_bias_correction=bias_correction)
    assert_same(got, ref)


def test_kl_bias_correction_equals_trl_for_other_objectives():
    batch = random_batch(13, scale=0.3)
    batch.ref_logprobs = batch.logprobs.detach() - 0.3
    assert_same(ours("sapo", batch, kl_coef=0.1, kl_bias_correction=True), trl_loss("sapo", batch, beta=0.1))
    assert_same(ours("cispo", batch, eps_high=0.3, kl_coef=0.1, kl_bias_correction=True),
                trl_loss("cispo", batch, epsilon_high=1.3, beta=0.1))


# ------------------------------------------------------------------------------- hand values, float64

def hand_batch(log_ratios, adv, mask=None, logprobs=None, **extra) -> PolicyBatch:
    lr = torch.tensor(log_ratios, dtype=D)
    logp = torch.full_like(lr, -0.7) if logprobs is None else torch.tensor(logprobs, dtype=D)
    mask = torch.ones_like(lr) if mask is None else torch.tensor(mask, dtype=D)
    return PolicyBatch(logprobs=logp.clone().requires_grad_(), old_logprobs=logp - lr,
                       advantages=torch.tensor(adv, dtype=D).expand_as(lr).contiguous(), mask=mask, **extra)


def test_cispo_hand_values_and_reinforce_limits():
    # rho = [2, 0.5, 1.2], A = [1, -1, 2], eps_high = 0.5 (cap 1.5): w = [1.5, 0.5, 1.2]; L = -w A logp, dL/dlogp = -w A / 3
    b = hand_batch([[math.log(2.0), math.log(0.5), math.log(1.2)]], [[1.0, -1.0, 2.0]], logprobs=[[-0.5, -1.0, -2.0]])
    loss, grad, m = ours("cispo", b, eps_high=0.5)
    assert loss.item() == pytest.approx(-(1.5 * -0.5 + 0.5 * 1.0 + 1.2 * 2 * -2.0) / 3, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-1.5, 0.5, -2.4]], dtype=D) / 3)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    loss, grad, _ = ours("cispo", b, eps_high=0.5, eps_low=0.2)  # 0.5 raised to 0.8
    torch.testing.assert_close(grad, torch.tensor([[-1.5, 0.8, -2.4]], dtype=D) / 3)
    # no clipping binds: the unclipped ratio gradient -rho A, and at rho = 1 REINFORCE (gpg)
    torch.testing.assert_close(ours("cispo", b, eps_high=1e6)[1],
                               ours("ratio_clip", b, eps_low=1.0, eps_high=1e6)[1])
    on = hand_batch([[0.0, 0.0, 0.0]], [[1.0, -1.0, 2.0]])
    torch.testing.assert_close(ours("cispo", on)[1], ours("gpg", on)[1])


def test_sapo_hand_values_and_limits():
    # one token rho = e^0.3, A = 1, tau = 1: L = -4 sigmoid(rho - 1), dL/dlogp = -4 s (1 - s) rho
    rho = math.exp(0.3)
    s = 1 / (1 + math.exp(-(rho - 1)))
    loss, grad, _ = ours("sapo", hand_batch([[0.3]], [[1.0]]))
    assert loss.item() == pytest.approx(-4 * s, rel=1e-12)
    assert grad.item() == pytest.approx(-4 * s * (1 - s) * rho, rel=1e-12)
    # A = -1 uses tau_neg: L = sigmoid(1.05 (rho - 1)) * 4 / 1.05
    loss, _, _ = ours("sapo", hand_batch([[0.3]], [[-1.0]]))
    assert loss.item() == pytest.approx(4 / 1.05 / (1 + math.exp(-1.05 * (rho - 1))), rel=1e-12)
    b = random_batch(11, scale=0.4)
    # at rho = 1 the gradient is the policy gradient, whatever the temperature
    on = fresh(b)
    on.old_logprobs = on.logprobs.detach().clone()
    for tau in (0.1, 1.0, 10.0):
        torch.testing.assert_close(ours("sapo", on, tau_pos=tau, tau_neg=tau, agg="token_mean")[1],
                                   ours("gpg", on)[1])
    # small temperature: the unclipped ratio gradient -A rho
    torch.testing.assert_close(ours("sapo", b, tau_pos=1e-5, tau_neg=1e-5, agg="token_mean")[1],
                               ours("ratio_clip", b, eps_low=1.0, eps_high=1e9)[1], rtol=1e-4, atol=1e-6)
    # large temperature: a hard gate, tokens with |rho - 1| > 0.2 get (almost) no gradient
    far = hand_batch([[math.log(1.3), math.log(0.7)]], [[1.0, -1.0]])
    assert ours("sapo", far, tau_pos=200.0, tau_neg=200.0)[1].abs().max().item() < 1e-20


def test_vespo_hand_value_and_on_policy_limit():
    # one response, log ratios [0.1, 0.2] -> log w = 0.3; A = 1 >= 0: phi = exp(3 + 2 * 0.3 - 3 e^0.3)
    b = hand_batch([[0.1, 0.2]], [[1.0, 1.0]], logprobs=[[-0.5, -1.5]])
    phi = math.exp(3 + 2 * 0.3 - 3 * math.exp(0.3))
    loss, grad, m = ours("vespo", b)
    assert loss.item() == pytest.approx(-phi * (-0.5 - 1.5) / 2, rel=1e-12)
    torch.testing.assert_close(grad, torch.full((1, 2), -phi / 2, dtype=D))
    assert m["phi_mean"].item() == pytest.approx(phi)
    # A < 0 uses (k_neg, lambda_neg) = (3, 2)
    phi_neg = math.exp(2 + 3 * 0.3 - 2 * math.exp(0.3))
    assert ours("vespo", hand_batch([[0.1, 0.2]], [[-1.0, -1.0]]))[1][0, 0].item() == pytest.approx(phi_neg / 2)
    # on-policy w = 1: phi = 1 and VESPO is REINFORCE
    on = hand_batch([[0.0, 0.0, 0.0]], [[0.5, 0.5, 0.5]])
    torch.testing.assert_close(ours("vespo", on)[1], ours("gpg", on)[1])


def test_luspo_is_gspo_weighted_by_length():
    b = random_batch(12, scale=0.05)
    lengths = b.mask.sum(-1, keepdim=True)
    luspo = ours("luspo", b, eps_low=0.02, eps_high=0.03)
    gspo = ours("ratio_clip", b, eps_low=0.02, eps_high=0.03, level="sequence", agg="seq_mean_token_mean")
    torch.testing.assert_close(luspo[1], gspo[1] * lengths)
    same = ours("ratio_clip", b, eps_low=0.02, eps_high=0.03, level="sequence", agg="seq_mean_token_sum")
    assert_same(luspo, same[:2], tol=1e-12)
    assert "level" not in objective_parameters(type(build_objective("luspo")))


def test_gmpo_hand_values_from_verl():
    # verl core_algos.py compute_policy_loss_geo_mean, lines 1681-1701: clamp the token log ratio to
    # [-eps_low, eps_high] on the advantage's side (1684-1686), s_i = exp(masked mean) (1689-1690),
    # A_i = masked mean of A (1693), loss = mean_i(-A_i s_i) (1694, 1707).
    # Row 0: log ratios [0.5, -0.5, 0.1], A = 1: the upper clip 0.4 binds on 0.5 only ->
    #   s = exp((0.4 - 0.5 + 0.1) / 3) = 1; d s / d logp_t = s / 3 on unclipped tokens.
    # Row 1: log ratios [0.5, -0.5, pad], A = -2: the lower clip binds on -0.5 -> s = exp((0.5 - 0.4) / 2).
    b = hand_batch([[0.5, -0.5, 0.1], [0.5, -0.5, 9.0]], [[1.0], [-2.0]], mask=[[1, 1, 1], [1, 1, 0]])
    s1 = math.exp(0.05)
    loss, grad, m = ours("gmpo", b)
    assert loss.item() == pytest.approx((-1.0 * 1.0 + 2.0 * s1) / 2, rel=1e-12)
    expected = torch.tensor([[0.0, -1 / 3, -1 / 3], [2 * s1 / 2, 0.0, 0.0]], dtype=D) / 2
    torch.testing.assert_close(grad, expected)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5) and m["clip_frac_low"].item() == pytest.approx(1 / 5)


def test_gmpo_one_token_equals_ratio_clip():
    b = random_batch(13, t=1, b=12, scale=0.6)
    eps_low, eps_high = 0.3, 0.25
    assert_same(ours("gmpo", b, eps_low=eps_low, eps_high=eps_high),
                ours("ratio_clip", b, eps_low=1 - math.exp(-eps_low), eps_high=math.exp(eps_high) - 1)[:2],
                tol=1e-12)


def test_gpg_hand_value_from_verl():
    # verl core_algos.py compute_policy_loss_gpg, lines 1437-1447: -log_prob * A, agg_loss token-mean.
    b = hand_batch([[0.3, 0.1], [0.0, 0.0]], [[2.0], [-1.0]], mask=[[1, 1], [1, 0]],
                   logprobs=[[-0.5, -1.0], [-2.0, -3.0]])
    loss, grad, _ = ours("gpg", b)
    assert loss.item() == pytest.approx((2 * 0.5 + 2 * 1.0 - 2.0) / 3, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -2.0], [1.0, 0.0]], dtype=D) / 3)


def test_clip_cov_hand_values_from_verl():
    # verl core_algos.py compute_policy_loss_clip_cov, lines 1500-1541: cov = (A - mean A)(logp - mean logp)
    # over valid tokens (1515-1517); tokens where the PPO clip binds are no candidates (1513, 1519);
    # candidates lb < cov < ub (1523); max(int(ratio * n), 1) of them drawn (1522, 1526-1528) get corr = 0
    # (1532); loss = max(pg1, pg2) * corr, token-mean (1536, 1542).
    # A = [2, 0, 0, -2], logp = [-0.1, -1, -1, -1.9] (means 0, -1): cov = [1.8, 0, 0, 1.8].
    # Token 3 has rho = 1.5 with A < 0: the clip does not bind (-A rho > -A 1.2), token 0 rho = 1.
    b = hand_batch([[0.0, 0.0, 0.0, math.log(1.5)]], [[2.0, 0.0, 0.0, -2.0]], logprobs=[[-0.1, -1.0, -1.0, -1.9]])
    loss, grad, m = ours("clip_cov", b, clip_cov_ratio=0.5)  # int(0.5 * 4) = 2 removed: both candidates
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    torch.testing.assert_close(grad, torch.zeros(1, 4, dtype=D))
    assert m["cov_clip_frac"].item() == pytest.approx(0.5)
    loss, grad, _ = ours("clip_cov", b, clip_cov_ub=1.5)  # cov 1.8 is no candidate: plain PPO loss
    assert loss.item() == pytest.approx((-2.0 + 2 * 1.5) / 4, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, 0.0, 0.0, 3.0]], dtype=D) / 4)
    # A = [2, 0, 0, 2], logp = [-1.9, -1, -1, -0.1]: cov = [-0.9, 0, 0, 0.9]; with lb 0.5 only token 3 is a
    # candidate, unless the clip binds on it (rho = 1.5 > 1.2 with A > 0)
    clipped = hand_batch([[0.0, 0.0, 0.0, math.log(1.5)]], [[2.0, 0.0, 0.0, 2.0]], logprobs=[[-1.9, -1.0, -1.0, -0.1]])
    assert ours("clip_cov", clipped, clip_cov_lb=0.5)[2]["cov_clip_frac"].item() == 0.0
    inside = hand_batch([[0.0, 0.0, 0.0, math.log(1.1)]], [[2.0, 0.0, 0.0, 2.0]], logprobs=[[-1.9, -1.0, -1.0, -0.1]])
    loss, grad, m = ours("clip_cov", inside, clip_cov_lb=0.5)
    assert m["cov_clip_frac"].item() == pytest.approx(0.25)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, 0.0, 0.0, 0.0]], dtype=D) / 4)


def test_kl_cov_hand_values_from_verl():
    # verl core_algos.py compute_policy_loss_kl_cov, lines 1589-1624: pg = -A rho (no clip, 1594-1596);
    # cov over valid tokens (1603-1608); the max(1, int(n * ratio)) largest (1609-1610) get
    # -A rho + ppo_kl_coef * |log rho| (1595, 1614-1616); token-mean (1623).
    # cov = [1.8, 0, 0, 1.8] as above but token 0 is larger: logp[0] = 0.1 -> cov = [2.2, 0, 0, 1.8].
    b = hand_batch([[0.2, 0.0, 0.0, -0.3]], [[2.0, 0.0, 0.0, -2.0]], logprobs=[[0.1, -1.0, -1.0, -1.9]])
    r0, r3 = math.exp(0.2), math.exp(-0.3)
    loss, grad, m = ours("kl_cov", b, ppo_kl_coef=0.5)  # k = max(1, int(4 * 2e-4)) = 1: token 0
    assert loss.item() == pytest.approx((-2 * r0 + 0.5 * 0.2 + 2 * r3) / 4, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor([[-2 * r0 + 0.5, 0.0, 0.0, 2 * r3]], dtype=D) / 4)
    assert m["cov_kl_frac"].item() == pytest.approx(0.25)
    _, grad, _ = ours("kl_cov", b, ppo_kl_coef=0.5, kl_cov_ratio=0.5)  # k = 2: tokens 0 and 3
    torch.testing.assert_close(grad, torch.tensor([[-2 * r0 + 0.5, 0.0, 0.0, 2 * r3 - 0.5]], dtype=D) / 4)


def test_delta_none_is_ratio_clip_and_large_delta_is_dual_clip():
    b = random_batch(14, scale=0.8)
    assert_same(ours("ratio_clip", b, eps_high=0.28, delta=None), ours("ratio_clip", b, eps_high=0.28)[:2], 0)
    for d in (1.3, 2.0):  # > 1 + eps_high: the same bound as the dual clip
        assert_same(ours("ratio_clip", b, eps_high=0.28, delta=d)[:2],
                    ours("ratio_clip", b, eps_high=0.28, dual_clip=d)[:2], tol=1e-12)
    # rho = 3, A = -1: delta bounds the loss at -A delta = 2 without gradient; A = 1 is untouched (1.2 clip)
    h = hand_batch([[math.log(3.0), math.log(3.0)]], [[-1.0, 1.0]])
    loss, grad, m = ours("ratio_clip", h, delta=2.0)
    assert loss.item() == pytest.approx((2.0 - 1.2) / 2) and grad.abs().max().item() == 0.0
    assert m["clip_frac_delta"].item() == pytest.approx(0.5)
    # delta <= 1 + eps_high also caps positive advantages: rho = 1.15, A = 1, delta 1.1 -> loss -1.1
    loss, grad, _ = ours("ratio_clip", hand_batch([[math.log(1.15)]], [[1.0]]), delta=1.1)
    assert loss.item() == pytest.approx(-1.1) and grad.item() == 0.0
    with pytest.raises(ConfigError, match="delta"):
        build_objective("ratio_clip", delta=0.9)


# ------------------------------------------------------------------------- step statistics and filters

@pytest.mark.parametrize("name, settings", [
    ("clip_cov", {"clip_cov_ratio": 0.3, "clip_cov_lb": -10.0, "clip_cov_ub": 10.0}),
    ("kl_cov", {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.7}),
    ("ratio_clip", {"entropy_top_quantile": 0.3}),
    ("cispo", {"entropy_top_quantile": 0.5, "off_policy_mask": 0.05, "mask_truncated": True}),
])
def test_micro_batches_with_sliced_step_statistics_equal_the_whole_batch(name, settings):
    truncated = torch.tensor([False, True, False, False, True, False, False, False])
    whole = random_batch(21, b=8, t=6, scale=0.5, seq_adv=False, truncated=truncated)
    whole.entropy = torch.rand(8, 6, generator=torch.Generator().manual_seed(3), dtype=D)
    obj = build_objective(name, **settings)
    stats = obj.step_statistics(_detached(whole), Reducer())
    n = obj.count_mask(whole.mask, truncated).sum()
    out = obj(whole)
    out.loss.backward()
    leaf = whole.logprobs.detach().clone().requires_grad_()
    total = 0.0
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([3]), torch.tensor([4, 5, 6, 7])):
        micro = PolicyBatch(logprobs=leaf[idx], old_logprobs=whole.old_logprobs[idx],
                            advantages=whole.advantages[idx], mask=whole.mask[idx], entropy=whole.entropy[idx],
                            truncated=truncated[idx], num_tokens=n, step_stats=rows_of(stats, idx, 8))
        total = total + obj(micro).loss
    total.backward()
    assert abs(total.item() - out.loss.item()) < 1e-6
    torch.testing.assert_close(leaf.grad, whole.logprobs.grad, rtol=1e-6, atol=1e-6)
    # the micro-batches alone (no step statistics) would select differently
    assert set(stats) >= ({"clip_cov_selected"} if name == "clip_cov" else set())


def test_clip_cov_draw_is_reproducible_and_seeded():
    b = random_batch(22, b=8, t=6, scale=0.5, seq_adv=False)
    def draw(seed):
        obj = build_objective("clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0, seed=seed)
        return obj.step_statistics(_detached(b), Reducer())["clip_cov_selected"]

    assert torch.equal(draw(0), draw(0)) and int(draw(0).sum()) == int(0.2 * b.mask.sum())
    assert not all(torch.equal(draw(0), draw(s)) for s in (1, 2, 3))


def test_mask_truncated_removes_rows_from_loss_and_denominator():
    b = random_batch(23, scale=0.4, truncated=torch.tensor([False, True, False, True, False, False]))
    keep = torch.tensor([0, 2, 4, 5])
    sub = PolicyBatch(logprobs=b.logprobs.detach()[keep], old_logprobs=b.old_logprobs[keep],
                      advantages=b.advantages[keep], mask=b.mask[keep])
    for name in ("ratio_clip", "sapo", "gmpo"):
        loss, grad, m = ours(name, b, mask_truncated=True)
        assert loss.item() == pytest.approx(ours(name, sub)[0].item(), rel=1e-12)
        assert grad[[1, 3]].abs().max().item() == 0.0
        assert m["kept_frac"].item() == pytest.approx(float(sub.mask.sum() / b.mask.sum()))
    obj = build_objective("ratio_clip", mask_truncated=True)
    assert torch.equal(obj.count_mask(b.mask, b.truncated).sum(-1)[[1, 3]], torch.zeros(2, dtype=D))
    assert torch.equal(build_objective("ratio_clip").count_mask(b.mask, b.truncated), b.mask)
    with pytest.raises(ValueError, match="truncated"):
        obj(random_batch(23))


def test_off_policy_mask_drops_only_negative_advantage_sequences_beyond_the_threshold():
    # row 0: KL(old||new) estimate mean(old - new) = 0.3 > 0.1 with A < 0: dropped; row 1 same KL, A > 0: kept
    b = hand_batch([[-0.3, -0.3], [-0.3, -0.3]], [[-1.0], [1.0]])
    loss, grad, m = ours("ratio_clip", b, off_policy_mask=0.1, eps_low=1.0, eps_high=1e9)
    assert grad[0].abs().max().item() == 0.0 and grad[1].abs().min().item() > 0
    assert m["kept_frac"].item() == pytest.approx(0.5)
    assert ours("ratio_clip", b, off_policy_mask=0.5, eps_low=1.0, eps_high=1e9)[1][0].abs().min().item() > 0


def test_filters_are_settings_of_every_objective_and_archer_gets_filter_statistics():
    for name in available_objectives():
        params = objective_parameters(type(build_objective(name)))
        assert {"entropy_top_quantile", "off_policy_mask", "mask_truncated"} <= set(params), name
    obj = build_objective("archer", entropy_top_quantile=0.5, kl_knowledge=0.0)
    assert obj.step_needs == {"entropy"} and "entropy" in obj.needs
    b = random_batch(24)
    b.entropy = torch.rand(b.mask.shape, dtype=D)
    stats = obj.step_statistics(_detached(b), Reducer())
    assert ENTROPY_KEEP in stats and "tau" in stats
    out = obj(fresh(b))
    assert 0 < out.metrics["kept_frac"] < 1
    with pytest.raises(ConfigError, match="entropy_top_quantile"):
        build_objective("gpg", entropy_top_quantile=1.5)
    with pytest.raises(ConfigError, match="off_policy_mask"):
        build_objective("gpg", off_policy_mask=-1.0)


@pytest.mark.parametrize("name, bad", [
    ("cispo", {"eps_high": -0.5}), ("cispo", {"eps_low": 2.0}), ("sapo", {"tau_pos": 0.0}),
    ("sapo", {"level": "word"}), ("vespo", {"k_pos": -1.0}), ("luspo", {"level": "token"}),
    ("gmpo", {"eps_low": -0.1}), ("clip_cov", {"clip_cov_ratio": 0.0}), ("clip_cov", {"clip_cov_lb": 6.0}),
    ("kl_cov", {"kl_cov_ratio": 2.0}), ("gpg", {"eps": 0.2}),
])
def test_bad_settings_raise(name, bad):
    with pytest.raises(ConfigError):
        build_objective(name, **bad)


# --------------------------------------------------------------------------------------------- entropy bonus

def ours_with_bonus(name: str, batch: PolicyBatch, bonus, **settings) -> tuple[torch.Tensor, ...]:
    """rlclip's objective loss plus the trainer's entropy term, with gradients for log-probs and entropy."""
    batch = fresh(batch)
    entropy = batch.entropy.detach().clone().requires_grad_()
    batch.entropy = entropy.detach()
    objective = build_objective(name, **settings)
    loss = objective(batch).loss + bonus.loss(entropy, *objective.bonus_mask(batch))
    loss.backward()
    return loss.detach(), batch.logprobs.grad, entropy.grad


@pytest.mark.parametrize("loss_type,quantile", [("dapo", 1.0), ("grpo", 1.0), ("dapo", 0.5), ("grpo", 0.3)])
def test_entropy_bonus_equals_trl_entropy_coef(loss_type, quantile):
    from rlclip.config import EntropyConfig
    from rlclip.entropy_bonus import EntropyBonus

    # TRL takes the entropy quantile in float32, so with the filter the batch is float32 (a float64
    # entropy equal to the quantile can fall below TRL's rounded threshold)
    dtype, tol = (D, 1e-12) if quantile == 1.0 else (torch.float32, 1e-6)
    batch = random_batch(11, scale=0.3, dtype=dtype)
    batch.entropy = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(3), dtype=D).to(dtype) * 2
    settings = {"agg": TRL_LOSS_AGG[loss_type]}
    if quantile < 1.0:
        settings["entropy_top_quantile"] = quantile
    mine = ours_with_bonus("ratio_clip", batch, EntropyBonus(EntropyConfig(coef=0.3)), **settings)
    peer = trl_loss(loss_type, batch, entropy_coef=0.3, top_entropy_quantile=quantile)
    assert int((peer[2] != 0).sum()) < int(batch.mask.sum()) or quantile == 1.0  # the filter did select
    for a, b in zip(mine, peer[:3]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # hand value of the gradient: -c m_t / sum(m) on every trained token
    if quantile == 1.0:
        torch.testing.assert_close(mine[2], -0.3 * batch.mask / batch.mask.sum())


def test_adaptive_entropy_control_follows_trl_step_by_step():
    """Five optimizer steps: the coefficient, its gating and the loss equal TRL's controller."""
    from rlclip.config import EntropyConfig
    from rlclip.entropy_bonus import EntropyBonus

    config = dict(entropy_coef_min=0.0, entropy_coef_max=0.02, entropy_coef_delta=0.008, entropy_target=0.5)
    bonus = EntropyBonus(EntropyConfig(coef=0.004, adaptive=True, coef_min=0.0, coef_max=0.02, coef_delta=0.008,
                                       target=0.5))
    state = {"use_adaptive_entropy": True, "entropy_coef": 0.004, "_last_world_entropy": math.inf}
    coefs = []
    for step, level in enumerate((0.3, 0.2, 0.9, 0.1, 0.4)):  # mean entropy around `level`
        batch = random_batch(20 + step, scale=0.2)
        batch.entropy = level * 2 * torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(step),
                                               dtype=D)
        applied = bonus.applied_coef()
        mine = ours_with_bonus("ratio_clip", batch, bonus)
        bonus.end_step(float(bonus.local_sum()))
        peer = trl_loss("dapo", batch, trainer_state=state, **config)
        trainer = peer[3]
        state = {"use_adaptive_entropy": True, "entropy_coef": trainer.entropy_coef,
                 "_last_world_entropy": trainer._last_world_entropy}
        for a, b in zip(mine, peer[:3]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert bonus.coef == pytest.approx(trainer.entropy_coef, abs=1e-15)
        assert bonus.last_entropy == pytest.approx(trainer._last_world_entropy, rel=1e-12)
        coefs.append((applied, bonus.coef))
    # by hand (step k applies c_k only if H_{k-1} <= target 0.5; H_{-1} = inf): mean entropies ~0.3, ~0.2
    # are below the target, so c rises 0.004 -> 0.012 -> 0.02 (capped at coef_max); ~0.9 is above, so c falls
    # to 0.012 and step 3 applies 0; ~0.1 and ~0.4 are below again: c back to 0.02 and capped
    assert coefs[0] == (0.0, pytest.approx(0.012))
    assert coefs[1] == (pytest.approx(0.012), pytest.approx(0.02))
    assert coefs[2] == (pytest.approx(0.02), pytest.approx(0.012))
    assert coefs[3] == (0.0, pytest.approx(0.02))
    assert coefs[4] == (pytest.approx(0.02), pytest.approx(0.02))
