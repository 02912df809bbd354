"""rlclip/parallel.py without launching anything: the DeepSpeed config the trainer writes, and its refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from conftest import tiny_config
from rlclip.errors import ConfigError
from rlclip.parallel import Layout, build_accelerator


def deepspeed_accelerator(stage: int, ds_config: dict) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=ds_config)
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_deepspeed_config_is_filled_from_the_recipe(tmp_path):
    """accelerate's ``auto`` values would fail (micro-batch) or clip at 1.0; the recipe's values go in."""
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    layout = Layout(deepspeed_accelerator(3, ds))
    layout.configure(tiny_config(tmp_path, "train.micro_batch_size=3", "train.max_grad_norm=0.5"))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.5 and "train_batch_size" not in ds
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert layout.zero_stage == 3 and not layout.fused_optimizer

    ds2 = {"zero_optimization": {"stage": 2}}
    Layout(deepspeed_accelerator(2, ds2)).configure(
        tiny_config(tmp_path, "train.max_grad_norm=0", "train.grad_clip={name: norm, max_norm: 2.0}"))
    assert ds2["gradient_clipping"] == 2.0 and "stage3_gather_16bit_weights_on_model_save" not in ds2["zero_optimization"]


@pytest.mark.parametrize("override, words", [
    ("train.grad_clip={name: zclip}", "train.grad_clip 'zclip'"),
    ("advantage.name=gae", "PPO mode"),
])
def test_deepspeed_refuses_what_it_cannot_do_in_one_line(tmp_path, override, words):
    layout = Layout(deepspeed_accelerator(2, {}))
    with pytest.raises(ConfigError, match=words) as info:
        layout.configure(tiny_config(tmp_path, override))
    assert "\n" not in str(info.value)


def test_ddp_layout_leaves_the_config_alone(tmp_path):
    acc = SimpleNamespace(distributed_type=DistributedType.NO, state=SimpleNamespace(deepspeed_plugin=None))
    layout = Layout(acc)
    layout.configure(tiny_config(tmp_path, "train.grad_clip={name: zclip}"))  # fine without DeepSpeed
    assert not layout.deepspeed and layout.zero_stage == 0 and layout.fused_optimizer


def test_deepspeed_launch_without_deepspeed_installed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr("rlclip.parallel.importlib_missing", lambda name: True)
    with pytest.raises(ConfigError, match="pip install deepspeed"):
        build_accelerator(None, "unused")


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
            "FSDP_OFFLOAD_PARAMS": "true", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, MyBlock"}


def cpu_accelerator(mixed_precision: str = "no") -> SimpleNamespace:
    """What accelerate builds on CPU for an FSDP launch: MULTI_CPU (FSDP stays off there)."""
    return SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision=mixed_precision,
                           state=SimpleNamespace(deepspeed_plugin=None))


def test_fsdp_launch_is_detected_from_the_launch_environment(monkeypatch):
    """accelerate launch passes fsdp_config as FSDP_* variables; the layout reads them, not accelerate's state."""
    from rlclip.fsdp import FsdpSettings

    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    layout = Layout(cpu_accelerator("bf16"))
    assert layout.fsdp == FsdpSettings(reshard_after_forward=False, offload_params=True,
                                       layer_classes=("LlamaDecoderLayer", "MyBlock"), bf16=True)
    assert not layout.deepspeed and not layout.fused_optimizer  # DTensor shards: no fused AdamW
    model = SimpleNamespace()  # no_sync enters nothing: FSDP reduce-scatters every micro-batch
    with layout.no_sync((model, None), last=False) as stack:
        assert not stack._exit_callbacks
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    assert Layout(cpu_accelerator()).fsdp == FsdpSettings(offload_params=True)  # defaults: the model's layers


def test_no_fsdp_environment_is_not_fsdp(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    layout = Layout(cpu_accelerator())
    assert layout.fsdp is None and layout.fused_optimizer


@pytest.mark.parametrize("env, words", [
    ({"FSDP_VERSION": "1"}, "set fsdp_version: 2"),
    ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "model.gradient_checkpointing: true"),
])
def test_fsdp_settings_rlclip_does_not_run_are_refused_in_one_line(monkeypatch, env, words):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=words) as info:
        build_accelerator(None, "unused")  # before any process group starts
    assert "\n" not in str(info.value)


def test_fsdp_refuses_the_ppo_critic_in_one_line(monkeypatch, tmp_path):
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    layout = Layout(cpu_accelerator())
    layout.configure(tiny_config(tmp_path, "train.grad_clip={name: zclip}"))  # rlclip clips sharded gradients
    with pytest.raises(ConfigError, match="PPO mode") as info:
        layout.configure(tiny_config(tmp_path, "advantage.name=gae"))
    assert "\n" not in str(info.value) and "FSDP" in str(info.value)
