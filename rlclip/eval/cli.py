"""``rlclip eval``: score a model, or the reference solutions (``--gold``), on a benchmark.

Examples::

    rlclip eval --suite gsm8k --gold
    rlclip eval --suite math500 --model runs/ckpt --num-samples 4 --temperature 0.6 --output-json out.json

Also runnable as ``python -m rlclip.eval.cli ...``. Bad input prints one line to
stderr naming the problem and the fix, and exits with status 2 (``--debug`` adds
the traceback); the handling is :mod:`rlclip.cli_common`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from rlclip.eval import EvalError
from rlclip.eval.engine import BACKENDS, DTYPES, EvalConfig, format_summary, run_eval, validate

SUITE_CHOICES = ("gsm8k", "math500", "svamp", "asdiv", "math")


class _Parser(argparse.ArgumentParser):
    """argparse that raises EvalError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise EvalError(f"{message} (see rlclip eval --help)")


def build_parser() -> argparse.ArgumentParser:
    """The ``rlclip eval`` argument parser."""
    p = _Parser(prog="rlclip eval", description="Score a model (or the gold solutions) on a math benchmark.")
    p.add_argument("--suite", required=True, choices=SUITE_CHOICES, help="benchmark to run")
    p.add_argument("--data-file", help="local data file (default: ../shared/data copy if present, else the hub)")
    p.add_argument("--split", help="data split (default: test)")
    p.add_argument("--instruction", help="prompt template containing {question}")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help="model directory, hub name or LoRA adapter directory")
    what.add_argument("--gold", action="store_true", help="grade the reference solutions (grader self-check)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per problem, k (pass@k, maj@k)")
    p.add_argument("--limit", type=int, help="only the first n problems")
    p.add_argument("--output-json", help="write the summary JSON here")
    p.add_argument("--output-jsonl", help="write per-sample results here (default: next to --output-json)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget per sample (default: 512 for math500 and math, 256 for the others)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="hf")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--gguf-file", help="GGUF file name inside --model (hf backend)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Map parsed flags onto an EvalConfig."""
    return EvalConfig(
        suite=args.suite,
        data_file=args.data_file,
        model=args.model,
        gold=args.gold,
        num_samples=args.num_samples,
        limit=args.limit,
        split=args.split,
        instruction=args.instruction,
        output_json=args.output_json,
        output_jsonl=args.output_jsonl,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        backend=args.backend,
        dtype=args.dtype,
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
    )


def run(argv: list[str]) -> int:
    """Run ``rlclip eval`` with ``argv``; bad input raises RlclipError (one line, see :mod:`rlclip.cli_common`)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    config = config_from_args(args)
    validate(config)
    if config.model and not os.path.isfile(os.path.join(config.model, "adapter_config.json")):
        from rlclip.modeling import check_model_source

        check_model_source(config.model, config.gguf_file, what="--model")
    print(format_summary(run_eval(config)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``rlclip eval`` with ``argv``; 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    from rlclip.cli_common import DEBUG_FLAG, run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("eval", run, [arg for arg in argv if arg != DEBUG_FLAG], DEBUG_FLAG in argv)


if __name__ == "__main__":
    sys.exit(main())
