"""Retry policy as data: capped, jittered exponential backoff for ``TemporaryError``.

Work that hits a temporary error is retried in place (the message stays
unacked, so a crash loses nothing) until ``max_elapsed`` has passed; then it
is handed back to the broker (nack + requeue), which counts deliveries and
dead-letters after ``x-delivery-limit``. Never a hot requeue loop.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from schemas.errors import TemporaryError

from dispatcher.plumbing.settings import RetrySettings

T = TypeVar("T")


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    base: float = 0.1  # seconds before the first retry
    multiplier: float = 2.0
    cap: float = 15.0  # seconds; no single wait is longer
    max_elapsed: float = 60.0  # seconds of retrying in place before handing the work back

    @classmethod
    def of(cls, settings: RetrySettings) -> Backoff:
        """The policy configured in settings."""
        return cls(base=settings.base, cap=settings.cap, max_elapsed=settings.max_elapsed)

    def delay(self, attempt: int, rng: random.Random | None = None, floor: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based); "equal jitter"."""
        rng = rng or random
        ceiling = min(self.cap, self.base * self.multiplier ** max(attempt - 1, 0))
        wait = ceiling / 2 + rng.uniform(0, ceiling / 2)
        if floor is not None:  # e.g. Retry-After from a 429
            wait = max(wait, min(floor, self.cap))
        return wait


class RetriesExhausted(Exception):
    """Temporary errors kept happening for ``max_elapsed`` seconds."""

    def __init__(self, last: TemporaryError, attempts: int) -> None:
        super().__init__(f"gave up after {attempts} attempts: {last.message}")
        self.last = last
        self.attempts = attempts


async def retry(
    work: Callable[[], Awaitable[T]],
    policy: Backoff,
    *,
    on_retry: Callable[[int, TemporaryError, float], None] | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run ``work``, retrying ``TemporaryError`` with backoff; raises ``RetriesExhausted``."""
    clock = clock or asyncio.get_running_loop().time
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await work()
        except TemporaryError as exc:
            wait = policy.delay(attempt, floor=exc.delay)
            if clock() - started + wait > policy.max_elapsed:
                raise RetriesExhausted(exc, attempt) from exc
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            await sleep(wait)
