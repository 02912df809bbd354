"""The range of every bounded numeric config field and the choices of every enumerated one.

One table each, so that ``validate`` checks them all before any model loads and
a test can walk the dataclasses and prove that no numeric field was forgotten:
a numeric field is either in ``RANGES`` or in ``UNBOUNDED`` (with the reason).
A field set to None (where the schema allows it) is not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rlclip.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` ends are unbounded, ``open`` ends are excluded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        """``>= 1``, ``> 0`` or ``lie in (0, 1]``: what the error message says the value must be."""
        if self.high is None:
            return f"be {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"be {'<' if self.high_open else '<='} {_number(self.high)}"
        return (f"lie in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")

    def outside(self) -> float:
        """A value just outside the range (for tests)."""
        if self.low is not None:
            return self.low if self.low_open else self.low - 1
        return self.high if self.high_open else self.high + 1


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


AT_LEAST_1 = Range(low=1)
AT_LEAST_0 = Range(low=0)
POSITIVE = Range(low=0, low_open=True)
UNIT = Range(low=0, high=1)  # [0, 1]
UNIT_OPEN_HIGH = Range(low=0, high=1, high_open=True)  # [0, 1)
UNIT_OPEN_LOW = Range(low=0, high=1, low_open=True)  # (0, 1]

RANGES: dict[str, Range] = {
    "max_steps": AT_LEAST_1, "save_steps": AT_LEAST_0, "keep_last": AT_LEAST_1,
    "data.limit": AT_LEAST_1, "data.num_proc": AT_LEAST_1, "data.num_examples": AT_LEAST_1,
    "data.num_terms": AT_LEAST_1,
    "rollout.prompts_per_step": AT_LEAST_1, "rollout.group_size": AT_LEAST_1, "rollout.max_new_tokens": AT_LEAST_1,
    "rollout.min_new_tokens": AT_LEAST_0, "rollout.temperature": AT_LEAST_0, "rollout.top_p": UNIT_OPEN_LOW,
    "rollout.top_k": AT_LEAST_0, "rollout.max_prompt_length": AT_LEAST_1,
    "rollout.vllm_gpu_memory_utilization": UNIT_OPEN_LOW, "rollout.vllm_tensor_parallel_size": AT_LEAST_1,
    "rollout.vllm_server_port": Range(low=1, high=65535), "rollout.vllm_server_timeout": AT_LEAST_0,
    "rollout.is_cap": POSITIVE, "rollout.is_floor": Range(low=0), "rollout.staleness": AT_LEAST_0,
    "advantage.eps": AT_LEAST_0, "advantage.gamma": UNIT, "advantage.lam": UNIT, "advantage.kl_in_reward": AT_LEAST_0,
    "critic.learning_rate": POSITIVE, "critic.weight_decay": AT_LEAST_0, "critic.max_grad_norm": AT_LEAST_0,
    "critic.value_clip": POSITIVE, "critic.vf_coef": AT_LEAST_0, "critic.warmup_steps": AT_LEAST_0,
    "critic.lora_r": AT_LEAST_0,
    "train.num_iterations": AT_LEAST_1, "train.mini_batches": AT_LEAST_1, "train.micro_batch_size": AT_LEAST_1,
    "train.learning_rate": POSITIVE, "train.weight_decay": AT_LEAST_0, "train.adam_beta1": UNIT_OPEN_HIGH,
    "train.adam_beta2": UNIT_OPEN_HIGH, "train.warmup_steps": AT_LEAST_0, "train.max_grad_norm": AT_LEAST_0,
    "train.max_consecutive_skips": AT_LEAST_0, "train.logprob_chunk_size": AT_LEAST_1,
    "entropy.coef_min": AT_LEAST_0, "entropy.coef_max": AT_LEAST_0, "entropy.coef_delta": POSITIVE,
    "entropy.target": AT_LEAST_0,
    "eval.steps": AT_LEAST_0, "eval.limit": AT_LEAST_1, "eval.max_new_tokens": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
    "lora.r": AT_LEAST_1, "lora.alpha": AT_LEAST_1, "lora.dropout": UNIT_OPEN_HIGH, "lora.last_layers": AT_LEAST_1,
}

UNBOUNDED: dict[str, str] = {  # numeric fields with no range, and why
    "seed": "any integer seeds the generators",
    "data.min_value": "operands may be negative (only min_value <= max_value is required)",
    "data.max_value": "operands may be negative (only min_value <= max_value is required)",
    "entropy.coef": "any finite number (a negative coefficient penalises entropy); checked for finiteness",
}

# rollout.backend and rollout.is_mode are checked with their settings in validation._check_backend.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.compile": ("none", "train", "decode", "all"),
    "rollout.prompt_overflow": ("truncate_left", "reject"),
    "rollout.vllm_server_api": ("auto", "trl", "openai"),
    "rollout.proximal": ("recompute", "bypass", "loglinear"),
    "reward.on_error": ("raise", "skip"),
    "advantage.name": ("grpo", "dr_grpo", "rloo", "gae"),
    "advantage.multi_reward": ("sum_then_normalize", "normalize_then_sum"),
    "train.optimizer": ("adamw", "sgd"),
    "logging.report_to": ("none", "tensorboard", "wandb"),
}


def lookup(config: Any, key: str) -> Any:
    """The value of a dotted ``key`` in a ``TrainConfig``."""
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _choose(options: tuple[str, ...]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def check_ranges(config: Any) -> None:
    """One-line ConfigError for the first field outside its range or choices (None is always allowed)."""
    for key, allowed in RANGES.items():
        value = lookup(config, key)
        if value is not None and not allowed.contains(value):
            raise ConfigError(f"{key} must {allowed.describe()}, got {value}")
    for key, options in CHOICES.items():
        value = lookup(config, key)
        if value not in options:
            raise ConfigError(f"unknown {key} {value!r}; choose {_choose(options)}")
