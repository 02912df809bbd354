"""``rlclip train | eval | objectives | report | compare | tiny-model``.

Bad input (config, data, model path, reward output, CLI flags) and the usual
user mistakes (YAML syntax, encodings, missing files, permissions) print exactly
one line, ``rlclip <command>: error: <what, the bad value, the fix>``, to stderr
and exit with status 2; Ctrl-C outside training exits with 130. ``--debug``
anywhere on the command line prints the full traceback as well. Any other
exception is a bug in rlclip and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from rlclip.errors import ConfigError, RlclipError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"

USAGE = """usage: rlclip [--debug] <command> [options]

commands:
  train --config RECIPE.yaml [--section.key VALUE ...]   train with a recipe and dotted overrides
                                                           (train --help [SECTION] lists every field)
  objectives [--imports FILE.py ...]                       list the objectives and their settings
  eval --suite SUITE [--model PATH | --gold] ...           score a model on gsm8k, math500, svamp or asdiv
  report RUN_DIR [RUN_DIR ...] --out DIR                   curves and a table comparing runs (PNGs + report.md)
  compare --config RECIPE.yaml --objectives A,B --seeds 0,1  train each objective x seed (resumable), then a
                                                           report with 95% intervals of held-out accuracy
  tiny-model DIR [--seed N]                                save a tiny random model and tokenizer to DIR

--debug (anywhere on the line) shows the full traceback of an error; --version prints the version.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def train_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="rlclip train", description="Train with a recipe.", add_help=False)
    parser.add_argument("--config", help="recipe YAML (e.g. recipes/smoke/tiny.yaml)")
    parser.add_argument("-h", "--help", nargs="?", const="", default=None, metavar="SECTION")
    args, rest = parser.parse_known_args(argv)
    from rlclip.cli_help import recipe_names, train_help

    if args.help is not None:
        print(train_help(args.help or None))
        return 0
    if not args.config:
        shipped = ", ".join(recipe_names()) or "none shipped with this install"
        raise ConfigError(f"no recipe given; pass --config RECIPE.yaml (recipes: {shipped}; "
                          "rlclip train --help lists every field)")
    from rlclip.config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(rest))
    records = preflight(config)
    from rlclip.trainer import Trainer

    trainer = Trainer(config, train_dataset=records)
    trainer.train()  # it prints the start banner and the end summary
    stopped_by = getattr(trainer, "stopped_by", None)
    if stopped_by:  # the trainer saved a checkpoint and said how to resume
        from rlclip.interrupt import EXIT_CODES

        return EXIT_CODES.get(stopped_by, EXIT_INTERRUPTED)
    return 0


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


def objectives_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="rlclip objectives", description="List the objectives and their settings.")
    parser.add_argument("--imports", nargs="*", default=[], help="modules or .py files that register objectives")
    args = parser.parse_args(argv)
    from rlclip.cli_help import objectives_listing

    print(objectives_listing(args.imports))
    return 0


def tiny_model_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="rlclip tiny-model", description="Save a tiny random model.")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from rlclip.tiny import build_tiny_model

    print(build_tiny_model(args.directory, seed=args.seed))
    return 0


def eval_main(argv: list[str]) -> int:
    from rlclip.eval.cli import run

    return run(argv)


def report_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="rlclip report", description="Plot and tabulate runs side by side.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output_dirs, directories of runs, or globs")
    parser.add_argument("--out", required=True, help="directory for the PNGs and report.md")
    args = parser.parse_args(argv)
    from rlclip.report import write_report

    print(write_report(args.runs, args.out))
    return 0


def compare_main(argv: list[str]) -> int:
    from rlclip.compare import main

    return main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": train_main, "eval": eval_main,
                                                   "objectives": objectives_main, "report": report_main,
                                                   "compare": compare_main, "tiny-model": tiny_model_main}

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


def _run(command: str, func: Callable[[list[str]], int], argv: list[str], debug: bool) -> int:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "--version":
        from rlclip import __version__

        print(f"rlclip {__version__}")
        return 0
    if not argv:
        print(f"rlclip: error: no command given; choose one of {', '.join(COMMANDS)} (see rlclip --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        print(f"rlclip: error: unknown command {command!r}; {hint}choose one of {', '.join(COMMANDS)} "
              "(see rlclip --help)", file=sys.stderr)
        return EXIT_USER_ERROR
    return _run(command, COMMANDS[command], rest, debug)


if __name__ == "__main__":
    sys.exit(main())
