"""Synthetic arithmetic problems: the offline training task.

Problems are drawn from a seeded generator, so the same settings give the
same data everywhere. Difficulty knobs: operand range, number of terms and
the operators used.
"""

from __future__ import annotations

import random
from typing import Any

from rlclip.data._common import fill_instruction
from rlclip.errors import ConfigError

DEFAULT_INSTRUCTION = "What is {question}? Answer with just the number."


def _value(terms: list[int], ops: list[str]) -> int:
    # Integer arithmetic with usual precedence: fold products first, then sums.
    total, product = 0, terms[0]
    sign = 1
    for op, term in zip(ops, terms[1:]):
        if op == "*":
            product *= term
        else:
            total += sign * product
            sign, product = (1 if op == "+" else -1), term
    return total + sign * product


def generate(num_examples: int, seed: int = 0, min_value: int = 0, max_value: int = 9, num_terms: int = 2,
             operations: str = "+", instruction: str | None = None, chat: bool = True) -> list[dict[str, Any]]:
    """``num_examples`` records ``{"prompt", "answer", "question", "suite"}``.

    ``answer`` is the exact integer result as a string; ``suite`` is
    ``gsm8k`` so that numeric grading applies.
    """
    if num_examples < 1 or num_terms < 2 or min_value > max_value:
        raise ConfigError(f"synthetic data needs data.num_examples >= 1, data.num_terms >= 2 and data.min_value <= "
                          f"data.max_value, got {num_examples}, {num_terms}, {min_value} and {max_value}")
    bad = set(operations) - set("+-*")
    if not operations or bad:
        raise ConfigError(f"data.operations {operations!r} must be made of + - *")
    rng = random.Random(seed)
    template = instruction or DEFAULT_INSTRUCTION
    if "{question}" not in template:
        raise ConfigError(f"data.instruction {template!r} has no {{question}} placeholder; add it where the problem "
                          "goes (write {{ and }} for literal braces)")
    records = []
    for _ in range(num_examples):
        terms = [rng.randint(min_value, max_value) for _ in range(num_terms)]
        ops = [rng.choice(operations) for _ in range(num_terms - 1)]
        question = " ".join([str(terms[0])] + [f"{o} {t}" for o, t in zip(ops, terms[1:])])
        text = fill_instruction(template, question)
        records.append({
            "prompt": [{"role": "user", "content": text}] if chat else text,
            "answer": str(_value(terms, ops)),
            "question": question,
            "suite": "gsm8k",
        })
    return records
