"""Prompt data sets from the user's own files or a Hugging Face data set (``data.name: jsonl|json|parquet|hf``).

Reading goes through the ``datasets`` library (imported here, lazily, when a file
source is configured), so large files can be streamed (``data.streaming``) and
the mapping step can run in several processes (``data.num_proc``). The result
is the same ``list[dict]`` the other sources give: each record has a ``prompt``
(text, or chat messages ``[{"role": ..., "content": ...}]``), the column named
by ``data.answer_field`` renamed to ``answer``, and every other column as it
was, so that it reaches the reward functions as a keyword argument (TRL's
convention).

Where records come from:

- ``jsonl`` / ``json`` / ``parquet``: ``data.path`` is one file, a directory
  (every file with the matching extension in it, sorted by name) or a glob
  pattern; all files are read as one data set and ``data.split`` is not used.
- ``hf``: ``data.path`` is a directory written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``, offline),
  or anything ``datasets.load_dataset`` accepts: a local directory of data
  files or a hub data set name (online only); ``data.split`` picks the split.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rlclip.data._common import fill_instruction
from rlclip.errors import ConfigError

if TYPE_CHECKING:
    from rlclip.config import DataConfig

EXTENSIONS = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}
"""The file extension each file source reads."""
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet"}
_GLOB_CHARS = "*?["
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


def load_file_records(cfg: DataConfig) -> list[dict[str, Any]]:
    """The records of a file source: the first ``data.limit`` rows (all when None), normalised.

    Raises ConfigError (one line, naming the problem and the fix) for a
    missing path, an unsupported extension, a missing prompt or answer field,
    an unusable prompt, or a file that ``datasets`` cannot read.
    """
    check_settings(cfg)
    with quiet_datasets():
        dataset = open_dataset(cfg)
        try:  # a stream is read here, lazily, so a broken file can fail this late
            dataset = first_rows(dataset, cfg.limit)
            columns = column_names(dataset)
            check_fields(columns, cfg)
            return [dict(row) for row in normalise(dataset, columns, cfg)]
        except ConfigError:
            raise
        except Exception as exc:
            raise read_error(cfg, exc) from None


def check_settings(cfg: DataConfig) -> None:
    """The settings a file source needs, checked before anything is read."""
    if not cfg.path:
        raise ConfigError(f"data.name {cfg.name} needs data.path: "
                          + ("a saved data set directory or a hub data set name" if cfg.name == "hf"
                             else f"a {EXTENSIONS[cfg.name]} file, a directory of them or a glob"))
    if cfg.num_proc is not None and cfg.num_proc < 1:
        raise ConfigError(f"data.num_proc must be >= 1 or null, got {cfg.num_proc}")
    if cfg.num_proc is not None and cfg.streaming:
        raise ConfigError("data.num_proc does not apply with data.streaming: true (a stream is mapped in one "
                          "process); unset data.num_proc or set data.streaming: false")
    if cfg.instruction is not None and "{question}" not in cfg.instruction:
        raise ConfigError(f"data.instruction {cfg.instruction!r} has no {{question}} placeholder; add it where the "
                          "prompt goes (write {{ and }} for literal braces)")


def data_files(name: str, path: str) -> list[str]:
    """The files that ``data.path`` names for source ``name``: the file, the directory's files, or the glob's matches."""
    ext = EXTENSIONS[name]
    if any(c in path for c in _GLOB_CHARS):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"data.path {path} matches no file; check the pattern, e.g. data/*{ext}")
    elif os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(ext))
        if not files:
            raise ConfigError(f"data.path {path} is a directory without {ext} files; put the data there or point "
                              "data.path at the file")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ConfigError(f"data.path {path} does not exist; pass an existing {ext} file, a directory or a glob")
    for file in files:
        if not file.endswith(ext):
            other = _name_for(file)
            fix = f"set data.name {other}" if other else "convert it to .jsonl, .json or .parquet"
            found = os.path.splitext(file)[1] or "no extension"
            raise ConfigError(f"data.path {file} has extension {found}, but data.name {name} reads {ext} files; {fix}")
    return files


def _name_for(file: str) -> str | None:
    """The file source that reads ``file``, from its extension."""
    return next((name for name, ext in EXTENSIONS.items() if file.endswith(ext)), None)


def open_dataset(cfg: DataConfig) -> Any:
    """A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) over the configured source."""
    from datasets import load_dataset

    assert cfg.path is not None  # check_settings
    path = os.path.expanduser(cfg.path)
    try:
        if cfg.name != "hf":
            return load_dataset(_BUILDERS[cfg.name], data_files=data_files(cfg.name, path), split="train",
                                streaming=cfg.streaming)
        if is_saved_dataset(path):
            return open_saved(path, cfg.split, cfg.streaming)
        looks_local = path.startswith(("/", ".")) or _name_for(path) is not None
        if looks_local and not os.path.exists(path):
            raise ConfigError(f"data.path {path} does not exist; pass a directory written by save_to_disk, "
                              "a directory of data files, or a hub data set name (org/name)")
        return load_dataset(path, split=cfg.split, streaming=cfg.streaming)
    except ConfigError:
        raise
    except Exception as exc:  # unreadable file, offline hub, unknown split...
        raise read_error(cfg, exc) from None


def read_error(cfg: DataConfig, exc: BaseException) -> ConfigError:
    """The one-line error for a source that ``datasets`` failed to read, with the first line of its reason."""
    if cfg.name == "hf":
        return ConfigError(f"could not read data set {cfg.path!r} (split {cfg.split!r}) ({first_line(exc)}); check the "
                           "name and data.split, or save it with Dataset.save_to_disk and point data.path there")
    kind = "JSON lines" if cfg.name == "jsonl" else cfg.name.upper()
    return ConfigError(f"could not read data.path {cfg.path} ({first_line(exc)}); check that it is valid {kind}")


def is_saved_dataset(path: str) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _SAVED_MARKERS)


def open_saved(path: str, split: str, streaming: bool) -> Any:
    """A data set saved with ``save_to_disk``; for a ``DatasetDict``, its ``split``."""
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(path)
    except Exception as exc:
        raise ConfigError(f"could not read the saved data set data.path {path} ({first_line(exc)}); "
                          "save it again with Dataset.save_to_disk") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ConfigError(f"data.split {split!r} is not in the saved data set {path}; "
                              f"choose one of {', '.join(dataset)}")
        dataset = dataset[split]
    return dataset.to_iterable_dataset() if streaming else dataset


def first_rows(dataset: Any, limit: int | None) -> Any:
    """The first ``limit`` rows (all when None); a stream is cut lazily, so the rest is never read."""
    if limit is None:
        return dataset
    if limit < 1:
        raise ConfigError(f"data.limit must be >= 1 or null, got {limit}")
    if hasattr(dataset, "select"):
        return dataset.select(range(min(limit, len(dataset))))
    return dataset.take(limit)


def column_names(dataset: Any) -> list[str]:
    """The data set's columns; for a stream whose features are unknown, the first row's keys."""
    names = dataset.column_names
    if names is None:
        first = next(iter(dataset), None)
        names = list(first) if first is not None else []
    return list(names)


def check_fields(columns: list[str], cfg: DataConfig) -> None:
    """``data.prompt_field`` and ``data.answer_field`` must be columns; the error lists the columns there are."""
    if not columns:
        raise ConfigError(f"data.path {cfg.path} has no records; point it at a file with records")
    for key, value in (("prompt_field", cfg.prompt_field), ("answer_field", cfg.answer_field)):
        if value is not None and value not in columns:
            raise ConfigError(f"data.{key} {value!r} is not a column of data.path {cfg.path} (columns: "
                              f"{', '.join(columns)}); set data.{key} to one of them")


def normalise(dataset: Any, columns: list[str], cfg: DataConfig) -> Any:
    """``Dataset.map`` that renames the prompt and answer fields and shapes each prompt (see ``shape_prompt``)."""
    renamed = [f for f, target in ((cfg.prompt_field, "prompt"), (cfg.answer_field, "answer"))
               if f is not None and f != target]
    kwargs: dict[str, Any] = {"with_indices": True, "remove_columns": renamed or None}
    if hasattr(dataset, "select"):  # an in-memory Dataset: nothing is written next to the user's files
        kwargs.update(keep_in_memory=True, num_proc=cfg.num_proc)
    mapper = RecordMapper(str(cfg.path), cfg.prompt_field, cfg.answer_field, cfg.chat, cfg.instruction)
    return dataset.map(mapper, **kwargs)


class RecordMapper:
    """The per-record function of ``normalise`` (a class, so ``datasets`` can pickle and hash it)."""

    def __init__(self, source: str, prompt_field: str, answer_field: str | None, chat: bool,
                 instruction: str | None) -> None:
        self.source = source
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.chat = chat
        self.instruction = instruction

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        """The new ``prompt`` (and ``answer``) of record ``index``."""
        where = f"data.path {self.source}, record {index}"
        out = {"prompt": shape_prompt(row[self.prompt_field], where, self.prompt_field, self.chat, self.instruction)}
        if self.answer_field is not None:
            out["answer"] = row[self.answer_field]
        return out


def shape_prompt(value: Any, where: str, field: str, chat: bool, instruction: str | None) -> Any:
    """A text prompt (with ``instruction`` filled in when set) as text, or as one user message when ``chat``;
    chat messages unchanged; anything else is a ConfigError naming ``where`` (the file and record index)."""
    if isinstance(value, str):
        text = fill_instruction(instruction, value) if instruction is not None else value
        return [{"role": "user", "content": text}] if chat else text
    if is_messages(value):
        return value
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ConfigError(f"{where}: data.prompt_field {field!r} holds {type(value).__name__} {shown}; "
                      "give a string or a list of {role, content} chat messages")


def is_messages(value: Any) -> bool:
    """A non-empty list of chat messages, each a mapping with a ``role`` and a ``content``."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars or logged errors while loading (a failure becomes one ConfigError line);
    both are restored afterwards."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from datasets.utils import logging as ds_logging

    was_disabled, level = are_progress_bars_disabled(), ds_logging.get_verbosity()
    disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if not was_disabled:
            enable_progress_bars()
