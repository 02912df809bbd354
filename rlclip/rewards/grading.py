"""Answer extraction and grading, shared by training rewards and ``rlclip eval``.

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

Model text is never passed to ``eval``/``exec``; the only arithmetic done here is
parsing plain numbers and simple fractions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from rlclip.rewards.verify_pool import get_pool

NUMERIC_SUITES = frozenset({"gsm8k", "svamp", "asdiv"})
MATH_SUITES = frozenset({"math500", "math"})
SUITE_NAMES = tuple(sorted(NUMERIC_SUITES | MATH_SUITES))

# A number token: thousands separators, decimals; not glued to a word/number, not part of 3:30.
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?<!\d:)(-?)({_NUMBER})(?!\d|:\d)")
_FRACTION_RE = re.compile(rf"(?<![\w.])(?<!\d:)(-?)({_NUMBER})\s*/\s*({_NUMBER})(?!\d|:\d)")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_LATEX_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac(\d)(\d)")
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_PARENS_RE = re.compile(r"\([^()]*[A-Za-z][^()]*\)")
_PLAIN_PARENS_RE = re.compile(r"\(([^()A-Za-z]*)\)")
_ANSWER_IS_RE = re.compile(
    r"\b(?:final\s+answer|the\s+answer|answer)\s*\**\s*(?:is|:|=)\s*:?\s*\**", re.IGNORECASE
)
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
# "#### 18", "#### $1,000.50", "#### 18 dollars": a number and at most two words.
_HASH_ANSWER_RE = re.compile(r"\\?\$?\s*-?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?\s*%?(?:\s+[^\s\d]+){0,2}")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
_COLON_RE = re.compile(r"(\d+)\s*:\s*(\d+)(?:\s*:\s*(\d+))?(?:\s*([ap])\.?\s*m\b\.?)?", re.IGNORECASE)
_RATIO_WORDS_RE = re.compile(r"(\d+)\s+to\s+(\d+)")
_ORDINAL_RE = re.compile(r"^(\d+)(?:st|nd|rd|th)$", re.IGNORECASE)
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "p.m", "a.m", "no"})
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_REL_TOL = 1e-6
# Boxed answers longer than this are not sent to math-verify (no MATH answer is that long).
MAX_SYMBOLIC_CHARS = 1000


def check_suite(suite: str) -> str:
    """Return the canonical suite name or raise ``ValueError`` listing the choices."""
    name = str(suite).strip().lower()
    if name not in NUMERIC_SUITES and name not in MATH_SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITE_NAMES)}")
    return name


# ----------------------------------------------------------------------------- spans


def find_boxed(text: str) -> list[str]:
    """Contents of every top-level ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces).

    ``\\boxed 5`` (no braces) yields ``5``; an unterminated box is ignored.
    """
    found: list[str] = []
    pos = 0
    while True:
        match = _BOXED_RE.search(text, pos)
        if match is None:
            return found
        start = match.end()
        while start < len(text) and text[start] == " ":
            start += 1
        if start < len(text) and text[start] == "{":
            end = _matching_brace(text, start)
            if end is None:
                pos = start + 1
                continue
            found.append(text[start + 1 : end])
            pos = end + 1
        else:  # "\boxed 5"
            token = re.match(r"[^\s${}]+", text[start:])
            if token and start > match.end():
                found.append(token.group(0))
            pos = match.end()


def _matching_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``; escaped braces are skipped."""
    depth = 0
    i = open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last top-level ``\\boxed{...}``, or None."""
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None


def _cut_sentence(span: str) -> str:
    """Keep the first line and the first sentence of ``span`` (abbreviations kept)."""
    span = span.split("\n", 1)[0]
    for match in re.finditer(r"\.\s+(?=[A-Z])", span):
        words = span[: match.start()].split()
        if words and words[-1].lower().rstrip(".") not in _ABBREVIATIONS:
            return span[: match.start()]
    return span


def answer_is_span(text: str) -> str | None:
    """The text after the last "the answer is" / "Final answer:" / "Answer:" phrase."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip(" \t")
    if rest.startswith("\n"):  # "Final answer:\n42"
        rest = rest.strip()
    span = _clean_span(_cut_sentence(rest))
    return span or None


def _hashes_span(text: str) -> str | None:
    """The rest of the line after the last ``#### N`` (a markdown heading such as
    ``#### Step 2: add the costs`` is not a final answer and is skipped)."""
    for line in reversed(_HASHES_RE.findall(text)):
        span = _clean_span(line)
        if _HASH_ANSWER_RE.fullmatch(span):
            return span
    return None


def _clean_span(span: str) -> str:
    """Strip whitespace, markdown bold, surrounding ``$`` and trailing punctuation."""
    span = span.strip().strip("*").strip().rstrip(" .,;!").strip()
    while len(span) >= 2 and span[0] == "$" and span[-1] == "$":
        span = span[1:-1].strip().rstrip(" .,;!").strip()
    return span


def _last_number_token(text: str) -> str | None:
    """The last number (or simple fraction) in ``text`` as written, or None."""
    text = _normalize_numeric_text(text, keep_equals=True)
    best: tuple[int, str] | None = None
    for regex in (_NUMBER_RE, _FRACTION_RE):
        for match in regex.finditer(text):
            if best is None or match.start() >= best[0]:
                best = (match.start(), match.group(0))
    return best[1] if best else None


# ----------------------------------------------------------------------------- numbers


def _normalize_numeric_text(text: str, keep_equals: bool = False) -> str:
    """Rewrite LaTeX/markdown number decorations into plain text numbers."""
    text = text.replace("\u2212", "-").replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    text = _TEXT_CMD_RE.sub(r" \1 ", text)
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _LATEX_FRAC_SHORT_RE.sub(r"\1/\2", text)
    for token in ("\\$", "$", "\\%"):
        text = text.replace(token, "")
    for token in ("\\left", "\\right", "**"):
        text = text.replace(token, " ")
    text = _PLAIN_PARENS_RE.sub(r"\1", text)
    if not keep_equals and "=" in text:
        text = text.rsplit("=", 1)[1]
    return text


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def _places(token: str) -> int:
    return len(token.split(".", 1)[1]) if "." in token else 0


@dataclass(frozen=True)
class Number:
    """A parsed number and the decimal places it was written with (for rounding)."""

    value: float
    places: int = 0


def _numbers_in(text: str) -> list[tuple[int, Number]]:
    """(position, Number) for every number or simple fraction in normalized ``text``."""
    found: list[tuple[int, Number]] = []
    covered: list[tuple[int, int]] = []
    for match in _FRACTION_RE.finditer(text):
        denominator = _to_float(match.group(3))
        if denominator != 0:
            value = _to_float(match.group(2)) / denominator
            found.append((match.start(), Number(-value if match.group(1) else value, 99)))
            covered.append(match.span())
    for match in _NUMBER_RE.finditer(text):
        if any(a <= match.start() < b for a, b in covered):
            continue
        value = _to_float(match.group(2))
        found.append((match.start(), Number(-value if match.group(1) else value, _places(match.group(2)))))
    return sorted(found, key=lambda item: item[0])


def parse_number(text: str) -> Number | None:
    """The first number in an answer span (after the last ``=``), or None.

    Understands ``1,000``, ``$5``, ``25%``, ``-3``, ``3.50``, ``3/4``, ``\\frac{3}{4}``,
    ``\\text{...}`` units and the words zero..twenty when the span has no digits.
    """
    numbers = _numbers_in(_normalize_numeric_text(text))
    if numbers:
        return numbers[0][1]
    words = re.findall(r"[a-z]+", text.lower())
    for word in words:
        if word in _WORD_NUMBERS:
            return Number(float(_WORD_NUMBERS[word]))
    return None


def parse_numbers(text: str) -> list[Number]:
    """Every number in an answer span (unit parentheses such as ``(apples)`` removed)."""
    return [num for _, num in _numbers_in(_normalize_numeric_text(_UNIT_PARENS_RE.sub(" ", text), True))]


def numbers_match(pred: Number, gold: float) -> bool:
    """Equal within a relative tolerance, or ``pred`` is ``gold`` rounded to >= 2 places."""
    if math.isclose(pred.value, gold, rel_tol=_REL_TOL, abs_tol=1e-9):
        return True
    if 2 <= pred.places < 99 and gold != round(gold):
        return abs(pred.value - gold) <= 0.5 * 10.0 ** (-pred.places) + 1e-12
    return False


def _full_number(text: str) -> float | None:
    """The value of ``text`` when it is exactly one number or fraction, else None."""
    text = _normalize_numeric_text(text).replace("%", "").strip()
    numbers = _numbers_in(text)
    if len(numbers) != 1:
        return None
    stripped = re.sub(rf"^-?\s*(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?$", "", text)
    return numbers[0][1].value if stripped == "" else None


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


def _numeric_span(text: str) -> tuple[str | None, bool]:
    """(answer span, whether it came from an explicit marker: ####, \\boxed or "answer is")."""
    for finder in (_hashes_span, last_boxed, answer_is_span):
        span = finder(text)
        if span and span.strip():
            return _clean_span(span), True
    return _last_number_token(text), False


def _last_line(text: str) -> str | None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return _clean_span(lines[-1]) if lines else None


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


def extract_math_answer(completion: str) -> str | None:
    """The last ``\\boxed{...}``, else the "the answer is ..." span, of a MATH completion."""
    span = last_boxed(completion)
    if span is None:
        span = answer_is_span(completion)
    return span.strip() if span and span.strip() else None


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


def extract_answer(completion: str, suite: str) -> str | None:
    """The final answer a completion states, as written, or None when there is none.

    Numeric suites: the ``####`` line, last ``\\boxed{}``, "the answer is" phrase,
    else the last number. MATH suites: the last ``\\boxed{}`` (else "the answer is").
    """
    suite = check_suite(suite)
    text = completion or ""
    if suite in MATH_SUITES:
        return extract_math_answer(text)
    return _numeric_span(text)[0]


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
