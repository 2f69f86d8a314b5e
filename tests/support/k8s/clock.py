"""The emulated cluster's clock: real time by default, but tests can jump it or speed it up.

Deadlines, TTLs, backoff and token expiry all read this clock, so a test can
say "31 seconds pass" with `advance(31)` instead of sleeping; sleepers wake
at once when the clock jumps past their wake-up time.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone


class Clock:
    def __init__(self, start: float | None = None, speed: float = 1.0) -> None:
        self._base_clock = time.time() if start is None else start
        self._base_real = time.monotonic()
        self._speed = speed
        self._wakeups: set[asyncio.Future] = set()

    def time(self) -> float:
        """Seconds since the epoch, emulated."""
        return self._base_clock + (time.monotonic() - self._base_real) * self._speed

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), tz=timezone.utc)

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        """Change the rate (1.0 = real time, 0 = frozen) without a jump."""
        self._base_clock, self._base_real = self.time(), time.monotonic()
        self._speed = value
        self._wake()

    def advance(self, seconds: float) -> None:
        """Jump forward; everything due by then wakes."""
        self._base_clock += seconds
        self._wake()

    def _wake(self) -> None:
        for fut in list(self._wakeups):
            if not fut.done():
                fut.set_result(None)

    async def sleep_until(self, when: float) -> None:
        while (remaining := when - self.time()) > 0:
            fut = asyncio.get_running_loop().create_future()
            self._wakeups.add(fut)
            try:
                timeout = remaining / self._speed if self._speed > 0 else None
                await asyncio.wait({fut}, timeout=timeout)
            finally:
                self._wakeups.discard(fut)
                if not fut.done():
                    fut.cancel()

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.time() + seconds)


def rfc3339(ts: float) -> str:
    """metav1.Time: second precision, Z suffix."""
    return datetime.fromtimestamp(int(ts), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(ts: float) -> str:
    """metav1.MicroTime: microsecond precision, Z suffix."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
