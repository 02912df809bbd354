"""The accelerate configs in recipes/accelerate/ parse with accelerate's own loaders (nothing is launched).

Each file goes through the steps ``accelerate launch --config_file F -m rlclip train ...``
takes before it starts processes: ``load_config_from_file`` (unknown top-level
keys raise), the launch-argument validation, the environment handed to the
workers, and the FSDP / DeepSpeed plugin each worker builds from that
environment.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import ROOT

accelerate = pytest.importorskip("accelerate")
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file  # noqa: E402
from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from accelerate.utils.launch import (  # noqa: E402
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
    prepare_simple_launcher_cmd_env,
)

CONFIG_DIR = ROOT / "recipes/accelerate"
EXPECTED = {
    "single_gpu.yaml": DistributedType.NO,
    "multi_gpu.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
}
LAUNCH_TAIL = ["-m", "rlclip", "train", "--config", "recipes/gsm8k/grpo_troll.yaml"]


def _launch(path: Path):
    """Parse ``accelerate launch --config_file path -m rlclip train ...`` as the CLI does; return (args, env)."""
    args = launch_command_parser().parse_args(["--config_file", str(path), *LAUNCH_TAIL])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as launch_command() sets it
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def _plugin(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, cls):
    """The plugin a launched worker builds from its environment."""
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return cls()


def test_the_five_configs_exist():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name: str):
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type == EXPECTED[name]
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False and config.num_machines == 1
    assert config.num_processes == (1 if name == "single_gpu.yaml" else 8)
    assert ClusterConfig.from_yaml_file(str(CONFIG_DIR / name)).to_dict() == config.to_dict()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_launch_arguments(name: str):
    """accelerate copies fsdp_config / deepspeed_config keys onto launch arguments without checking them."""
    config = load_config_from_file(str(CONFIG_DIR / name))
    dests = {action.dest for action in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    unknown = [k for k in nested if k not in dests]
    assert not unknown, f"{name}: keys accelerate launch does not know: {unknown}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_environment(name: str):
    args, env = _launch(CONFIG_DIR / name)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.use_fsdp == (name == "fsdp.yaml")
    assert args.use_deepspeed == name.startswith("deepspeed")
    assert args.multi_gpu == (name == "multi_gpu.yaml")
    assert args.num_processes == (1 if name == "single_gpu.yaml" else 8)


def test_fsdp_is_fsdp2_sharded_per_decoder_layer(monkeypatch: pytest.MonkeyPatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    _, env = _launch(CONFIG_DIR / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    plugin = _plugin(env, monkeypatch, FullyShardedDataParallelPlugin)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.transformer_cls_names_to_wrap is None  # the model's _no_split_modules decide
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    # Every rank loads the weights: the frozen reference model is loaded outside accelerate.prepare.
    assert plugin.cpu_ram_efficient_loading is False
    assert plugin.activation_checkpointing is False


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_plugin(name: str, stage: int, monkeypatch: pytest.MonkeyPatch):
    from accelerate.utils import DeepSpeedPlugin

    _, env = _launch(CONFIG_DIR / name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)
    plugin = _plugin(env, monkeypatch, DeepSpeedPlugin)
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == stage and ds["zero_optimization"]["stage"] == stage
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 1.0
    assert plugin.zero3_init_flag is (stage == 3)
    # ZeRO-3: save_pretrained goes through accelerate's get_state_dict, which needs the 16-bit gather.
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
