"""In-training evaluation (rlclip/periodic_eval.py): held-out problems, accuracy by hand, through the trainer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from conftest import tiny_config
from rlclip.errors import ConfigError
from rlclip.periodic_eval import PeriodicEval, held_out_records


def test_synthetic_held_out_problems_are_never_training_prompts(tmp_path):
    from rlclip.data import load_records

    config = tiny_config(tmp_path, "eval.steps=1", "eval.limit=20", "data.num_examples=60")
    train = {str(r["prompt"]) for r in load_records(config.data, config.seed)}
    held_out = held_out_records(config, load_records(config.data, config.seed))
    assert len(held_out) == 20 and not train & {str(r["prompt"]) for r in held_out}


def test_the_training_split_is_refused(tmp_path):
    config = tiny_config(tmp_path, "data.name=gsm8k", "data.split=test", "eval.steps=5")
    with pytest.raises(ConfigError, match="is the training data; evaluate on another split"):
        held_out_records(config, [])


def test_own_prompts_without_an_eval_suite_are_told_to_name_one(tmp_path):
    config = tiny_config(tmp_path, "data.name=jsonl", "data.path=x.jsonl", "eval.steps=5")
    with pytest.raises(ConfigError, match="data.name=jsonl has no evaluation split; set eval.suite to synthetic"):
        held_out_records(config, [])


def test_accuracy_and_extraction_failures_by_hand(tmp_path, monkeypatch):
    """Four problems answered right, wrong, right, unanswerable: accuracy 0.5, failures 0.25."""
    from accelerate import Accelerator

    import rlclip.rollout

    config = tiny_config(tmp_path, "eval.steps=1", "eval.limit=4", "eval.batch_size=3", "data.num_examples=20")
    from rlclip.data import load_records

    evaluator = PeriodicEval(config, Accelerator(cpu=True), load_records(config.data, config.seed))
    assert len(evaluator.records) == 4
    answers = [r["answer"] for r in evaluator.records]
    replies = iter([answers[0], str(int(answers[1]) + 1), f"so it is {answers[2]}", "no idea"])

    def fake_sample(policy, tokenizer, records, settings, device):
        assert settings.temperature == 0.0 and settings.group_size == 1  # greedy, one completion each
        return SimpleNamespace(completions=[[{"role": "assistant", "content": next(replies)}] for _ in records])

    monkeypatch.setattr(rlclip.rollout, "sample_completions", fake_sample)
    from transformers import AutoModelForCausalLM

    from rlclip.modeling import resolve_tiny

    metrics = evaluator.run(AutoModelForCausalLM.from_pretrained(resolve_tiny("tiny")), tokenizer=None)
    assert metrics == {"eval/accuracy": 0.5, "eval/extraction_failures": 0.25}


def test_trainer_evaluates_every_n_steps_and_at_the_end(tmp_path):
    from rlclip.trainer import Trainer

    history = Trainer(tiny_config(tmp_path, "max_steps=3", "eval.steps=2", "eval.limit=4", "eval.max_new_tokens=4",
                                  "train.num_iterations=1", "train.mini_batches=1")).train()
    evaluated = [h["step"] for h in history if "eval/accuracy" in h]
    assert evaluated == [2, 3]
    for h in history:
        if "eval/accuracy" in h:
            assert 0 <= h["eval/accuracy"] <= 1 and math.isfinite(h["eval/extraction_failures"])
