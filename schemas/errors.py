"""The two kinds of failure every component distinguishes.

A ``PermanentError`` means retrying cannot help (a malformed payload, an
unknown ``kind``, a 4xx other than 409/429): the message goes to the
dead-letter queue with the error's ``reason`` and is acked. A
``TemporaryError`` means the world may heal (5xx, 429, timeouts, a lost
connection): the work is retried after ``delay`` seconds, never dropped.
Adapters map their client's exceptions to these; nothing else branches on
client exception types.
"""

from __future__ import annotations


class AgentJobsError(Exception):
    """Base class for the errors agentjobs raises on purpose."""


class PermanentError(AgentJobsError):
    """Retrying cannot help; dead-letter the input with ``reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason  # short snake_case code, stable for dashboards
        self.message = message  # precise, human-readable detail


class TemporaryError(AgentJobsError):
    """Retry after ``delay`` seconds (None: let the retry policy decide)."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.delay = delay  # seconds


class DecodeError(PermanentError):
    """A wire payload could not be turned into a valid message."""
