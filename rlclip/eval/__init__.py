"""The evaluation engine behind ``rlclip eval`` (see :mod:`rlclip.eval.engine`).

``rlclip eval --suite gsm8k --model PATH`` scores a model (or a LoRA adapter) on a
benchmark; ``--gold`` grades each problem's reference solution instead, a
self-check of answer extraction and grading.
"""

from __future__ import annotations

from rlclip.errors import RlclipError


class EvalError(RlclipError):
    """Bad evaluation input (file, suite, flags, model); printed as one line, exit status 2."""


__all__ = ["EvalError"]
