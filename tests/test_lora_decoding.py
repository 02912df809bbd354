"""LoRA merged for decoding (rlclip/lora_decoding.py): the same function, the base weights untouched after."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config

RECORDS = [{"prompt": [{"role": "user", "content": "1 + 2 ="}]}, {"prompt": [{"role": "user", "content": "4 + 4 ="}]}]


@pytest.fixture
def lora_model():
    """The tiny model in float64 with LoRA adapters whose B is random (PEFT starts B at 0: no effect)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlclip.modeling import load_tokenizer, resolve_tiny

    path = resolve_tiny("tiny")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    return model.eval(), load_tokenizer(path)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_forward_equals_the_adapters_and_the_base_comes_back_bit_for_bit(lora_model):
    from rlclip.lora_decoding import merged_for_decoding

    model, _ = lora_model
    ids = torch.randint(3, 90, (3, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    unmerged = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters matter
    with merged_for_decoding(model) as count:
        merged = logits(model, ids)
        assert count == 14  # 7 linear layers x 2 transformer layers
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-12)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, param in after.items():
        assert param is objects[name], name  # the same parameter objects (the optimizer holds them)
        assert torch.equal(param, before[name]), name  # and bit for bit the same values
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=0)  # adapters back on


def test_disabled_or_plain_models_are_left_alone(lora_model):
    from transformers import AutoModelForCausalLM

    from rlclip.lora_decoding import merged_for_decoding
    from rlclip.modeling import resolve_tiny

    model, _ = lora_model
    with merged_for_decoding(model, enabled=False) as count:
        assert count == 0
    with merged_for_decoding(AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny"))) as count:
        assert count == 0


def test_an_error_inside_still_restores_the_weights(lora_model):
    from peft.tuners.lora import LoraLayer

    from rlclip.lora_decoding import merged_for_decoding

    model, _ = lora_model
    ids = torch.randint(3, 90, (2, 6))
    unmerged = logits(model, ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), merged_for_decoding(model):
        raise RuntimeError("boom")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=0)


def test_hf_backend_samples_the_same_completions_merged(lora_model):
    """Same seed, same completions and (float64) the same sampler log-probs to 1e-10, merged or not."""
    from accelerate import Accelerator

    from rlclip.generation import HFGenerator
    from rlclip.rollout import SamplingSettings

    model, tokenizer = lora_model
    settings = SamplingSettings(group_size=4, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0,
                                max_prompt_length=None, min_new_tokens=0)
    out = {}
    for merge in (False, True):
        torch.manual_seed(3)
        out[merge] = HFGenerator(Accelerator(cpu=True), merge_lora=merge).generate(model, tokenizer, RECORDS,
                                                                                     settings)
    assert torch.equal(out[True].completion_ids, out[False].completion_ids)
    torch.testing.assert_close(out[True].sampler_logprobs, out[False].sampler_logprobs, rtol=0, atol=1e-10)


def test_the_setting_reaches_the_backend(tmp_path):
    from accelerate import Accelerator

    from rlclip.generation import build_generator

    assert build_generator(tiny_config(tmp_path), Accelerator(cpu=True)).merge_lora is True
    off = tiny_config(tmp_path, "lora.merge_for_decoding=false")
    assert build_generator(off, Accelerator(cpu=True)).merge_lora is False
