"""``rlclip train | eval | objectives | report | compare | tiny-model``: the dispatcher.

This module only picks the command and runs it through
``rlclip.cli_common.run_command``; the commands live in ``rlclip.commands``,
``rlclip.compare`` and ``rlclip.eval.cli``, none of which imports this module.

Bad input is one line on stderr and exit status 2 (``rlclip.cli_common`` says how).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable

from rlclip.cli_common import (  # noqa: F401  (re-exported: ``from rlclip.cli import preflight`` keeps working)
    DEBUG_FLAG,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    ArgumentParser,
    describe_error,
    preflight,
    run_command,
)
from rlclip.commands import compare_main, eval_main, objectives_main, report_main, tiny_model_main, train_main

USAGE = """usage: rlclip [--debug] <command> [options]

commands:
  train --config RECIPE.yaml [--section.key VALUE ...]   train with a recipe and dotted overrides
                                                           (train --help [SECTION] lists every field)
  objectives [--imports FILE.py ...]                       list the objectives and their settings
  eval --suite SUITE [--model PATH | --gold] ...           score a model on gsm8k, math500, svamp or asdiv
  report RUN_DIR [RUN_DIR ...] --out DIR                   curves and a table comparing runs (PNGs + report.md)
  compare --config RECIPE.yaml --objectives A,B --seeds 0,1  train each objective x seed (resumable), then a
                                                           report with 95% intervals of held-out accuracy
  tiny-model DIR [--seed N] [--hidden-size H]              save a tiny random model and tokenizer to DIR

--debug (anywhere on the line) shows the full traceback of an error; --version prints the version.
"""

COMMANDS: dict[str, Callable[[list[str]], int]] = {"train": train_main, "eval": eval_main,
                                                   "objectives": objectives_main, "report": report_main,
                                                   "compare": compare_main, "tiny-model": tiny_model_main}


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
    return run_command(command, COMMANDS[command], rest, debug)


if __name__ == "__main__":
    sys.exit(main())
