"""policy.py against a plain full-logits computation; rollout masks and truncation."""

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
