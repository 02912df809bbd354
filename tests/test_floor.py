"""eval/bench/floor.py's FLOP count, by hand on the tiny model (the benchmark's floor_ratio rests on it)."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "eval/bench"))


def test_step_floor_counts_by_hand():
    from floor import step_floor
    from transformers import AutoModelForCausalLM

    from rlclip.modeling import resolve_tiny

    model = AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny"))  # hidden 64, 2 layers, 4 heads, 2 kv, vocab 99
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (64, 2, 99)
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate 64x128, up 64x128, down 128x64
    linear = 2 * (4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192)
    assert linear == 73728
    # one prompt of 3 tokens, 2 completions of 2 tokens: 2 sequences of 5 tokens
    train = 6 * linear * 10 + 2 * 12 * 2 * 25 * 64 + 6 * 64 * 99 * 2 * 2
    prefill = 2 * linear * 2 * 3 + 2 * 64 * 99 * 2
    weight_bytes = sum(p.numel() for p in model.parameters()) * 4
    peak, bandwidth = 1.0, 2.0  # GFLOP/s, GB/s
    per_token = max((2 * linear * 2 + 2 * 64 * 99 * 2) / 1e9, weight_bytes / 2e9)
    out = step_floor(model, [3], 2, 2, peak, bandwidth)
    assert out["train_tflop"] == pytest.approx(train / 1e12, rel=1e-12)
    assert out["train_floor_s"] == pytest.approx(train / 1e9, rel=1e-12)
    assert out["generation_floor_s"] == pytest.approx(prefill / 1e9 + 2 * per_token, rel=1e-12)
    assert out["floor_s"] == pytest.approx(out["train_floor_s"] + out["generation_floor_s"], rel=1e-12)
    # shared: the prompt's 3 tokens once (not once per completion) in training and in the prefill
    shared_train = 6 * linear * (3 + 2 * 2) + 2 * 12 * 2 * 25 * 64 + 6 * 64 * 99 * 2 * 2
    shared_prefill = 2 * linear * 3 + 2 * 64 * 99 * 2
    assert out["shared_train_tflop"] == pytest.approx(shared_train / 1e12, rel=1e-12)
    assert out["shared_floor_s"] == pytest.approx((shared_train + shared_prefill) / 1e9 + 2 * per_token, rel=1e-12)
