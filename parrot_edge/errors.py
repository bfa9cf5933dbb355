"""The one exception type users see: a message that says what is wrong and what to do, never a traceback."""

from __future__ import annotations


class ParrotEdgeError(Exception):
    """An error caused by input or environment, reported as `error: <message>` with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class VerificationFailed(ParrotEdgeError):
    """A converted model computes something different from its checkpoint."""

    exit_code = 3
