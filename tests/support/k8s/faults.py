"""Fault injection: make chosen requests fail the way a sick apiserver or network does.

`inject(method, path_regex, status=…|timeout=True|drop_stream=True, times=N, delay=s,
probability=p)`
matches requests by HTTP method and a regex searched in the URL path. A
status fault answers a real Status body (429 carries Retry-After), `timeout`
hangs until the client gives up, `drop_stream` cuts the connection — after
`after_events` watch events for a watch, at once otherwise — and `silent_stream`
makes a watch go quiet after `after_events` events (no event, no bookmark, no
end: a half-open connection behind a proxy) until its timeout. Each fault
counts its hits and exposes an event so tests can await "the fault fired".
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass, field


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int | None = None
    timeout: bool = False
    drop_stream: bool = False
    times: int | None = 1  # None: forever
    delay: float = 0.0
    retry_after: int | None = None
    after_events: int = 0
    silent_stream: bool = False
    probability: float = 1.0  # share of matching requests that get the fault
    rng: random.Random = field(default_factory=lambda: random.Random(0))  # seeded: reproducible runs
    hits: int = 0
    fired: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        return (not self.exhausted and self.method in ("*", method.upper())
                and self.path.search(path) is not None)


class Faults:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def inject(self, method: str, path_regex: str, status: int | None = None, *,
               timeout: bool = False, drop_stream: bool = False, times: int | None = 1,
               delay: float = 0.0, retry_after: int | None = None,
               after_events: int = 0, probability: float = 1.0, seed: int = 0,
               silent_stream: bool = False) -> Fault:
        """Register a fault; with only `delay` it slows matching requests down."""
        if status == 429 and retry_after is None:
            retry_after = 1
        fault = Fault(method.upper(), re.compile(path_regex), status, timeout, drop_stream, times,
                      delay, retry_after, after_events, silent_stream, probability, random.Random(seed))
        self._faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The first live fault matching this request, counted as a hit."""
        for fault in self._faults:
            if fault.matches(method, path) and (
                    fault.probability >= 1.0 or fault.rng.random() < fault.probability):
                fault.hits += 1
                fault.fired.set()
                return fault
        return None

    def clear(self) -> None:
        self._faults.clear()
