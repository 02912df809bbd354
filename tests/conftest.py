"""Shared fixtures: configs for the tiny model, and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_config(tmp_path: Path, *overrides: str):
    """The smoke recipe with quiet output in ``tmp_path`` plus dotted overrides."""
    from rlclip.config import load_config

    base = [f"output_dir={tmp_path}", "logging.progress_bar=false"]
    return load_config(ROOT / "recipes/smoke/tiny.yaml", base + list(overrides))


@pytest.fixture
def root() -> Path:
    return ROOT
