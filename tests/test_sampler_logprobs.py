"""log mu(a_t) of rlclip/decoding.py: each sampled token's log-prob under the distribution it was drawn from.

The reference is independent of the loop: a teacher-forced forward over prompt + completion (no KV cache),
then the EOS hold of ``min_new_tokens``, temperature, top-k and top-p applied here in float64 with
transformers' semantics (top-k keeps every logit >= the k-th largest; top-p, as ``TopPLogitsWarper``
removes a token when the ascending cumulative mass up to it is <= 1 - p, keeps a token iff the mass of the
strictly more probable tokens is < p), and a float64 log-softmax.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlclip.decoding import Decoded, decode
from rlclip.modeling import load_tokenizer, resolve_tiny
from rlclip.policy import position_ids_from_mask
from rlclip.rollout import SamplingSettings, completion_mask_and_truncation, eos_ids, sample_completions

GROUP, MAX_NEW = 3, 10


@pytest.fixture(scope="module")
def tiny():
    path = resolve_tiny("tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    enc = tok(["1+1=", "what is 12 plus 30, then times 4?", "7"], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return model, tok, enc["input_ids"], enc["attention_mask"]


def warped(z: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """``z [..., V]`` float64 logits -> the scores sampled from (temperature 0: ``z``, greedy as vLLM)."""
    if temperature == 0:
        return z
    z = z / temperature
    if top_k:
        kth = z.topk(top_k, dim=-1).values[..., -1:]  # [..., 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        p = torch.softmax(z, dim=-1)  # [..., V]
        above = (p.unsqueeze(-2) * (z.unsqueeze(-2) > z.unsqueeze(-1))).sum(-1)  # [..., V] mass strictly above
        z = z.masked_fill(above >= top_p, float("-inf"))
    return z


def teacher_forced_logits(model, ids, mask, completion, group) -> torch.Tensor:
    """``[B, T, V]`` float64 logits that predicted each completion token, from one forward without a cache."""
    prompt_ids, prompt_mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)  # [B, P]
    full = torch.cat([prompt_ids, completion], dim=1)  # [B, P + T]
    full_mask = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)  # [B, P + T]
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)).logits
    return logits[:, prompt_ids.shape[1] - 1:-1].double()  # [B, T, V]


def reference(model, ids, mask, out: Decoded, eos, temperature, top_k, top_p, min_new, hold=True):
    """``[B, T]`` float64 log mu of ``out``'s tokens, 0 off the completion mask; and the mask."""
    z = teacher_forced_logits(model, ids, mask, out.completion_ids, GROUP)  # [B, T, V]
    if hold:
        z[:, :min_new, eos] = float("-inf")
    logp = torch.log_softmax(warped(z, temperature, top_k, top_p), dim=-1)  # [B, T, V]
    picked = logp.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    completion_mask, _ = completion_mask_and_truncation(out.completion_ids, eos)
    return picked.masked_fill(completion_mask == 0, 0.0), completion_mask


CASES = [  # temperature, top_k, top_p, min_new_tokens
    (1.0, 0, 1.0, 0),
    (0.7, 0, 1.0, 0),
    (1.3, 5, 1.0, 0),
    (0.8, 0, 0.7, 0),
    (0.7, 8, 0.5, 3),
    (1.0, 0, 1.0, 4),
    (0, 0, 1.0, 0),  # greedy: temperature-1 log-probs, as vLLM's processed_logprobs
    (0, 5, 0.5, 3),  # greedy ignores top-k / top-p (vLLM too), keeps the EOS hold
]


@pytest.mark.parametrize("temperature,top_k,top_p,min_new", CASES)
def test_sampler_logprobs_equal_a_float64_recomputation(tiny, temperature, top_k, top_p, min_new):
    model, tok, ids, mask = tiny
    eos = [tok.eos_token_id, 7]  # a second stop id that the random model emits now and then: pads appear
    torch.manual_seed(11)
    out = decode(model, ids, mask, GROUP, MAX_NEW, eos, tok.pad_token_id, temperature=temperature, top_k=top_k,
                 top_p=top_p, min_new_tokens=min_new)
    assert isinstance(out, Decoded) and out.sampler_logprobs.dtype == torch.float32
    assert out.sampler_logprobs.shape == out.completion_ids.shape
    want, completion_mask = reference(model, ids, mask, out, eos, temperature, top_k, top_p, min_new)
    got = out.sampler_logprobs
    assert torch.isfinite(want).all()  # every sampled token lies in the reference support
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert (got[completion_mask == 0] == 0).all()
    assert (got[completion_mask == 1] < 0).any()
    if temperature and (top_k or top_p < 1):  # a truncated distribution: not the model's own log-probs
        unwarped, _ = reference(model, ids, mask, out, eos, 1.0, 0, 1.0, min_new)
        assert (want - unwarped).abs().max() > 1e-2


def test_pads_after_eos_get_zero(tiny):
    """Rows end at different steps: every position after a row's EOS is 0 and holds a pad."""
    model, tok, ids, mask = tiny
    eos = [tok.eos_token_id, 7, 8, 9]  # stops often
    torch.manual_seed(2)
    out = decode(model, ids, mask, 4, MAX_NEW, eos, tok.pad_token_id, temperature=1.3)
    completion_mask, _ = completion_mask_and_truncation(out.completion_ids, eos)
    assert (completion_mask == 0).any() and (completion_mask.sum(-1) < out.completion_ids.shape[1]).any()
    assert (out.sampler_logprobs[completion_mask == 0] == 0).all()
    assert (out.completion_ids[completion_mask == 0] == tok.pad_token_id).all()
    assert (out.sampler_logprobs[completion_mask == 1] != 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0])
def test_the_eos_hold_is_part_of_the_sampling_distribution(tiny, temperature):
    """A model that favours EOS, held for 3 tokens: log mu there is of the distribution without EOS, which
    differs from the unheld log-softmax by -log(1 - p_eos)."""
    model, tok, ids, mask = tiny
    eos = [tok.eos_token_id]

    def favour_eos(_module, _args, logits):
        logits[..., tok.eos_token_id] += 3.0
        return logits

    handle = model.get_output_embeddings().register_forward_hook(favour_eos)
    try:
        torch.manual_seed(5)
        out = decode(model, ids, mask, GROUP, 6, eos, tok.pad_token_id, temperature=temperature, min_new_tokens=3)
        held, _ = reference(model, ids, mask, out, eos, temperature, 0, 1.0, 3)
        unheld, _ = reference(model, ids, mask, out, eos, temperature, 0, 1.0, 3, hold=False)
    finally:
        handle.remove()
    torch.testing.assert_close(out.sampler_logprobs.double(), held, rtol=0, atol=1e-5)
    assert ((held - unheld)[:, :3] > 0.05).all()  # -log(1 - p_eos) with p_eos well above 5 %
    assert torch.equal(held[:, 3:], unheld[:, 3:])


def test_tokens_are_inverse_cdf_draws_with_one_uniform_per_row_and_step(tiny):
    """The sampling itself is untouched by the log-prob bookkeeping: each step draws one float64 uniform per
    row from the global generator and takes the inverse CDF of the warped distribution, and nothing else
    consumes random numbers (same tokens and generator state as a replay from the same seed)."""
    model, tok, ids, mask = tiny
    eos = [tok.eos_token_id, 7]
    torch.manual_seed(123)
    out = decode(model, ids, mask, GROUP, MAX_NEW, eos, tok.pad_token_id, temperature=0.9, top_k=20, top_p=0.9)
    state_after = torch.random.get_rng_state()
    probs = torch.softmax(warped(teacher_forced_logits(model, ids, mask, out.completion_ids, GROUP), 0.9, 20, 0.9),
                          dim=-1)  # [B, T, V] float64
    completion_mask, _ = completion_mask_and_truncation(out.completion_ids, eos)
    torch.manual_seed(123)
    for t in range(out.completion_ids.shape[1]):
        u = 1.0 - torch.rand(probs.shape[0], 1, dtype=torch.float64)  # [B, 1]
        cdf = probs[:, t].cumsum(-1)  # [B, V]
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)  # [B]
        live = completion_mask[:, t] == 1
        assert torch.equal(drawn[live], out.completion_ids[live, t]), t
    assert torch.equal(torch.random.get_rng_state(), state_after)


def test_sample_completions_carries_them_on_the_rollout(tiny):
    """The hf backend's RolloutBatch: float32 on the rollout's device, equal to decode's, 0 off the mask."""
    model, tok, _, _ = tiny
    settings = SamplingSettings(group_size=2, max_new_tokens=6, temperature=0.7, top_k=10, min_new_tokens=1)
    records = [{"prompt": "1+1="}, {"prompt": "what is 12 plus 30?"}]
    torch.manual_seed(4)
    batch = sample_completions(model, tok, records, settings, torch.device("cpu"))
    lp = batch.sampler_logprobs
    assert lp is not None and lp.dtype == torch.float32 and lp.shape == batch.completion_ids.shape
    assert (lp[batch.completion_mask == 0] == 0).all() and (lp[batch.completion_mask == 1] <= 0).all()
    torch.manual_seed(4)
    out = decode(model, batch.prompt_ids[::2], batch.prompt_mask[::2], 2, 6, eos_ids(model, tok),
                 tok.pad_token_id, temperature=0.7, top_k=10, min_new_tokens=1)
    assert torch.equal(out.completion_ids.masked_fill(batch.completion_mask == 0, tok.pad_token_id),
                       batch.completion_ids)
    assert torch.equal(out.sampler_logprobs.masked_fill(batch.completion_mask == 0, 0.0), lp)
