"""``rlclip train | eval | tiny-model``.

User errors (bad config, data, reward output, CLI input) print one line to
stderr and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import sys

from rlclip.errors import RlclipError

USAGE = """usage: rlclip <command> [options]

commands:
  train --config RECIPE.yaml [--section.key VALUE ...]   train with a recipe and dotted overrides
  eval --suite SUITE [--model PATH | --gold] ...           score a model on gsm8k, math500, svamp or asdiv
  tiny-model DIR [--seed N]                                save a tiny random model and tokenizer to DIR
"""


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlclip train", description="Train with a recipe.",
                                     epilog="Any config field can be overridden: --objective.name troll "
                                            "--objective.kl_bound 0.02 --max_steps 10")
    parser.add_argument("--config", help="recipe YAML (e.g. recipes/smoke/tiny.yaml)")
    args, rest = parser.parse_known_args(argv)
    from rlclip.config import load_config, parse_overrides

    config = load_config(args.config, parse_overrides(rest))
    from rlclip.trainer import Trainer

    history = Trainer(config).train()
    if history:
        last = history[-1]
        print(f"done: {last['step']} steps, reward/mean {last['reward/mean']:.4f}, output in {config.output_dir}")
    return 0


def tiny_model_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlclip tiny-model", description="Save a tiny random model.")
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from rlclip.tiny import build_tiny_model

    print(build_tiny_model(args.directory, seed=args.seed))
    return 0


def eval_main(argv: list[str]) -> int:
    from rlclip.eval.cli import main as run_eval

    return run_eval(argv)


COMMANDS = {"train": train_main, "eval": eval_main, "tiny-model": tiny_model_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlclip: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except RlclipError as err:
        print(f"rlclip {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
