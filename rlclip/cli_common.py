"""What every ``rlclip`` command shares: the one-line error form, exit codes and the checks before loading.

``rlclip.cli`` dispatches to the commands; ``rlclip.compare`` and
``rlclip.eval.cli`` implement two of them. All three import this module and it
imports none of them, so no command module imports the dispatcher back.

Bad input (config, data, model path, reward output, CLI flags) and the usual
user mistakes (YAML syntax, encodings, missing files, permissions) print exactly
one line, ``rlclip <command>: error: <what, the bad value, the fix>``, to stderr
and exit with status 2; Ctrl-C outside training exits with 130. ``--debug``
anywhere on the command line prints the full traceback as well. Any other
exception is a bug in rlclip and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from rlclip.errors import ConfigError, RlclipError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def preflight(config) -> list[dict]:
    """Cheap checks before any model loads: reward functions import, the model paths exist and are
    complete, the data loads (its records are returned for the trainer)."""
    from rlclip.data import load_records
    from rlclip.modeling import check_model_source
    from rlclip.rewards import resolve_reward_func

    for spec in config.reward.funcs:
        resolve_reward_func(spec.name, spec.kwargs)
    check_model_source(config.model.name_or_path, config.model.gguf_file, what="model.name_or_path")
    if config.critic.name_or_path:
        check_model_source(config.critic.name_or_path, what="critic.name_or_path")
    return load_records(config.data, config.seed)


_OS_ERRORS = {  # exception type -> (what happened, the fix)
    FileNotFoundError: ("no such file or directory", "check the path"),
    IsADirectoryError: ("is a directory, a file was expected", "pass a file"),
    NotADirectoryError: ("a part of the path is a file, not a directory", "choose a path under a directory"),
    FileExistsError: ("already exists (and is not a directory)", "remove it or choose another path"),
    PermissionError: ("permission denied", "fix its permissions or choose a path you can use"),
}


def describe_error(err: BaseException) -> str | None:
    """The one-line message for a user error, or None for a bug (which keeps its traceback)."""
    import yaml

    if isinstance(err, RlclipError):
        return " ".join(str(err).split("\n")).strip() or type(err).__name__
    if isinstance(err, UnicodeDecodeError):
        return (f"a file is not UTF-8 text ({err.reason} at byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
                "save it as UTF-8 (run with --debug to see which file)")
    if isinstance(err, yaml.YAMLError):
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        return f"YAML syntax error: {where}{problem}; fix the YAML there"
    if isinstance(err, OSError) and (err.filename is not None or type(err) in _OS_ERRORS):
        what, fix = next((v for k, v in _OS_ERRORS.items() if isinstance(err, k)),
                         (err.strerror or str(err), "check the path, its permissions and the free disk space"))
        name = f"{err.filename}: " if err.filename is not None else ""
        return f"{name}{what}; {fix}"
    return None


def run_command(command: str, func: Callable[[list[str]], int], argv: list[str], debug: bool) -> int:
    """``func(argv)`` with user errors turned into one line on stderr (the traceback too with --debug)."""
    try:
        return func(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"rlclip {command}: error: interrupted (Ctrl-C) before training started; nothing was saved",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = describe_error(err)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"rlclip {command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
