"""The bodies of the ``rlclip`` commands that need no module of their own.

``rlclip.cli`` dispatches here; ``compare`` and ``eval`` live in
``rlclip.compare`` and ``rlclip.eval.cli``. Heavy imports (torch, the trainer)
happen inside each command, so ``--help`` and config errors stay fast.
"""

from __future__ import annotations

from rlclip.cli_common import EXIT_INTERRUPTED, ArgumentParser, preflight
from rlclip.errors import ConfigError


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
    parser.add_argument("--hidden-size", type=int, default=64,
                        help="width (4 heads): 128 or more for vLLM's CPU attention, which needs a head size >= 32")
    args = parser.parse_args(argv)
    from rlclip.tiny import build_tiny_model

    print(build_tiny_model(args.directory, seed=args.seed, hidden_size=args.hidden_size))
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
