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
