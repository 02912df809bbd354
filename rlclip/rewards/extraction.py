"""Answer extraction: find the final-answer span a completion states, and parse numbers.

``extract_answer(completion, suite)`` returns the answer as written, or None:

* numeric suites (``gsm8k``, ``svamp``, ``asdiv``): the answer is taken from, in
  order, the last ``#### N`` line, the last ``\\boxed{...}``, the last "the answer
  is ..." phrase, else the last number in the text (:func:`_numeric_span`).
* MATH suites (``math500``, ``math``): the last ``\\boxed{...}``, else the "the
  answer is ..." span (:func:`extract_math_answer`).

Number parsing (``parse_number``, ``parse_numbers``: commas, ``$``, ``%``, units,
fractions, the words zero..twenty) lives here too. Deciding whether a span equals
the gold answer is :mod:`rlclip.rewards.grading`'s job; this module never imports it.
Model text is never passed to ``eval``/``exec``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "vs", "p.m", "a.m", "no"})
_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}


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


def _full_number(text: str) -> float | None:
    """The value of ``text`` when it is exactly one number or fraction, else None."""
    text = _normalize_numeric_text(text).replace("%", "").strip()
    numbers = _numbers_in(text)
    if len(numbers) != 1:
        return None
    stripped = re.sub(rf"^-?\s*(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?$", "", text)
    return numbers[0][1].value if stripped == "" else None


# ----------------------------------------------------------------------------- answers


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


def extract_math_answer(completion: str) -> str | None:
    """The last ``\\boxed{...}``, else the "the answer is ..." span, of a MATH completion."""
    span = last_boxed(completion)
    if span is None:
        span = answer_is_span(completion)
    return span.strip() if span and span.strip() else None


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
