"""Prompt data sets for training and evaluation.

Sources: ``synthetic`` arithmetic, the benchmarks (gsm8k, math500, svamp,
asdiv) and the user's own files or ``datasets`` data sets (jsonl, json,
parquet, hf; see ``rlclip.data.files``). Every source yields records with a
``prompt`` (chat messages or text) and other columns (``answer``, ``suite``,
metadata) that reach the reward functions as keyword arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError

if TYPE_CHECKING:
    from rlclip.config import DataConfig

BENCHMARKS = ("gsm8k", "math500", "svamp", "asdiv")
FILE_SOURCES = ("jsonl", "json", "parquet", "hf")  # the user's own prompts: rlclip/data/files.py
SOURCES = ("synthetic", *BENCHMARKS, *FILE_SOURCES)


def load_records(cfg: DataConfig, seed: int = 0) -> list[dict[str, Any]]:
    """Records for the configured source, checked to be usable for training."""
    if cfg.name == "synthetic":
        from rlclip.data import synthetic

        records = synthetic.generate(cfg.num_examples, seed=seed, min_value=cfg.min_value, max_value=cfg.max_value,
                                     num_terms=cfg.num_terms, operations=cfg.operations,
                                     instruction=cfg.instruction, chat=cfg.chat)
    elif cfg.name in FILE_SOURCES:
        from rlclip.data.files import load_file_records

        records = load_file_records(cfg)
    elif cfg.name in BENCHMARKS:
        from rlclip.data.suites import load_suite

        records = load_suite(cfg.name, cfg.path, split=cfg.split, instruction=cfg.instruction, limit=cfg.limit)
    else:
        raise ConfigError(f"unknown data.name {cfg.name!r}; choose one of {', '.join(SOURCES)}")
    if cfg.limit is not None:
        records = records[: cfg.limit]
    check_records(records, f"data source {cfg.name!r}")
    return records


def check_records(records: list[dict[str, Any]], where: str) -> None:
    """Non-empty, and every record has a ``prompt`` and the same columns."""
    if not records:
        raise ConfigError(f"{where} is empty; point data.path at a file with records or raise data.limit")
    columns = set(records[0])
    if "prompt" not in columns:
        raise ConfigError(f"{where} has no 'prompt' column (columns: {', '.join(sorted(columns))}); "
                          "each record needs a prompt")
    for i, record in enumerate(records):
        if set(record) != columns:
            missing = sorted(columns - set(record)) or sorted(set(record) - columns)
            raise ConfigError(f"{where}: record {i} differs in columns {missing}; every record needs the same columns")
