"""Errors that the CLI turns into a one-line message and a non-zero exit."""


class RlclipError(Exception):
    """A user-facing error: bad config, data, CLI input or reward function output.

    The message names the problem and the fix; the CLI prints it on one line
    without a traceback.
    """


class ConfigError(RlclipError, ValueError):
    """An invalid recipe, override or objective setting."""


class RewardError(RlclipError, ValueError):
    """A reward function returned something the trainer cannot use."""


class ObjectiveError(RlclipError, ValueError):
    """An objective broke its output contract (e.g. a per-token loss of the wrong shape)."""


class TrainingError(RlclipError, RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); the last checkpoint is intact."""


class UserCodeError(RlclipError):
    """An exception raised inside user code (a custom objective, a reward function, an ``imports`` file).

    The message starts with the user's file and line, then the exception; the
    CLI shows the full traceback with ``--debug``.
    """


def user_code_location(exc: BaseException) -> str:
    """``file:line`` of the innermost traceback frame outside rlclip and the libraries it calls.

    Falls back to the innermost frame when every frame is library code.
    """
    import os
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "<unknown>"
    package = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(package + os.sep) and "site-packages" not in path and "/lib/python" not in path:
            return f"{frame.filename}:{frame.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}"


def describe_user_exception(what: str, exc: BaseException) -> str:
    """One line: ``<what> raised <Type>: <message> at <file>:<line>``."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"{what} raised {text} at {user_code_location(exc)}"
