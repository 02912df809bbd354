"""``model.compile`` (rlclip/compiling.py): compiled decoder layers against the same layers run eagerly.

Tolerances. The compiled graph computes the same float32 operations, but inductor fuses and reorders
them (RMSNorm's reduction, the rotary embedding, SiLU times the up projection), so results differ by
rounding: measured here about 3e-7 on log-probs and up to 4e-5 on gradient entries of magnitude ~1
(gradients sum over every position, each sum reordered). Log-probs are checked to 1e-5 absolute, gradients
to 1e-4 relative to the largest entry of each tensor: 10 times the rounding seen, far below any
real difference (a wrong graph changes values at the 1e-2 level). Greedy decoding must give the same
tokens: the tiny model's top-2 logit gaps are far above 1e-6.

All tests run in one process (``xdist_group``), since compiling on CPU takes seconds per graph and the
compiled graphs are shared by every model with the same layer class.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config, train_tiny

pytestmark = pytest.mark.xdist_group("compile")


def _pair(layers: int = 2):
    """Two copies of one random tiny Llama: (to compile, eager reference)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ref.load_state_dict(model.state_dict())
    return model, ref


def _logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_pass_matches_eager(checkpointing):
    """Log-probs and gradients of the compiled layers equal eager ones, for two sequence lengths (one graph:
    dynamic shapes), with and without activation checkpointing; both layers share that graph."""
    from rlclip.compiling import compile_policy

    model, ref = _pair()
    if checkpointing:
        for m in (model, ref):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    names = list(model.state_dict())
    compile_policy(model, "train")
    assert list(model.state_dict()) == names  # in place: names and parameters unchanged
    before = _unique_graphs()
    for length in (9, 13):
        ids = torch.randint(2, 97, (3, length))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # a left-padded row
        got, want = _logprobs(model, ids, mask), _logprobs(ref, ids, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        model.zero_grad(), ref.zero_grad()
        got.sum().backward(), want.sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            scale = q.grad.abs().max().item()
            assert (p.grad - q.grad).abs().max().item() <= 1e-4 * max(scale, 1e-3), name
    assert _unique_graphs() - before <= 1  # no recompile per layer or per length (0 when cached)


def test_greedy_decoding_same_tokens():
    """rlclip's decoding loop (DynamicCache, KV length growing every step) with compiled layers: the same
    greedy tokens and sampler log-probs; 4 layers compile no more graphs than 2 would (no graph per layer)."""
    from rlclip.compiling import compile_policy, uncompile_policy
    from rlclip.decoding import decode

    model, ref = _pair(layers=4)
    model.eval(), ref.eval()
    compile_policy(model, "decode")
    ids = torch.randint(2, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    before = _unique_graphs()
    for _ in range(2):
        got = decode(model, ids, mask, group_size=2, max_new_tokens=12, eos_token_ids=[1], pad_token_id=0,
                     temperature=0)
        want = decode(ref, ids, mask, group_size=2, max_new_tokens=12, eos_token_ids=[1], pad_token_id=0,
                      temperature=0)
        assert torch.equal(got.completion_ids, want.completion_ids)
        torch.testing.assert_close(got.sampler_logprobs, want.sampler_logprobs, atol=1e-5, rtol=0)
    assert _unique_graphs() - before <= 8  # 4 frames (the cache update is a graph break) x prefill / step
    uncompile_policy(model)
    assert "forward" not in model.model.layers[0].__dict__


def test_mode_selects_calls():
    """``decode`` leaves uncached calls eager and compiles cached ones; ``train`` the other way round (dynamo's
    caches emptied first, so that a call that should compile must make a new graph)."""
    from rlclip.compiling import compile_policy

    ids = torch.randint(2, 97, (1, 5))
    for mode, compiled_call in (("decode", True), ("train", False)):
        torch._dynamo.reset()
        model, _ = _pair()
        compile_policy(model, mode)
        with torch.no_grad():
            before = _unique_graphs()
            model(input_ids=ids, use_cache=False)
            uncached = _unique_graphs() - before
            before = _unique_graphs()
            model(input_ids=ids, use_cache=True)
            cached = _unique_graphs() - before
        assert (cached > 0, uncached > 0) == (compiled_call, not compiled_call), mode


def test_trainer_with_lora_checkpointing_and_compile(tmp_path):
    """A run with LoRA, activation checkpointing and ``model.compile=all`` trains, logs ``time/compile_s``
    on its first step and not once compiling is done, and saves an adapter with PEFT's usual names."""
    train_tiny(tmp_path, "model.compile=all", "lora.enabled=true", "model.gradient_checkpointing=true", steps=2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["time/compile_s"] > 0
    assert "time/compile_s" not in lines[-1]
    assert all(line["loss"] is not None for line in lines)
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("overrides, message", [
    (["model.compile=fast"], "unknown model.compile 'fast'; choose none, train, decode or all"),
    (["model.compile=decode", "rollout.backend=vllm_colocate"], "model.compile=decode compiles the HF decoding"),
])
def test_config_errors(tmp_path, overrides, message):
    from rlclip.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *overrides)
