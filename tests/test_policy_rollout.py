"""rlclip/policy/ against a plain full-logits computation; rollout masks and truncation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlclip.modeling import load_tokenizer, resolve_tiny
from rlclip.policy import completion_logprobs, position_ids_from_mask
from rlclip.rollout import SamplingSettings, completion_mask_and_truncation, sample_completions


@pytest.fixture(scope="module")
def tiny():
    path = resolve_tiny("tiny")
    return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)


def reference(model, pid, pm, cid, cm, temperature):
    ids, am = torch.cat([pid, cid], 1), torch.cat([pm, cm], 1)
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
    logp = (logits[:, pid.shape[1] - 1:-1].float() / temperature).log_softmax(-1)  # [B, T, V]
    return logp.gather(-1, cid.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_logprobs_entropy_and_gradients_match_full_logits(tiny, chunk_size):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    pid, cid = torch.randint(3, 90, (3, 5), generator=g), torch.randint(3, 90, (3, 4), generator=g)
    pm, cm = torch.ones(3, 5, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)
    pm[0, :2], cm[1, 2:] = 0, 0
    out = completion_logprobs(model, pid, pm, cid, cm, temperature=0.7, need_entropy=True, chunk_size=chunk_size)
    ref_lp, ref_ent = reference(model, pid, pm, cid, cm, 0.7)
    torch.testing.assert_close(out["logprobs"], ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"], ref_ent, atol=1e-5, rtol=1e-5)
    assert not out["entropy"].requires_grad
    weights = torch.randn(3, 4, generator=g)
    grads = torch.autograd.grad((out["logprobs"] * weights).sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad((ref_lp * weights).sum(), list(model.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_token_logprob_function_values_entropy_and_gradcheck_float64(chunk_size):
    """The fused chunked log-prob against log_softmax + gather, with a bias and a temperature;
    its hand-written backward against autograd through a float64 log_softmax."""
    from rlclip.policy import _TokenLogProb

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (7,), generator=g)
    logprobs, entropy = _TokenLogProb.apply(hidden, weight, bias, tokens, 0.7, chunk_size, True)
    logp = ((hidden @ weight.T + bias).float() / 0.7).log_softmax(-1)  # the function computes in float32
    torch.testing.assert_close(logprobs, logp.gather(-1, tokens[:, None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))

    weights = torch.randn(7, generator=g, dtype=torch.float64)
    out = _TokenLogProb.apply(hidden, weight, bias, tokens, 0.7, chunk_size, False)[0]
    grads = torch.autograd.grad((out * weights).sum(), (hidden, weight, bias))
    full = ((hidden @ weight.T + bias) / 0.7).log_softmax(-1)  # [7, 11] float64
    ref_logp = full.gather(-1, tokens[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref_logp * weights).sum(), (hidden, weight, bias), retain_graph=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # the entropy's own gradient (an entropy bonus), alone and together with the log-probs'
    ref_entropy = -(full.exp() * full).sum(-1)  # [7]
    ent_weights = torch.randn(7, generator=g, dtype=torch.float64)
    for lp_w in (None, weights):
        logprobs, entropy = _TokenLogProb.apply(hidden, weight, bias, tokens, 0.7, chunk_size, True)
        loss = (entropy * ent_weights).sum() + (0 if lp_w is None else (logprobs * lp_w).sum())
        ref = (ref_entropy * ent_weights).sum() + (0 if lp_w is None else (ref_logp * lp_w).sum())
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        ref_grads = torch.autograd.grad(ref, (hidden, weight, bias), retain_graph=True)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_support", [False, True])
def test_entropy_grad_through_completion_logprobs_matches_full_logits(tiny, with_support):
    """entropy_grad=True: the entropy carries the gradient of -sum p log p (plain and TROLL support paths)."""
    from rlclip.policy import SupportSpec

    model, _ = tiny
    g = torch.Generator().manual_seed(4)
    pid, cid = torch.randint(3, 90, (2, 4), generator=g), torch.randint(3, 90, (2, 3), generator=g)
    pm, cm = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    kwargs = {}
    if with_support:
        spec = SupportSpec(top_k=8, tail_mass=0.0)
        with torch.no_grad():
            old = completion_logprobs(model, pid, pm, cid, cm, temperature=0.7, record_support=spec)["old_support"]
        kwargs = {"support": spec, "old_support": old}
    out = completion_logprobs(model, pid, pm, cid, cm, temperature=0.7, need_entropy=True, entropy_grad=True,
                              chunk_size=2, **kwargs)
    assert out["entropy"].requires_grad
    ref_lp, ref_ent = reference(model, pid, pm, cid, cm, 0.7)
    torch.testing.assert_close(out["entropy"], ref_ent, atol=1e-5, rtol=1e-5)
    weights = torch.randn(2, 3, generator=g)
    grads = torch.autograd.grad((out["entropy"] * weights).sum() + out["logprobs"].sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad((ref_ent * weights).sum() + ref_lp.sum(), list(model.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_token_logprob_function_skips_frozen_inputs():
    """LoRA freezes the output head: no weight gradient is formed, the hidden-state gradient still is."""
    from rlclip.policy import _TokenLogProb

    hidden = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(6, 3)
    logprobs, _ = _TokenLogProb.apply(hidden, weight, None, torch.tensor([0, 1, 2, 3, 4]), 1.0, 2, False)
    logprobs.sum().backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_no_entropy_unless_asked(tiny):
    model, _ = tiny
    ids = torch.randint(3, 90, (2, 3))
    ones = torch.ones(2, 3, dtype=torch.long)
    assert set(completion_logprobs(model, ids, ones, ids, ones)) == {"logprobs"}


def test_completion_mask_stops_at_first_eos_and_flags_truncation():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    mask, truncated = completion_mask_and_truncation(ids, [2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_sample_completions_groups_chat_and_columns(tiny):
    model, tok = tiny
    records = [{"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"},
               {"prompt": [{"role": "user", "content": "22+3"}], "answer": "25"}]
    torch.manual_seed(0)
    batch = sample_completions(model, tok, records, SamplingSettings(group_size=3, max_new_tokens=6),
                               torch.device("cpu"))
    assert batch.completion_ids.shape[0] == 6 and batch.completion_ids.shape[1] <= 6
    assert batch.columns["answer"] == ["2"] * 3 + ["25"] * 3
    assert batch.prompts[0] == batch.prompts[2] != batch.prompts[3]
    assert batch.completions[0][0]["role"] == "assistant"  # chat prompts -> message completions
    assert (batch.prompt_mask[:3, 0] == 0).all()  # shorter prompt is left-padded
    pad = tok.pad_token_id
    assert ((batch.completion_ids == pad) | (batch.completion_mask == 1)).all()
    assert batch.truncated.tolist() == (batch.completion_mask[:, -1] == 1).logical_and(
        batch.completion_ids[:, -1] != tok.eos_token_id).tolist()


def test_min_new_tokens_holds_eos_back(tiny):
    """A model that always wants EOS stops at once, unless min_new_tokens holds EOS back that long."""
    model, tok = tiny

    def eos_first(_module, _args, logits):
        logits[..., tok.eos_token_id] += 100.0
        return logits

    handle = model.get_output_embeddings().register_forward_hook(eos_first)
    records = [{"prompt": "1+1"}]
    try:
        short = sample_completions(model, tok, records, SamplingSettings(group_size=2, max_new_tokens=5),
                                   torch.device("cpu"))
        held = sample_completions(model, tok, records, SamplingSettings(group_size=2, max_new_tokens=5,
                                                                        min_new_tokens=3), torch.device("cpu"))
    finally:
        handle.remove()
    assert short.completion_mask.sum(-1).tolist() == [1, 1]  # the EOS itself counts
    assert held.completion_mask.sum(-1).tolist() == [4, 4]  # three tokens, then the EOS
    assert not held.truncated.any()
