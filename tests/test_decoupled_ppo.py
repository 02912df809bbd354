"""``ratio_clip`` + token IS against pi_prox / mu is AReaL's decoupled PPO (arXiv 2505.24298).

AReaL (inclusionAI/AReaL at 4aef98d8d818af55b43621aaadba047ae10f4e77,
``areal/utils/functional/functional.py``, ``ppo_actor_loss_fn``, lines 429-556):

    r_t   = exp(logprobs - proximal_logprobs)                       (l.500, on the loss mask)
    pg_t  = max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps_higher))      (l.508-516)
    pg_t *= behave_imp_weight_t                                     (l.529-533)
    loss  = sum(pg_t over the loss mask) / (count of the ORIGINAL loss mask)   (l.478, l.536)

with behave_imp_weight = exp(proximal - behaviour) clamped to the cap
(``action='clamp'``) or the token dropped from the loss mask while the
denominator keeps the original count (``action='mask'``, the comment at
l.474-477). rlclip's ``is_mode: token_truncate`` is the clamp and
``token_mask`` the mask: a masked token's weight is 0 and the token-mean
denominator is unchanged. The formula is written out by hand below.
"""

from __future__ import annotations

import pytest
import torch

from rlclip.is_correction import importance_weights
from rlclip.objectives import build_objective
from rlclip.types import PolicyBatch

D = torch.float64


def areal_decoupled_loss(logprobs, proximal, behaviour, advantages, mask, eps, eps_higher, cap, action):
    """AReaL's decoupled PPO loss written out from the lines cited above (no rlclip code)."""
    count = mask.sum()
    weight = torch.exp(proximal - behaviour)
    if action == "clamp":
        weight = weight.clamp(max=cap)
    else:
        mask = mask * (weight <= cap)
        weight = torch.where(weight <= cap, weight, torch.zeros_like(weight))
    ratio = torch.exp(logprobs - proximal)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps_higher)) * weight
    return (loss * mask).sum() / count


@pytest.mark.parametrize("mode, action", [("token_truncate", "clamp"), ("token_mask", "mask")])
def test_ratio_clip_with_token_is_equals_areal_decoupled_ppo(mode, action):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 5)
    proximal = -torch.rand(shape, generator=generator, dtype=D) * 2  # log pi_prox (trainer, version n)
    behaviour = proximal + torch.randn(shape, generator=generator, dtype=D) * 0.8  # log mu (version n - k)
    logprobs = (proximal + torch.randn(shape, generator=generator, dtype=D) * 0.3).requires_grad_()
    advantages = torch.randn(shape, generator=generator, dtype=D)
    mask = torch.ones(shape, dtype=D)
    mask[0, 3:] = 0
    mask[2, 4] = 0
    weights, _ = importance_weights(proximal, behaviour, mask, mode, cap=1.5)
    assert bool(((weights == 0) & mask.bool()).any()) == (action == "mask")  # the cap bites on these inputs
    assert bool(((weights == 1.5) & mask.bool()).any()) == (action == "clamp")
    objective = build_objective("ratio_clip", eps_low=0.2, eps_high=0.28)
    ours = objective(PolicyBatch(logprobs=logprobs, old_logprobs=proximal, advantages=advantages, mask=mask,
                                 token_weights=weights)).loss
    (ours_grad,) = torch.autograd.grad(ours, logprobs)
    theirs = areal_decoupled_loss(logprobs, proximal, behaviour, advantages, mask, 0.2, 0.28, 1.5, action)
    (theirs_grad,) = torch.autograd.grad(theirs, logprobs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


def test_decoupled_ppo_differs_from_plain_ppo_when_the_sampler_lags():
    """The weight matters: without it the same batch gives another loss (the test above can fail)."""
    generator = torch.Generator().manual_seed(1)
    shape = (2, 4)
    proximal = -torch.rand(shape, generator=generator, dtype=D)
    behaviour = proximal + 0.5
    logprobs = proximal + 0.1
    advantages = torch.ones(shape, dtype=D)
    mask = torch.ones(shape, dtype=D)
    weights, _ = importance_weights(proximal, behaviour, mask, "token_truncate", cap=3.0)
    objective = build_objective("ratio_clip")
    plain = objective(PolicyBatch(logprobs=logprobs, old_logprobs=proximal, advantages=advantages, mask=mask)).loss
    weighted = objective(PolicyBatch(logprobs=logprobs, old_logprobs=proximal, advantages=advantages, mask=mask,
                                     token_weights=weights)).loss
    torch.testing.assert_close(weighted, plain * torch.exp(torch.tensor(-0.5, dtype=D)))
