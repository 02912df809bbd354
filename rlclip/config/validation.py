"""Checks of a ``TrainConfig`` before anything loads: ranges, choices and cross-field rules.

Every failure is one ``ConfigError`` line naming the key, the bad value and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Any

from rlclip.config.ranges import check_ranges
from rlclip.config.schema import EntropyConfig, ModelConfig, RolloutConfig, TrainConfig
from rlclip.errors import ConfigError


def validate(config: TrainConfig) -> None:
    """Every range and choice (``rlclip.config.ranges``), then the cross-field rules; raises ConfigError.

    Runs in ``load_config``, before any model, tokenizer or data set loads.
    """
    _check_backend(config.rollout, config.model)
    check_ranges(config)
    if config.rollout.min_new_tokens > config.rollout.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens={config.rollout.min_new_tokens} must lie in [0, "
                          f"rollout.max_new_tokens={config.rollout.max_new_tokens}]")
    if config.data.min_value > config.data.max_value:
        raise ConfigError(f"data.min_value={config.data.min_value} is above data.max_value={config.data.max_value}; "
                          "swap them")
    rollout_size = config.rollout.prompts_per_step * config.rollout.group_size
    if rollout_size % config.train.mini_batches:
        raise ConfigError(f"train.mini_batches={config.train.mini_batches} does not divide the "
                          f"{rollout_size} completions per rollout (prompts_per_step x group_size)")
    if config.advantage.name != "gae" and config.rollout.group_size < 2:
        raise ConfigError(f"advantage.name={config.advantage.name} needs rollout.group_size >= 2 (a group "
                          "baseline of one sample is undefined); raise group_size or use advantage.name=gae")
    if config.advantage.name == "gae" and config.advantage.multi_reward != "sum_then_normalize":
        raise ConfigError(f"advantage.multi_reward={config.advantage.multi_reward} normalises each reward function "
                          "within its group; use a group estimator (advantage.name grpo, dr_grpo or rloo) with it")
    _check_tracker(config.logging.report_to)
    _check_entropy(config.entropy)
    if not config.reward.funcs:
        raise ConfigError("reward.funcs is empty; give at least one reward function")
    _check_offpolicy(config, build_objective_from_config(config))
    build_clipper_from_config(config)
    _check_in_backward(config)


def _check_offpolicy(config: TrainConfig, objective: Any) -> None:
    """What a pi_prox without a forward pass (bypass, loglinear) cannot give (docs/offpolicy.md)."""
    rollout = config.rollout
    if rollout.proximal == "recompute":
        return
    if "support" in objective.needs:
        raise ConfigError(f"objective {config.objective.get('name')} needs the old policy's sparse support, which "
                          f"only a forward pass gives; rollout.proximal: {rollout.proximal} skips it. Use "
                          "rollout.proximal: recompute")
    if rollout.proximal == "bypass" and (rollout.is_batch_normalize or rollout.rejection):
        raise ConfigError("rollout.proximal: bypass makes pi_prox the sampler, so pi_prox / mu is 1 and "
                          "rollout.is_batch_normalize and rollout.rejection would do nothing; use rollout.proximal: "
                          "recompute, or drop them")
    if rollout.proximal != "loglinear":
        return
    if rollout.is_batch_normalize or rollout.rejection:
        raise ConfigError("rollout.proximal: loglinear makes pi_prox at each update step from that step's forward, "
                          "so batch statistics (rollout.is_batch_normalize, rollout.rejection) are not defined before "
                          "the update; use rollout.proximal: recompute or bypass, or drop them")
    if config.advantage.kl_in_reward > 0:
        raise ConfigError("advantage.kl_in_reward needs pi_prox when the rollout is scored, which "
                          "rollout.proximal: loglinear only makes at update time; use recompute or bypass")


def _check_in_backward(config: TrainConfig) -> None:
    """Optimizer-in-backward steps a parameter the moment its gradient is done: nothing may need them all."""
    train = config.train
    if not train.optimizer_in_backward:
        return
    if train.max_grad_norm or train.grad_clip:
        raise ConfigError("train.optimizer_in_backward cannot clip by the global gradient norm (it needs every "
                          "gradient before any step); set train.max_grad_norm: 0 and leave train.grad_clip unset, "
                          "or turn optimizer_in_backward off")
    rows = config.rollout.prompts_per_step * config.rollout.group_size // train.mini_batches
    if rows > train.micro_batch_size:
        raise ConfigError(f"train.optimizer_in_backward needs one backward per optimizer step, but a mini-batch of "
                          f"{rows} sequences is {math.ceil(rows / train.micro_batch_size)} micro-batches of "
                          f"{train.micro_batch_size}; set train.micro_batch_size: {rows} (or raise "
                          "train.mini_batches), or turn optimizer_in_backward off")
    if config.advantage.name == "gae":
        raise ConfigError("train.optimizer_in_backward does not step the PPO critic (advantage.name: gae); use a "
                          "group advantage (grpo, dr_grpo, rloo) or turn optimizer_in_backward off")


BACKENDS = ("hf", "vllm_colocate", "vllm_server")


def _check_backend(rollout: RolloutConfig, model: ModelConfig) -> None:
    """The generation backend and its importance-sampling settings; a vLLM backend needs vllm installed."""
    from rlclip.is_correction import check_correction_settings

    if rollout.backend not in BACKENDS:
        raise ConfigError(f"unknown rollout.backend {rollout.backend!r}; choose one of {', '.join(BACKENDS)}")
    check_correction_settings(rollout.is_mode, rollout.is_cap, rollout.is_floor, rollout.is_batch_normalize,
                              rollout.rejection)
    if rollout.backend != "hf" and model.gguf_file:
        raise ConfigError(f"rollout.backend={rollout.backend} cannot load model.gguf_file; use rollout.backend: hf "
                          "or convert the model to safetensors")
    if rollout.backend != "hf" and model.compile == "decode":
        raise ConfigError(f"model.compile=decode compiles the HF decoding loop, but rollout.backend={rollout.backend} "
                          "generates with vLLM; use model.compile: train (or all, which then compiles training only)")
    check_backend_installed(rollout.backend)


def check_backend_installed(backend: str) -> None:
    """A vLLM backend without the vllm package is a one-line error before any model loads."""
    if backend != "hf" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.backend={backend} needs the vllm package, which is not installed; "
                          "pip install vllm, or set rollout.backend: hf")


def _check_tracker(report_to: str) -> None:
    """A tracker whose package is missing is an error before training, not a warning and an untracked run."""
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"logging.report_to={report_to} needs the {packages[0]} package, which is not installed; "
                          f"pip install {packages[0]}, or set logging.report_to: none")


def _check_entropy(entropy: EntropyConfig) -> None:
    if not math.isfinite(entropy.coef):
        raise ConfigError(f"entropy.coef must be a finite number, got {entropy.coef}")
    if entropy.adaptive:
        if entropy.coef_min > entropy.coef_max:
            raise ConfigError(f"entropy.coef_min={entropy.coef_min} and entropy.coef_max={entropy.coef_max} must "
                              "satisfy 0 <= coef_min <= coef_max")


def build_clipper_from_config(config: TrainConfig):
    """The gradient clipper of ``train.grad_clip`` (default: norm clipping at ``train.max_grad_norm``)."""
    from rlclip.grad_clip import build_clipper

    settings = dict(config.train.grad_clip or {"name": "norm"})
    name = settings.pop("name", None)
    if not name:
        raise ConfigError("train.grad_clip.name is missing; e.g. train: {grad_clip: {name: zclip}}")
    if name == "norm":
        settings.setdefault("max_norm", config.train.max_grad_norm)
    return build_clipper(name, **settings)


def build_objective_from_config(config: TrainConfig):
    """The objective named in ``config.objective`` with its settings."""
    from rlclip.objectives import build_objective

    settings = dict(config.objective)
    name = settings.pop("name", None)
    if not name:
        raise ConfigError("objective.name is missing; e.g. objective: {name: ratio_clip}")
    if settings.get("agg") == "seq_mean_token_sum_norm" and settings.get("agg_norm_len") is None:
        settings["agg_norm_len"] = config.rollout.max_new_tokens
    return build_objective(name, **settings)
