"""In-training evaluation: every ``eval.steps`` optimizer steps, greedy accuracy on held-out problems.

The problems are never the training ones: a benchmark suite's evaluation split
(``eval.split``, default the suite's test split; the same suite and split as
``data`` is refused), or for ``synthetic`` distinct problems drawn with a fixed
seed (the same for every training seed, so runs that differ only in ``seed``
are scored on the same problems where their training data allow), with any
problem that is also a training prompt removed. Generation uses the live
policy (``unwrap_model_for_generation``, as rollouts), greedy, each process
taking a share of the problems; answers are graded by the same grader as
``rlclip eval`` and the rewards. Logs ``eval/accuracy`` and
``eval/extraction_failures`` (the fraction of completions with no answer to extract).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlclip.errors import ConfigError
from rlclip.lazy import torch

if TYPE_CHECKING:
    from rlclip.config import TrainConfig

SYNTHETIC_EVAL_SEED = 1_000_003
"""Seed of the synthetic held-out draw: independent of ``config.seed``."""


def held_out_records(config: TrainConfig, train_records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation problems of ``config.eval``, disjoint from ``train_records`` (the trainer's data)."""
    settings, data = config.eval, config.data
    suite = settings.suite or data.name
    if suite == "synthetic":
        from rlclip.data import synthetic

        seen = {str(r["prompt"]) for r in train_records}  # training prompts, then each problem taken
        drawn = synthetic.generate(max(20 * settings.limit, 10_000), seed=SYNTHETIC_EVAL_SEED, min_value=data.min_value,
                                   max_value=data.max_value, num_terms=data.num_terms, operations=data.operations,
                                   instruction=data.instruction, chat=data.chat)
        records = []
        for record in drawn:
            if len(records) < settings.limit and str(record["prompt"]) not in seen:
                seen.add(str(record["prompt"]))
                records.append(record)
        if not records:
            raise ConfigError("eval.suite=synthetic: every fresh problem is also a training problem (the operand "
                              "range is too small); widen data.max_value or evaluate on a benchmark suite")
        return records
    from rlclip.data.suites import SUITES, load_suite

    if suite not in SUITES:
        if settings.suite is None:  # the user's own prompts: no held-out split to fall back on
            raise ConfigError(f"eval.steps={settings.steps} needs held-out problems, and data.name={suite} has no "
                              f"evaluation split; set eval.suite to synthetic or one of {', '.join(SUITES)}")
        raise ConfigError(f"unknown eval.suite {suite!r}; choose synthetic or one of {', '.join(SUITES)}")
    split = settings.split or SUITES[suite].split
    if suite == data.name and split == data.split and (settings.path or None) == (data.path or None):
        raise ConfigError(f"eval.suite={suite} with split {split!r} is the training data; evaluate on another "
                          "split (eval.split) or suite, never on the training problems")
    return load_suite(suite, settings.path, split=split, limit=settings.limit)


class PeriodicEval:
    """Decides when to evaluate and runs the held-out evaluation on the live policy."""

    def __init__(self, config: TrainConfig, accelerator: Any, train_records: list[dict[str, Any]]) -> None:
        from rlclip.eval.engine import suite_max_new_tokens

        self.settings = config.eval
        self.accelerator = accelerator
        self.records = held_out_records(config, train_records) if self.settings.steps else []
        suite = self.settings.suite or config.data.name
        self.grading_suite = "gsm8k" if suite == "synthetic" else suite
        self.max_new_tokens = self.settings.max_new_tokens or suite_max_new_tokens(self.grading_suite)
        self.last_correct: list[float] | None = None
        """The last evaluation's per-problem outcome (1.0 right, 0.0 wrong), in ``records`` order, on every process."""

    def due(self, step: int, last: bool) -> bool:
        """Every ``eval.steps`` steps, and at the last step."""
        return bool(self.settings.steps) and (step % self.settings.steps == 0 or last)

    def run(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Greedy completions of this process's share of the problems; accuracy over all processes."""
        from accelerate.utils import gather_object
        from trl.models import unwrap_model_for_generation

        from rlclip.modeling import GRADIENT_CHECKPOINTING_KWARGS
        from rlclip.rewards.grading import extract_answer, grade
        from rlclip.rewards.math_rewards import completion_text
        from rlclip.rollout import SamplingSettings, sample_completions
        from rlclip.utils import all_reduce

        acc = self.accelerator
        indices = range(acc.process_index, len(self.records), acc.num_processes)
        share = [self.records[i] for i in indices]
        correct = failed = 0.0
        outcomes = []  # (problem index, 1.0 if right) for this process's share
        sampling = SamplingSettings(1, self.max_new_tokens, 0.0, 1.0, 0, None, 0)
        with torch.no_grad(), unwrap_model_for_generation(
                model, acc, gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS) as policy:
            policy.eval()
            for start in range(0, len(share), self.settings.batch_size):
                chunk = share[start:start + self.settings.batch_size]
                rollout = sample_completions(policy, tokenizer, chunk, sampling, acc.device)
                for offset, (record, completion) in enumerate(zip(chunk, rollout.completions)):
                    text = completion_text(completion)
                    right = float(grade(text, str(record["answer"]), self.grading_suite))
                    correct += right
                    failed += float(extract_answer(text, self.grading_suite) is None)
                    outcomes.append((indices[start + offset], right))
        model.train()
        pooled = gather_object(outcomes) if acc.num_processes > 1 else outcomes
        self.last_correct = [right for _, right in sorted(pooled)]
        totals = all_reduce(acc, torch.tensor([correct, failed, float(len(share))], device=acc.device), "sum")
        n = max(float(totals[2]), 1.0)
        return {"eval/accuracy": float(totals[0]) / n, "eval/extraction_failures": float(totals[1]) / n}

