"""rlclip/decoding.py against transformers' ``generate`` (the oracle), and its categorical sampler."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rlclip.decoding import decode, sample_categorical
from rlclip.modeling import load_tokenizer, resolve_tiny
from rlclip.policy import position_ids_from_mask
from rlclip.rollout import SamplingSettings, sample_completions


@pytest.fixture(scope="module")
def tiny():
    path = resolve_tiny("tiny")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    return model, tok


def prompts(tok, texts=("1+1=", "what is 12 plus 30, then times 4?", "7")):
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding is exercised
    return enc["input_ids"], enc["attention_mask"]


def generate(model, ids, mask, group, **kwargs):
    out = model.generate(input_ids=ids.repeat_interleave(group, 0), attention_mask=mask.repeat_interleave(group, 0),
                         use_cache=True, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("group,max_new,min_new", [(1, 12, 0), (3, 9, 4)])
def test_greedy_is_token_for_token_what_generate_returns(tiny, group, max_new, min_new):
    model, tok = tiny
    ids, mask = prompts(tok)
    eos = [tok.eos_token_id, 7]  # a second stop id that the random model emits now and then
    with torch.no_grad():
        want = generate(model, ids, mask, group, max_new_tokens=max_new, min_new_tokens=min_new or None,
                        do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    got = decode(model, ids, mask, group, max_new, eos, tok.pad_token_id, temperature=0,
                 min_new_tokens=min_new).completion_ids
    assert got.shape == want.shape and torch.equal(got, want)


def test_stops_once_every_row_has_ended_and_pads_after_eos(tiny):
    """A model that always wants EOS: one step; with min_new_tokens, EOS only at that step, and pads
    after it never appear in rows still running."""
    model, tok = tiny
    ids, mask = prompts(tok)

    def eos_first(_module, _args, logits):
        logits[..., tok.eos_token_id] += 100.0
        return logits

    handle = model.get_output_embeddings().register_forward_hook(eos_first)
    try:
        at_once = decode(model, ids, mask, 2, 10, [tok.eos_token_id], tok.pad_token_id).completion_ids
        held = decode(model, ids, mask, 2, 10, [tok.eos_token_id], tok.pad_token_id, min_new_tokens=3).completion_ids
    finally:
        handle.remove()
    assert at_once.shape == (6, 1) and (at_once == tok.eos_token_id).all()
    assert held.shape == (6, 4) and (held[:, 3] == tok.eos_token_id).all() and (held[:, :3] != tok.eos_token_id).all()


def test_sampled_rows_are_prompt_major_and_a_groups_samples_differ(tiny):
    """Sampling through the rollout API: rows are prompt-major (each group's prompt is its own), and the G
    samples of one prompt are drawn independently, not copies of one."""
    model, tok = tiny
    torch.manual_seed(0)
    batch = sample_completions(model, tok, [{"prompt": "1+1="}, {"prompt": "2+2="}],
                               SamplingSettings(group_size=4, max_new_tokens=8), torch.device("cpu"))
    assert batch.prompt_ids.shape[0] == 8 and torch.equal(batch.prompt_ids[0], batch.prompt_ids[3])
    assert not torch.equal(batch.prompt_ids[0], batch.prompt_ids[4])
    assert len({tuple(row.tolist()) for row in batch.completion_ids[:4]}) > 1  # 4 samples, not 4 copies


def test_sample_categorical_frequencies_match_the_distribution():
    """200k draws from a distribution with zeros: zero-probability entries never drawn, frequencies within
    5 standard errors of the probabilities (float64 probabilities unnormalised on purpose)."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]], dtype=torch.float64) * 3.0
    draws = sample_categorical(probs.expand(200_000, -1), torch.Generator().manual_seed(1))  # [N]
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    p = probs[0] / probs[0].sum()
    assert freq[p == 0].sum() == 0
    se = (p * (1 - p) / draws.numel()).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)


def test_sample_categorical_one_hot_and_tiny_masses():
    one_hot = torch.zeros(3, 50_000)
    one_hot[0, 0], one_hot[1, 49_999], one_hot[2, 123] = 1.0, 1.0, 1.0
    assert sample_categorical(one_hot).tolist() == [0, 49_999, 123]
    # a token holding 1e-9 of the mass next to a huge one: never drawn in 10k draws with float64 cumsum
    probs = torch.tensor([[1e-9, 1.0 - 1e-9]], dtype=torch.float64).expand(10_000, -1)
    assert (sample_categorical(probs, torch.Generator().manual_seed(0)) == 1).all()


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.3), (8, 0.5)])
def test_top_k_top_p_samples_stay_in_transformers_support(tiny, top_k, top_p):
    """Every sampled first token is inside the support that transformers' own warpers leave."""
    model, tok = tiny
    ids, mask = prompts(tok)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1].float() / 0.7  # [n, V]
    scores = logits
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    allowed = torch.isfinite(scores)  # [n, V]
    torch.manual_seed(3)
    first = decode(model, ids, mask, 64, 1, [tok.eos_token_id], tok.pad_token_id, temperature=0.7, top_k=top_k,
                   top_p=top_p).completion_ids[:, 0].view(ids.shape[0], 64)  # [n, G]
    assert allowed.gather(1, first).all()
    assert (first != first[:, :1]).any()  # more than one token drawn somewhere


def test_the_cache_keyword_is_read_through_a_peft_wrapper(tiny):
    """PEFT's forward takes ``**kwargs``: the keyword comes from the model inside (transformers 5 names it
    ``cache``; ``past_key_values`` still works there but warns at every decoding step)."""
    import inspect

    from peft import LoraConfig, get_peft_model

    from rlclip.decoding import _cache_argument

    model, _ = tiny
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    wrapped = get_peft_model(AutoModelForCausalLM.from_config(model.config),
                             LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert _cache_argument(model) == expected and _cache_argument(wrapped) == expected
