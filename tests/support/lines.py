"""Reading a subprocess's output line by line while a test waits for the line it expects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Lines:
    """Collects a subprocess stream line by line in the background; tests wait for a line."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new.set()
        self._new.set()

    async def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines:
                        if predicate(line):
                            return line
                    if self._task.done():
                        raise AssertionError(f"stream ended before {what}:\n" + "\n".join(self.lines[-40:]))
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout} s:\n" + "\n".join(self.lines[-40:])) from None

    async def finished(self) -> str:
        await self._task
        return "\n".join(self.lines)
