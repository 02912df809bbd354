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
from rlclip.objectives import PolicyBatch, build_objective
from rlclip.objectives.base import objective_parameters
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

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_loss(loss_type: str, batch: PolicyBatch, *, epsilon=0.2, epsilon_high=None, level="token", delta=None,
             top_entropy_quantile=1.0, off_policy_mask_threshold=None, max_completion_length=None,
             **args) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient from TRL's GRPOTrainer._compute_loss on the same per-token log-probs."""
    from trl import GRPOTrainer

    logprobs = batch.logprobs.detach().clone().requires_grad_()
    entropy = batch.entropy if batch.entropy is not None else torch.zeros_like(logprobs)
    trainer = object.__new__(GRPOTrainer)
    config = dict(delta=delta, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                  vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, use_bias_correction_kl=True,
                  steps_per_generation=1)
    config.update(args)
    trainer.__dict__.update(
        args=SimpleNamespace(**config), accelerator=_Accelerator(), model=SimpleNamespace(training=True),
        _metrics={"train": _AnyList(), "eval": _AnyList()}, beta=0.0, loss_type=loss_type,
        importance_sampling_level=level, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy_mask_threshold,
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length or logprobs.shape[1])
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logprobs, entropy, None)
    t = logprobs.shape[1]
    inputs = {"prompt_ids": torch.zeros(logprobs.shape[0], 1, dtype=torch.long),
              "prompt_mask": torch.ones(logprobs.shape[0], 1, dtype=torch.long),
              "completion_ids": torch.zeros(logprobs.shape[0], t, dtype=torch.long),
              "completion_mask": batch.mask.clone(), "advantages": batch.advantages[:, 0].clone(),
              "old_per_token_logps": batch.old_logprobs.clone(), "num_items_in_batch": batch.mask.sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
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
    assert_same(ours("cispo", batch, eps_high=1.3), trl_loss("cispo", batch, epsilon_high=1.3))


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
