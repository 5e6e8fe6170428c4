"""Errors that carry the process exit code the CLI promises (DESIGN.md: 2 bad input, 3 a stage failed).

A failed gate is not an error: the artifact exists, `BuildResult.exit_code` is 1.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base error: `str(err)` is the one-line reason shown to the user."""

    exit_code = 3


class UsageError(EdgekitError):
    """Bad input or usage: a missing file, an unknown target, a model that does not fit its --arch."""

    exit_code = 2


class StageError(EdgekitError):
    """A pipeline stage failed on input that looked valid (an exporter crash, a runtime refusing the file)."""

    exit_code = 3


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries put the useful part there), or its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
