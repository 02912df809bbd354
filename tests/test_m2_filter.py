"""The base-class M2PO filter ``m2_threshold`` (arXiv 2510.01161; rlclip/objectives/filters.py).

Oracle: AReaL (github.com/inclusionAI/AReaL at 4aef98d8d818af55b43621aaadba047ae10f4e77),
areal/trainer/ppo/actor.py ``_apply_m2po_masking`` / ``_get_m2po_loss_mask``, transcribed below.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_offpolicy_objectives import D, log_ratio_batch, ours, random_batch

from rlclip.errors import ConfigError
from rlclip.objectives import PolicyBatch, available_objectives, build_objective
from rlclip.objectives.base import Reducer, _detached, objective_parameters
from rlclip.objectives.filters import M2_KEEP, m2_cut, second_moment
from rlclip.utils import rows_of


def m2po_loss_mask_areal(old_logp, prox_logp, loss_mask, m2_threshold):
    """AReaL actor.py _apply_m2po_masking (lines 769-810) and _get_m2po_loss_mask (813-850)."""
    delta = old_logp - prox_logp  # 790
    m2 = delta * delta
    mask_flat = loss_mask.view(-1)
    m2_selected = m2.view(-1)[mask_flat]
    sorted_m2, indices = torch.sort(m2_selected, descending=True)  # 798
    restored_indices = torch.argsort(indices)
    n = sorted_m2.numel()
    suffix_sums = sorted_m2.flip(0).cumsum(0).flip(0)  # 826
    counts = torch.arange(n, 0, -1, dtype=sorted_m2.dtype)
    below_threshold_indices = torch.where(suffix_sums / counts < m2_threshold)[0]  # 835
    num_to_mask = below_threshold_indices[0].item() if len(below_threshold_indices) > 0 else n - 1  # 837-842
    sorted_keep = torch.ones_like(sorted_m2, dtype=torch.bool)
    sorted_keep[:num_to_mask] = False  # 844-846
    full = torch.zeros_like(mask_flat, dtype=torch.bool)
    full[mask_flat] = sorted_keep[restored_indices]
    return full.view_as(loss_mask)


def test_m2_filter_hand_values():
    # log ratios [0.5, -0.3, 0.2, 0.1, 0.0] -> M2 = [0.25, 0.09, 0.04, 0.01, 0]; suffix means of the sorted
    # values: 0.078, 0.035, 0.0167, 0.005, 0. Threshold 0.04: k = 1 (0.035 < 0.04), the 0.25 token is masked;
    # 0.03: k = 2, 0.25 and 0.09; 0.1: k = 0, nothing. The padded 6th position never counts.
    b = log_ratio_batch([[0.5, -0.3, 0.2, 0.1, 0.0, 7.0]], [[1.0]], mask=[[1, 1, 1, 1, 1, 0]])
    plain = ours("gpg", b)
    for threshold, masked in ((0.04, [0]), (0.03, [0, 1]), (0.1, [])):
        loss, grad, m = ours("gpg", b, m2_threshold=threshold)
        keep = torch.ones(1, 6, dtype=D)
        keep[0, masked] = 0.0
        torch.testing.assert_close(grad, plain[1] * keep)  # the denominator still counts the masked tokens
        assert loss.item() == pytest.approx(0.7 * (5 - len(masked)) / 5, rel=1e-12)
        assert m["m2_masked_frac"].item() == pytest.approx(len(masked) / 5)
        assert m["m2_mean"].item() == pytest.approx(0.39 / 5)
        assert m["kept_frac"].item() == pytest.approx((5 - len(masked)) / 5)
        areal = m2po_loss_mask_areal(b.old_logprobs, b.logprobs.detach(), b.mask.bool(), threshold)
        assert torch.equal(areal[0, :5], keep[0, :5].bool())


def test_m2_filter_ties_and_fallback():
    values = torch.tensor([0.09, 0.0, 0.09], dtype=D)
    # suffix means 0.06, 0.045 < 0.05: AReaL masks one 0.09 token (which one, its unstable sort decides);
    # here both tokens with M2 >= 0.09 are masked, and the rest (mean 0) is still below the threshold
    assert m2_cut(values, 0.05).item() == 0.09
    # every suffix mean >= threshold: AReaL masks all but the smallest token; so does the fallback
    assert m2_cut(torch.tensor([0.25, 0.16], dtype=D), 0.1).item() == 0.25
    assert m2_cut(torch.tensor([0.25, 0.16, 0.16], dtype=D), 0.1).item() == 0.25
    assert m2_cut(torch.tensor([0.2, 0.2], dtype=D), 0.1).item() == math.inf  # all equal: nothing to single out
    assert m2_cut(torch.tensor([], dtype=D), 0.1).item() == math.inf
    # NaN log-probs (a sampler that gave none) count as ratio 1
    nan = second_moment(torch.tensor([[-1.0]], dtype=D), torch.tensor([[float("nan")]], dtype=D))
    assert nan.item() == 0.0


@pytest.mark.parametrize("threshold", [0.5, 0.1, 0.02, 0.005])
def test_m2_filter_equals_areal_on_a_single_batch(threshold):
    b = random_batch(7, b=8, t=9, scale=0.4)
    obj = build_objective("ratio_clip", m2_threshold=threshold)
    keep = obj.step_statistics(_detached(b), Reducer())[M2_KEEP]
    # AReaL: delta = old_logp (behaviour) - prox_logp; here the ratio is current over old: the same square
    assert torch.equal(keep, m2po_loss_mask_areal(b.old_logprobs, b.logprobs.detach(), b.mask.bool(), threshold))


def test_m2_threshold_inf_changes_nothing():
    b = random_batch(8, scale=0.8)
    for name in ("ratio_clip", "dppo", "reinforce_is"):
        base = ours(name, b)
        loss, grad, m = ours(name, b, m2_threshold=math.inf)
        assert torch.equal(loss, base[0]) and torch.equal(grad, base[1])
        assert m["m2_masked_frac"].item() == 0.0 and m["kept_frac"].item() == 1.0


@pytest.mark.parametrize("name, settings", [
    ("ratio_clip", {"m2_threshold": 0.05}),
    ("dppo", {"m2_threshold": 0.02, "mask_truncated": True}),
    ("reinforce_is", {"m2_threshold": 0.05, "entropy_top_quantile": 0.6}),
])
def test_m2_filter_micro_batches_with_sliced_step_statistics_equal_the_whole_batch(name, settings):
    truncated = torch.tensor([False, True, False, False, True, False, False, False])
    whole = random_batch(9, b=8, t=6, scale=0.5, truncated=truncated)
    whole.entropy = torch.rand(8, 6, generator=torch.Generator().manual_seed(3), dtype=D)
    obj = build_objective(name, **settings)
    assert "logprobs" in obj.step_needs
    stats = obj.step_statistics(_detached(whole), Reducer())
    n = obj.count_mask(whole.mask, truncated).sum()
    out = obj(whole)
    out.loss.backward()
    assert 0 < out.metrics["m2_masked_frac"] < 0.5
    leaf = whole.logprobs.detach().clone().requires_grad_()
    total, alone = 0.0, []
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([3]), torch.tensor([4, 5, 6, 7])):
        micro = PolicyBatch(logprobs=leaf[idx], old_logprobs=whole.old_logprobs[idx],
                            advantages=whole.advantages[idx], mask=whole.mask[idx], entropy=whole.entropy[idx],
                            truncated=truncated[idx], num_tokens=n, step_stats=rows_of(stats, idx, 8))
        out_micro = obj(micro)
        total = total + out_micro.loss
        assert out_micro.metrics["m2_masked_frac"] == out.metrics["m2_masked_frac"]  # a step statistic
        alone.append(obj.step_statistics(_detached(micro), Reducer())[M2_KEEP])
    total.backward()
    assert abs(total.item() - out.loss.item()) < 1e-12
    torch.testing.assert_close(leaf.grad, whole.logprobs.grad, rtol=1e-12, atol=1e-12)
    # each micro-batch on its own (AReaL's way) would mask other tokens
    assert not torch.equal(torch.cat(alone), stats[M2_KEEP])


class TwoProcesses(Reducer):
    """``Reducer.cat`` of process ``rank`` when the other process holds ``others`` (rank order kept)."""

    def __init__(self, rank: int, parts: list[torch.Tensor]) -> None:
        self.rank, self.parts = rank, parts

    def cat(self, tensor):
        parts = list(self.parts)
        parts[self.rank] = tensor
        return torch.cat(parts)


def test_m2_filter_is_the_same_on_two_processes():
    whole = random_batch(10, b=8, t=6, scale=0.5)
    obj = build_objective("dppo", m2_threshold=0.03)
    out = obj(whole)
    out.loss.backward()
    halves = (torch.arange(4), torch.arange(4, 8))
    parts = [second_moment(whole.logprobs[i], whole.old_logprobs[i])[whole.mask[i].bool()] for i in halves]
    leaf = whole.logprobs.detach().clone().requires_grad_()
    total = 0.0
    for rank, idx in enumerate(halves):
        local = PolicyBatch(logprobs=leaf[idx], old_logprobs=whole.old_logprobs[idx],
                            advantages=whole.advantages[idx], mask=whole.mask[idx], num_tokens=whole.mask.sum())
        local.step_stats = obj.step_statistics(_detached(local), TwoProcesses(rank, parts))
        total = total + obj(local).loss  # DDP sums the processes' shares of the global mean
    total.backward()
    assert abs(total.item() - out.loss.item()) < 1e-12
    torch.testing.assert_close(leaf.grad, whole.logprobs.grad, rtol=1e-12, atol=1e-12)


def test_m2_threshold_is_a_setting_of_every_objective():
    for name in available_objectives():
        assert "m2_threshold" in objective_parameters(type(build_objective(name))), name
    archer = build_objective("archer", m2_threshold=0.04, kl_knowledge=0.0)  # archer resets its step_needs
    assert archer.step_needs == {"logprobs"}
    assert build_objective("ratio_clip").step_needs == frozenset()
    assert build_objective("ratio_clip", m2_threshold=0.04, entropy_top_quantile=0.2).step_needs == \
        {"logprobs", "entropy"}
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="m2_threshold"):
            build_objective("gpg", m2_threshold=bad)
