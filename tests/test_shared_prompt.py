"""The shared-prompt forward (rlclip/shared_prompt.py) against the plain forward: values and gradients in
float64, both attention implementations, left-padded prompts, early EOS, partial groups, shuffled rows,
gradient checkpointing and LoRA; the layout by hand; the cost rule."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlclip.modeling import resolve_tiny
from rlclip.policy import completion_hidden_states, completion_logprobs, position_ids_from_mask
from rlclip.shared_prompt import pack, prompt_groups, worth_packing


def _model(attn: str = "sdpa", dtype=torch.float64):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny"), attn_implementation=attn,
                                                dtype=dtype)


@contextmanager
def _rows_seen(decoder):
    """The batch size of every forward of ``decoder`` inside the block (3 when the test batch is packed)."""
    rows = []
    handle = decoder.register_forward_hook(lambda m, a, k, o: rows.append(k["input_ids"].shape[0]), with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _batch(vocab: int, seed: int = 0, left_pad: bool = True):
    """3 prompts of 12 tokens (one left-padded) x group sizes 3, 2, 1 (shuffled rows); completions end early.

    (HF's own eager attention in float64 gives NaN on left-padded rows: its mask's float64 minimum becomes
    -inf in the float32 softmax of fully masked padding queries; hence ``left_pad`` False for eager.)"""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (3, 12), generator=g)  # [3, P]
    pmask = torch.ones(3, 12, dtype=torch.long)
    if left_pad:
        pmask[1, :2] = 0
        prompts[1, :2] = 0
    rows = torch.tensor([0, 1, 0, 2, 1, 0])  # which prompt each row answers, not adjacent
    cids = torch.randint(3, vocab, (6, 5), generator=g)  # [B, T]
    cmask = torch.ones(6, 5, dtype=torch.long)
    cmask[1, 3:] = 0  # ended after 3 tokens
    cmask[4, 1:] = 0  # ended after 1 token
    return prompts[rows], pmask[rows], cids, cmask, rows


def test_groups_follow_first_appearance_and_padding_counts():
    ids = torch.tensor([[5, 6], [1, 2], [5, 6], [0, 6], [1, 2]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1], [1, 1]])
    assert prompt_groups(ids, mask).tolist() == [0, 1, 0, 2, 1]
    # a padded 0 is not the token 0: [0 (pad), 6] differs from [0, 6] with the 0 real
    assert prompt_groups(torch.tensor([[0, 6], [0, 6]]), torch.tensor([[0, 1], [1, 1]])).tolist() == [0, 1]


def test_layout_by_hand():
    """Prompt [7, 8] (one left pad), completions [1, 2] and [3] (its second token masked): the packed row,
    positions, mask and the index of each predicting position, written out."""
    pid = torch.tensor([[0, 7, 8], [0, 7, 8]])
    pm = torch.tensor([[0, 1, 1], [0, 1, 1]])
    cid = torch.tensor([[1, 2], [3, 9]])
    cm = torch.tensor([[1, 1], [1, 0]])
    pos = position_ids_from_mask(torch.cat([pm, cm], 1))
    b = pack(pid, pm, cid, cm, pos, torch.tensor([0, 0]), pad_token_id=0)
    assert b.input_ids.tolist() == [[7, 8, 1, 2, 3]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    allowed = [[1, 0, 0, 0, 0],
               [1, 1, 0, 0, 0],
               [1, 1, 1, 0, 0],
               [1, 1, 1, 1, 0],
               [1, 1, 0, 0, 1]]  # completion 2 sees the prompt and itself, not completion 1
    assert b.attention_mask[0, 0].long().tolist() == allowed
    assert b.index.tolist() == [[1, 2], [1, 4]]  # token 0 of each from the prompt's last token (position 1)
    assert b.valid.tolist() == [[True, True], [True, False]]
    additive = pack(pid, pm, cid, cm, pos, torch.tensor([0, 0]), 0, additive_dtype=torch.float32).attention_mask
    assert torch.equal(additive == 0, b.attention_mask)
    assert additive.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hidden_states_and_gradients_equal_the_plain_forward_float64(attn):
    """The decoder's output at every real completion position, and the gradient of a random functional of it
    with respect to every weight, in float64.

    Not to 1e-12: transformers' Llama runs RMSNorm and RoPE in float32 even in a float64 model, so the order of
    the float sums (which differs between the layouts) shows at float32's relative 1e-7. A wrong position,
    mask or gradient path is off by orders of magnitude more (a finite difference agrees to 1e-3 only, for
    the same reason)."""
    model = _model(attn)
    pid, pm, cid, cm, _ = _batch(model.config.vocab_size, left_pad=attn == "sdpa")
    probe = torch.randn(*cid.shape, model.config.hidden_size, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3))  # [B, T, H]
    out = {}
    for shared in (False, True):
        model.zero_grad()
        with _rows_seen(model.model) as rows:
            hidden = completion_hidden_states(model, pid, pm, cid, cm, shared_prompt=shared)  # [B, T, H]
        assert rows == [3 if shared else 6]  # packed: one row per prompt
        real = cm.bool()
        (hidden * probe)[real].sum().backward()
        out[shared] = hidden[real].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    for name, grad in out[False][1].items():
        assert _relative_error(out[True][1][name], grad) < 1e-6, name


def test_logprobs_entropy_and_their_gradients_equal_the_plain_forward():
    """Through the chunked float32 head: the same log-probs and entropy, gradients to float32 rounding."""
    model = _model()
    pid, pm, cid, cm, _ = _batch(model.config.vocab_size)
    out = {}
    for shared in (False, True):
        model.zero_grad()
        res = completion_logprobs(model, pid, pm, cid, cm, need_entropy=True, entropy_grad=True,
                                  shared_prompt=shared)
        real = cm.bool()
        ((res["logprobs"] + 0.3 * res["entropy"]) * real).sum().backward()
        out[shared] = res["logprobs"][real], res["entropy"][real], [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=1e-6)
    for a, b in zip(out[True][2], out[False][2]):
        assert _relative_error(a, b) < 1e-5


def test_packing_actually_runs_and_changes_masked_positions_only():
    """A forward hook sees 3 packed rows (not 6), and only masked positions differ from the plain values."""
    model = _model()
    pid, pm, cid, cm, _ = _batch(model.config.vocab_size)
    shapes = []
    handle = model.model.register_forward_hook(lambda m, a, k, o: shapes.append(tuple(k["input_ids"].shape)),
                                               with_kwargs=True)
    with torch.no_grad():
        shared = completion_logprobs(model, pid, pm, cid, cm, shared_prompt=True)["logprobs"]
        plain = completion_logprobs(model, pid, pm, cid, cm)["logprobs"]
    handle.remove()
    assert shapes[0][0] == 3 and shapes[1] == (6, 17)
    assert shapes[0][1] == 12 + 5 + 5 + 5  # longest packed row: prompt 0 and its 3 completions
    assert not torch.allclose(shared[~cm.bool()], plain[~cm.bool()])


def test_gradient_checkpointing_and_lora_keep_the_gradients_float64():
    from peft import LoraConfig, get_peft_model

    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False))
    model.train()
    pid, pm, cid, cm, _ = _batch(model.config.vocab_size, seed=1)
    grads = {}
    for shared in (False, True):
        model.zero_grad()
        with _rows_seen(model.get_base_model().model) as rows:
            hidden = completion_hidden_states(model, pid, pm, cid, cm, shared_prompt=shared)  # [B, T, H]
        assert rows == [3 if shared else 6]  # packed through PEFT and checkpointing too
        hidden[cm.bool()].sum().backward()
        grads[shared] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for a, b in zip(grads[True], grads[False]):
        assert _relative_error(a, b) < 1e-6


def test_cost_rule_packs_long_prompts_not_long_completions():
    model = _model()
    groups = torch.zeros(8, dtype=torch.long)
    long_prompt = worth_packing(model, groups, torch.ones(8, 200), torch.ones(8, 20))
    long_completions = worth_packing(model, groups, torch.ones(8, 4), torch.ones(8, 2000))
    assert long_prompt and not long_completions
