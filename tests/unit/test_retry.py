"""Backoff is capped and jittered; retries stop after max_elapsed; Retry-After is honoured."""

from __future__ import annotations

import random

import pytest

from dispatcher.plumbing.retry import Backoff, RetriesExhausted, retry
from schemas.errors import PermanentError, TemporaryError


def test_delays_grow_exponentially_within_jitter_and_never_exceed_the_cap() -> None:
    policy = Backoff(base=0.1, multiplier=2, cap=2.0)
    rng = random.Random(7)
    for attempt in range(1, 30):
        ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
        assert ceiling / 2 <= policy.delay(attempt, rng) <= ceiling


def test_retry_after_is_a_floor_but_still_capped() -> None:
    policy = Backoff(base=0.1, cap=5.0)
    assert policy.delay(1, random.Random(1), floor=3.0) >= 3.0
    assert policy.delay(1, random.Random(1), floor=60.0) == 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_temporary_errors_are_retried_until_success() -> None:
    clock = FakeClock()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise TemporaryError("503 from the API server")
        return "ok"

    assert await retry(flaky, Backoff(), clock=clock, sleep=clock.sleep) == "ok"
    assert calls == 4 and len(clock.sleeps) == 3


async def test_gives_up_after_max_elapsed_with_the_last_error() -> None:
    clock = FakeClock()

    async def down() -> None:
        raise TemporaryError("connection refused")

    with pytest.raises(RetriesExhausted) as caught:
        await retry(down, Backoff(max_elapsed=10.0), clock=clock, sleep=clock.sleep)
    assert caught.value.last.message == "connection refused"
    assert clock.now <= 10.0


async def test_permanent_errors_are_not_retried() -> None:
    clock = FakeClock()

    async def bad() -> None:
        raise PermanentError("invalid_job", "no containers")

    with pytest.raises(PermanentError):
        await retry(bad, Backoff(), clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []
