"""rollout.prepack_weights (rlclip/packed_linear.py): decoding's linear layers from oneDNN-packed weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from rlclip.modeling import resolve_tiny
from rlclip.packed_linear import packable_layers, packed_for_decoding

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny"), dtype=dtype).eval()


def test_a_packed_layer_equals_linear_to_float32_rounding():
    torch.manual_seed(0)
    layer = nn.Linear(96, 300)
    x = torch.randn(7, 3, 96)  # [B, 1-3 positions, in]: decoding's and prefill's shapes
    with torch.no_grad():
        plain = layer(x)
        with packed_for_decoding(layer, rows=7) as count:
            packed = layer(x)
            assert count == 1 and "forward" in layer.__dict__
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_whole_model_logits_match_and_every_linear_is_packed():
    model = _model()
    ids = torch.randint(3, model.config.vocab_size, (4, 9))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    calls = []
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in linears]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with packed_for_decoding(model, rows=4) as count:
            packed = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    assert count == len(linears) == len(packable_layers(model)) and count > 0
    assert len(calls) == 2 * len(linears)  # hooks still fire: the module is called, only its forward differs
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)


def test_restored_after_an_exception_and_weights_untouched():
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with packed_for_decoding(model, rows=2):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_float64_and_disabled_pack_nothing():
    assert packable_layers(_model(torch.float64)) == []
    model = _model()
    with packed_for_decoding(model, rows=None) as count:
        assert count == 0 and not any("forward" in m.__dict__ for m in model.modules())


def test_trainer_rollouts_with_and_without_packing_agree(tmp_path):
    """Two seeded runs differ only in rollout.prepack_weights: the same completions, and sampler log-probs
    within float32 rounding (the tiny model's float32 weights are packed)."""
    from conftest import tiny_config
    from rlclip.trainer import Trainer

    rollouts = {}
    for flag in ("true", "false"):
        trainer = Trainer(tiny_config(tmp_path / flag, "max_steps=1", f"rollout.prepack_weights={flag}"))
        assert trainer.generator.prepack == (flag == "true") and packable_layers(trainer.model)
        torch.manual_seed(5)
        rollouts[flag] = trainer.generator.generate(trainer.model, trainer.tokenizer, trainer.records[:2],
                                                    trainer.sampling_settings())
    assert torch.equal(rollouts["true"].completion_ids, rollouts["false"].completion_ids)
    torch.testing.assert_close(rollouts["true"].sampler_logprobs, rollouts["false"].sampler_logprobs,
                               rtol=0, atol=1e-5)


def test_lora_layers_pack_the_merged_weight_without_keeping_a_merged_copy():
    """merged_for_decoding(pack_rows=...): each adapted layer decodes from packed W + s B A, its base weight
    parameter never replaced; the logits equal the adapters' to float32 rounding; all restored after."""
    from peft import LoraConfig, get_peft_model

    from rlclip.lora_decoding import merged_for_decoding

    model = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False)).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 7))
    weights = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in weights.items()}
    with torch.no_grad():
        adapters = model(input_ids=ids).logits
        with merged_for_decoding(model, pack_rows=2) as merged:
            assert merged > 0
            bases = [m for m in model.modules() if "forward" in m.__dict__]
            assert len(bases) == merged  # every adapted layer's base computes from its packed merge
            assert all(p is weights[n] for n, p in model.named_parameters())  # no merged copy swapped in
            packed = model(input_ids=ids).logits
    torch.testing.assert_close(packed, adapters, rtol=1e-4, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(torch.equal(values[n], p) for n, p in model.named_parameters())
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    assert (base - adapters).abs().max() > 1e-3  # the adapters matter, so the comparison above is not vacuous
