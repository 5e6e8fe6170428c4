"""Errors that carry the process exit code the CLI promises (DESIGN.md: 0 ok, 1 gate, 2 input, 3 stage)."""

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


class GateFailed(EdgekitError):
    """The artifact was built and verified, but a gate (accuracy, size, latency) did not hold."""

    exit_code = 1


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries put the useful part there), or its type name."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
