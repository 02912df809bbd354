"""Typed training configuration: one YAML recipe plus dotted CLI overrides.

- ``schema``: the dataclasses, one per recipe section, each field documented;
- ``loading``: YAML + overrides -> ``TrainConfig`` (``load_config``), and back (``to_yaml``);
- ``validation``: ranges, choices and cross-field rules, checked before any model loads.
"""

from rlclip.config.loading import flat_scalars, load_config, parse_overrides, to_yaml
from rlclip.config.schema import (
    AdvantageConfig,
    CriticConfig,
    DataConfig,
    EntropyConfig,
    EvalSettings,
    LoggingConfig,
    LoraSettings,
    ModelConfig,
    RewardConfig,
    RewardFuncConfig,
    RolloutConfig,
    TrainConfig,
    TrainingConfig,
)
from rlclip.config.validation import (
    BACKENDS,
    build_clipper_from_config,
    build_objective_from_config,
    check_backend_installed,
    validate,
)
from rlclip.user_code import import_user_modules

__all__ = [
    "BACKENDS", "AdvantageConfig", "CriticConfig", "DataConfig", "EntropyConfig", "EvalSettings", "LoggingConfig",
    "LoraSettings", "ModelConfig", "RewardConfig", "RewardFuncConfig", "RolloutConfig", "TrainConfig",
    "TrainingConfig", "build_clipper_from_config", "build_objective_from_config", "check_backend_installed",
    "flat_scalars", "import_user_modules", "load_config", "parse_overrides", "to_yaml", "validate",
]
