"""Answer grading (comparison), shared by training rewards and ``rlclip eval``.

``grade(completion, gold, suite)`` decides whether a model's text reaches the gold
final answer of a benchmark problem:

* numeric suites (``gsm8k``, ``svamp``, ``asdiv``): the answer is taken from, in
  order, the last ``#### N`` line, the last ``\\boxed{...}``, the last "the answer
  is ..." phrase, else the last number in the text; it is compared numerically
  (commas, ``$``, ``%``, units, fractions and rounded decimals are understood).
  ASDiv golds that are not one number (``3:4`` ratios, ``3:30 p.m.`` times,
  ``5 (years old); 15 (years old)`` lists, ``Yes``/names) get their own matchers.
* MATH suites (``math500``, ``math``): the last ``\\boxed{...}`` is compared to the
  gold LaTeX, first by cheap string/number checks in-process, then with
  math-verify (symbolic equivalence, intervals, tuples, sets) in a worker process
  with a timeout that works off the main thread (see :mod:`rlclip.rewards.verify_pool`).

This module decides whether an extracted answer span equals the gold answer; finding
the span and parsing numbers is :mod:`rlclip.rewards.extraction`, whose public names
are re-exported here so ``from rlclip.rewards.grading import ...`` keeps working.
Model text is never passed to ``eval``/``exec``; the only arithmetic done here (and
in extraction) is parsing plain numbers and simple fractions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from rlclip.rewards.extraction import (
    _NUMBER,
    _TEXT_CMD_RE,
    _UNIT_PARENS_RE,
    MATH_SUITES,
    NUMERIC_SUITES,
    SUITE_NAMES,
    Number,
    _full_number,
    _last_line,
    _normalize_numeric_text,
    _numeric_span,
    answer_is_span,
    check_suite,
    extract_answer,
    extract_math_answer,
    find_boxed,
    last_boxed,
    parse_number,
    parse_numbers,
)
from rlclip.rewards.verify_pool import get_pool

__all__ = [
    "MATH_SUITES", "MAX_SYMBOLIC_CHARS", "NUMERIC_SUITES", "SUITE_NAMES", "GoldAnswer", "Number", "answer_is_span",
    "answer_key", "check_suite", "extract_answer", "extract_math_answer", "find_boxed", "grade", "grade_math",
    "grade_numeric", "last_boxed", "normalize_math", "numbers_match", "parse_gold", "parse_number", "parse_numbers",
]

_COLON_RE = re.compile(r"(\d+)\s*:\s*(\d+)(?:\s*:\s*(\d+))?(?:\s*([ap])\.?\s*m\b\.?)?", re.IGNORECASE)
_RATIO_WORDS_RE = re.compile(r"(\d+)\s+to\s+(\d+)")
_ORDINAL_RE = re.compile(r"^(\d+)(?:st|nd|rd|th)$", re.IGNORECASE)
_REL_TOL = 1e-6
# Boxed answers longer than this are not sent to math-verify (no MATH answer is that long).
MAX_SYMBOLIC_CHARS = 1000


def numbers_match(pred: Number, gold: float) -> bool:
    """Equal within a relative tolerance, or ``pred`` is ``gold`` rounded to >= 2 places."""
    if math.isclose(pred.value, gold, rel_tol=_REL_TOL, abs_tol=1e-9):
        return True
    if 2 <= pred.places < 99 and gold != round(gold):
        return abs(pred.value - gold) <= 0.5 * 10.0 ** (-pred.places) + 1e-12
    return False


# ----------------------------------------------------------------------------- numeric suites


@dataclass(frozen=True)
class GoldAnswer:
    """A numeric-suite gold answer, classified by how it must be matched.

    kind: ``number`` (one value), ``numbers`` (a ``;``-separated list, order-free),
    ``colon`` (a ratio ``3:4`` or a clock time ``3:30 p.m.``) or ``text``.
    """

    kind: str
    values: tuple[float, ...] = ()
    colon: tuple[int, ...] = ()
    meridiem: str | None = None
    text: str = ""


@lru_cache(maxsize=65536)
def parse_gold(gold: str) -> GoldAnswer:
    """Classify a gold answer as stated by a data set (``18``, ``1,000``, ``9 (apples)``...)."""
    raw = str(gold).strip().rstrip(".").strip()
    bare = _UNIT_PARENS_RE.sub(" ", raw).strip()
    value = _full_number(bare)
    if value is not None:
        return GoldAnswer("number", values=(value,), text=raw)
    if ";" in bare:
        parts = [_full_number(part) for part in bare.split(";") if part.strip()]
        if parts and all(part is not None for part in parts):
            return GoldAnswer("numbers", values=tuple(parts), text=raw)  # type: ignore[arg-type]
    colon = _COLON_RE.fullmatch(bare)
    if colon:
        return GoldAnswer("colon", colon=_colon_ints(colon), meridiem=_meridiem(colon), text=raw)
    return GoldAnswer("text", text=raw)


def _colon_ints(match: re.Match[str]) -> tuple[int, ...]:
    return tuple(int(g) for g in match.groups()[:3] if g is not None)


def _meridiem(match: re.Match[str]) -> str | None:
    return match.group(4).lower() if match.group(4) else None


def _normalize_text(text: str) -> str:
    """Lower-case words without punctuation or articles, for text answers."""
    text = text.lower().replace("\u2019", "'")
    text = _TEXT_CMD_RE.sub(r" \1 ", text)
    words = re.findall(r"[a-z0-9']+", text)
    return " ".join(w for w in words if w not in {"the", "a", "an"})


def _match_text(span: str, gold: GoldAnswer) -> bool:
    """Text golds: same words, or the span starts with / briefly contains the gold words."""
    pred, target = _normalize_text(span), _normalize_text(gold.text)
    if not target:
        return False
    if pred == target or pred.startswith(target + " "):
        return True
    if f" {target} " in f" {pred} " and len(pred.split()) <= len(target.split()) + 4:
        return True
    ordinal = _ORDINAL_RE.match(gold.text.strip())
    number = parse_number(span)
    return bool(ordinal and number and numbers_match(number, float(ordinal.group(1))))


def _match_colon(span: str, gold: GoldAnswer) -> bool:
    """Ratios match when equivalent (6:8 == 3:4); times when hours, minutes (and a.m./p.m.) agree."""
    found = _COLON_RE.search(span)
    if found:
        pred, meridiem = _colon_ints(found), _meridiem(found)
    else:
        words = _RATIO_WORDS_RE.search(span)
        if not words:
            return False
        pred, meridiem = (int(words.group(1)), int(words.group(2))), None
    if len(pred) != len(gold.colon):
        return False
    if pred == gold.colon:
        return meridiem is None or gold.meridiem is None or meridiem == gold.meridiem
    if len(pred) == 2 and gold.meridiem is None and meridiem is None:
        return pred[0] * gold.colon[1] == pred[1] * gold.colon[0] and pred[1] != 0
    gold_24h = _to_24h(gold.colon, gold.meridiem)
    return gold_24h is not None and _to_24h(pred, meridiem) == gold_24h


def _to_24h(parts: tuple[int, ...], meridiem: str | None) -> tuple[int, ...] | None:
    """Clock time on a 24-hour dial, or None when a.m./p.m. is unknown and hours <= 12."""
    hours = parts[0]
    if meridiem is not None:
        hours = hours % 12 + (12 if meridiem == "p" else 0)
    elif hours <= 12:
        return None
    return (hours, *parts[1:])


def _match_numbers(span: str, gold: GoldAnswer) -> bool:
    """``;``-lists: the span holds the same numbers, in any order."""
    pred = sorted(parse_numbers(span), key=lambda n: n.value)
    expected = sorted(gold.values)
    return len(pred) == len(expected) and all(numbers_match(p, g) for p, g in zip(pred, expected))


def _is_number_list(span: str) -> bool:
    """Whether ``span`` is nothing but two or more numbers separated by ``;`` or ``, ``."""
    bare = _normalize_numeric_text(_UNIT_PARENS_RE.sub(" ", span), keep_equals=True)
    item = rf"-?\s*(?:{_NUMBER})(?:\s*[A-Za-z%]+)*"
    return re.fullmatch(rf"\s*{item}(?:\s*(?:;|,\s|\band\b)\s*{item})+\s*", bare) is not None


def grade_numeric(completion: str, gold: str) -> bool:
    """Grade a completion against a GSM8K/SVAMP/ASDiv gold answer."""
    target = parse_gold(gold)
    span, from_marker = _numeric_span(completion)
    if target.kind in ("numbers", "colon", "text") and not from_marker:
        span = _last_line(completion)
    if not span:
        return False
    if target.kind == "number":
        if _is_number_list(span):  # "60; 72" hedges between answers
            return False
        number = parse_number(span)
        return number is not None and numbers_match(number, target.values[0])
    if target.kind == "numbers":
        return _match_numbers(span, target)
    if target.kind == "colon":
        return _match_colon(span, target)
    return _match_text(span, target)


# ----------------------------------------------------------------------------- MATH suites


def normalize_math(answer: str) -> str:
    """A light LaTeX normalization used for the cheap equality test and for majority votes."""
    text = answer.strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text[1:-1].strip()
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text)
    text = _TEXT_CMD_RE.sub(r"\1", text)
    for token in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\displaystyle", "\\$"):
        text = text.replace(token, "")
    text = re.sub(r"\s+", "", text).replace("{,}", ",")
    return text.rstrip(".")


def _plain_value(normalized: str) -> float | None:
    """The value of a normalized MATH answer that is one plain number/fraction, else None."""
    if "%" in normalized or not re.fullmatch(r"[-\d.,/\\frac{}]+", normalized):
        return None
    return _full_number(normalized)


def grade_math(completion: str, gold: str, timeout: float | None = None) -> bool:
    """Grade a MATH completion: cheap checks first, then math-verify with a timeout."""
    pred = extract_math_answer(completion)
    if pred is None:
        return False
    pred_norm, gold_norm = normalize_math(pred), normalize_math(str(gold))
    if pred_norm == gold_norm:
        return True
    pred_value, gold_value = _plain_value(pred_norm), _plain_value(gold_norm)
    if pred_value is not None and gold_value is not None:
        return math.isclose(pred_value, gold_value, rel_tol=_REL_TOL, abs_tol=1e-9)
    if len(pred) > MAX_SYMBOLIC_CHARS:
        return False
    return get_pool().verify(str(gold), pred, timeout=timeout)


# ----------------------------------------------------------------------------- public API


def answer_key(completion: str, suite: str) -> str | None:
    """A canonical form of the extracted answer, used to group equal answers (maj@k)."""
    suite = check_suite(suite)
    answer = extract_answer(completion, suite)
    if answer is None:
        return None
    if suite in MATH_SUITES:
        normalized = normalize_math(answer)
        value = _plain_value(normalized)
        return normalized if value is None else f"{value:.9g}"
    numbers = parse_numbers(answer)
    if len(numbers) == 1:
        return f"{numbers[0].value:.9g}"
    return _normalize_text(answer) or answer


def grade(completion: str, gold: str, suite: str, *, timeout: float | None = None) -> bool:
    """True when ``completion`` reaches the gold final answer of a ``suite`` problem.

    ``gold`` is the final answer as the data set states it (GSM8K: the number after
    ``####``; MATH: the ``answer`` field; SVAMP: ``Answer``; ASDiv: ``Answer`` such as
    ``9 (apples)``). ``timeout`` bounds the symbolic check of MATH answers (seconds,
    default ``$RLCLIP_GRADE_TIMEOUT`` or 5); a check that runs out grades False.
    """
    suite = check_suite(suite)
    if completion is None or gold is None:
        return False
    if suite in MATH_SUITES:
        return grade_math(str(completion), str(gold), timeout=timeout)
    return grade_numeric(str(completion), str(gold))
