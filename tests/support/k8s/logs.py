"""Container log buffers: what `pods/log` serves (tail, timestamps, since, limit, follow)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from .clock import Clock, micro_time


@dataclass
class LogBuffer:
    lines: list[tuple[float, bytes]] = field(default_factory=list)
    closed: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def write(self, ts: float, data: bytes) -> None:
        self.lines.append((ts, data))
        self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def render(self, ts: float, data: bytes, timestamps: bool) -> bytes:
        if timestamps:
            stamp = micro_time(ts).replace("Z", "000Z")  # RFC3339Nano-looking
            return stamp.encode() + b" " + data
        return data

    async def read(self, clock: Clock, follow: bool, tail: int | None, timestamps: bool,
                   since_seconds: int | None, limit_bytes: int | None) -> AsyncIterator[bytes]:
        start = 0
        if tail is not None:
            start = max(0, len(self.lines) - tail)
        cutoff = clock.time() - since_seconds if since_seconds else None
        remaining = limit_bytes
        i = start
        while True:
            while i < len(self.lines):
                ts, data = self.lines[i]
                i += 1
                if cutoff is not None and ts < cutoff:
                    continue
                chunk = self.render(ts, data, timestamps)
                if remaining is not None:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                yield chunk
                if remaining is not None and remaining <= 0:
                    return
            if not follow or self.closed:
                return
            await self.changed.wait()
