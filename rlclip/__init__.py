"""rlclip: RL fine-tuning of LLMs on verifiable rewards with pluggable trust-region objectives."""

__version__ = "0.1.0"

__all__ = ["Trainer", "TrainConfig", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import rlclip.objectives` does not pull in transformers/accelerate.
    if name == "Trainer":
        from rlclip.trainer import Trainer

        return Trainer
    if name == "TrainConfig":
        from rlclip.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'rlclip' has no attribute {name!r}")
