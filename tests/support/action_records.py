"""A Results consumer of our own for tests: every ``ActionRecord`` on ``agentjobs.results`` as it arrives.

An exclusive queue bound to ``action.#``, consumed from ``bind`` on; each message decoded strictly
as an ``ActionRecord`` and kept as ``(routing key, record, headers)``. ``of`` awaits the records of
one investigation (woken by each arrival, bounded by its timeout) instead of polling the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika

from schemas import ActionRecord, decode
from schemas.routing import RESULTS


class ActionRecords:
    def __init__(self) -> None:
        self.got: list[tuple[str, ActionRecord, dict[str, Any]]] = []
        self._arrived = asyncio.Event()

    async def bind(self, connection: aio_pika.abc.AbstractConnection) -> None:
        queue = await (await connection.channel()).declare_queue(exclusive=True)
        await queue.bind(RESULTS, "action.#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.got.append((message.routing_key or "", decode(message.body, ActionRecord), dict(message.headers or {})))
        self._arrived.set()

    def now(self, investigation_id: str | None = None) -> list[tuple[str, ActionRecord]]:
        """(routing key, record) of what arrived so far, of one investigation or all."""
        return [(k, r) for k, r, _ in self.got if investigation_id is None or r.investigation_id == investigation_id]

    async def of(self, investigation_id: str, n: int = 1, timeout: float = 10) -> list[tuple[str, ActionRecord]]:
        """The first ``n`` or more records of ``investigation_id``, awaited up to ``timeout`` s (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while len(mine := self.now(investigation_id)) < n:
                self._arrived.clear()
                await self._arrived.wait()
        return mine


@asynccontextmanager
async def action_records(url: str) -> AsyncIterator[ActionRecords]:
    """``ActionRecords`` on a connection of its own to ``url``."""
    connection = await aio_pika.connect(url)
    try:
        records = ActionRecords()
        await records.bind(connection)
        yield records
    finally:
        await connection.close()
